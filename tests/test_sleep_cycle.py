"""The sleep as a user meets it: a real store, the real CLI and runner process, the tiny model.

The tiny random model cannot learn anything useful, so these tests check the machinery (what is
written, what is refused, what survives a kill); whether sleep teaches is measured on the bundled
model in tests/test_sleep_nano.py and by `somnus bench sleep`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from assistant import adapters
from assistant.config import load_config, open_paths
from assistant.models import resolve_model
from assistant.sleep import runner
from assistant.store import open_store


def somnus(home, model, *args, check=True):
    command = [sys.executable, "-m", "cli", "--home", str(home), "--model", str(model),
               "--backend", "torch", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def record_day(home, model):
    paths = open_paths(home)
    config = load_config(paths).with_overrides(model=str(model), backend="torch")
    with open_store(paths, config) as store:
        session = store.create_session(model=str(model))
        store.add_message(session, "user", "My sister is called Zara. I live in Porto.")
        store.add_message(session, "assistant", "Noted.")
        store.add_message(session, "user", "Where do I live? And what is my sister's name?")
        store.add_message(session, "assistant", "You live in Porto. Your sister is called Zara.")
    return paths, config


def ledger_state(paths, config):
    with open_store(paths, config) as store:
        return store.sleep.live_adapter(), [s["session_id"] for s in store.sleep.unconsolidated_sessions()]


def test_an_empty_day_has_nothing_to_consolidate(tmp_path, tiny_model_dir):
    result = somnus(tmp_path / "home", tiny_model_dir, "sleep", "--now", "--json")
    report = json.loads(result.stdout)
    assert report["status"] == "nothing"
    assert "nothing to consolidate" in report["reason"]
    for key in ("adapter", "sessions", "recall_before", "recall_after", "retention", "seconds"):
        assert key in report


@pytest.mark.slow
def test_a_night_writes_a_versioned_adapter_and_a_report(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    paths, config = record_day(home, tiny_model_dir)
    report = json.loads(somnus(home, tiny_model_dir, "sleep", "--now", "--json", "--steps", "2").stdout)
    assert report["status"] in ("promoted", "rejected")
    assert report["adapter"] == 1 and report["sessions"] == [1]
    manifest = json.loads((home / "adapters" / "v0001.json").read_text())
    block = manifest["blocks"][0]
    assert block["sessions"] == [1]
    # the reading every later night must hold: the bare model's, the night's own "before"
    assert manifest["reading_base"]["reading"] == report["in_context_before"]
    assert manifest["known"] == []  # no earlier question a later night's retention is held to yet
    assert (home / "adapters" / "blocks" / block["id"] / "adapter_model.safetensors").is_file()
    assert oct(os.stat(home / "adapters" / "v0001.json").st_mode & 0o777) == "0o600"
    listed = json.loads(somnus(home, tiny_model_dir, "adapters", "--json").stdout)
    assert [a["version"] for a in listed] == [1]
    assert listed[0]["status"] == ("live" if report["status"] == "promoted" else "rejected")


def test_a_second_sleep_is_refused_while_one_runs(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    paths, _ = record_day(home, tiny_model_dir)
    with runner.sleep_lock(paths):  # as a running sleep holds it
        result = somnus(home, tiny_model_dir, "sleep", "--now", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "somnus: a sleep is already running; wait for it to finish"


@pytest.mark.slow
def test_a_sleep_killed_mid_night_changes_nothing_and_the_next_one_succeeds(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    paths, config = record_day(home, tiny_model_dir)
    before = ledger_state(paths, config)
    config = config.with_overrides(model=str(tiny_model_dir), backend="torch")
    handle = runner.start_sleep(paths, config, steps=400)
    for event in handle.events():
        if event.stage == "consolidate":
            os.kill(handle.process.pid, signal.SIGKILL)  # kill -9 in the middle of training
            break
    handle.process.wait()
    assert ledger_state(paths, config) == before
    assert not runner.is_sleeping(paths)
    report = runner.sleep_now(paths, config, steps=2)
    assert report.status in ("promoted", "rejected")
    with open_store(paths, config) as store:
        first = store.sleep.run(1)
    assert first["status"] == "failed" and first["error"] == "interrupted"


@pytest.mark.slow
def test_blocks_grown_on_other_weights_are_neither_worn_nor_grown_on(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    paths, config = record_day(home, tiny_model_dir)
    model = resolve_model(str(tiny_model_dir), paths)
    stale = adapters.Block("night0001-stale", adapters.block_dir(paths.home, "night0001-stale"), (99,), None)
    manifest = adapters.save_stack(paths.home, adapters.Stack(1, (stale,), None, {"model": model.ref, "weights": "retrained"}))
    with open_store(paths, config) as store:
        store.sleep.promote(store.sleep.add_adapter(1, str(manifest)), {})
        assert adapters.live_adapters(store, model) == []  # the chat does not wear them
    report = runner.sleep_now(paths, config, steps=2)  # an empty block folder: loading it would fail
    assert report.adapter == 2 and report.sessions == [1]
    grown = json.loads((home / "adapters" / "v0002.json").read_text())
    assert [block["sessions"] for block in grown["blocks"]] == [[1]]
    assert (grown["model"], grown["weights"]) == (model.ref, model.weights)


@pytest.mark.slow
def test_a_night_on_the_mlx_engine_goes_through_the_same_cycle(tmp_path, tiny_model_dir):
    """The orchestration is written once: the MLX trainer consolidates, and the gate judges its
    checkpoints at every scale, exactly as on torch."""
    pytest.importorskip("mlx.core")
    import functools

    from assistant.sleep.cycle import SleepSettings, sleep_cycle
    from assistant.sleep.dreams import DreamSettings
    from assistant.sleep.gate import GateSettings
    from assistant.sleep.seeding import SeedingSettings
    from backends.select import open_trainer

    paths, config = record_day(tmp_path / "home", tiny_model_dir)
    settings = SleepSettings(seeding=SeedingSettings(steps=2, checkpoints=2), dreams=DreamSettings(steps=0),
                             gate=GateSettings(in_context_sessions=2, scales=(0.5, 1.0)), anchors=3,
                             contrary_anchors=2, question_samples=0)
    with open_store(paths, config) as store:
        report = sleep_cycle(paths, config, store, settings=settings,
                             open_trainer=functools.partial(open_trainer, "mlx"))
    assert report.status in ("promoted", "rejected"), report.reason
    judged = report.training["checkpoints"]
    assert [(c["steps"], c["scale"]) for c in judged] == [(1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)]
    assert sum(c["chosen"] for c in judged) == 1
    manifest = json.loads((paths.home / "adapters" / "v0001.json").read_text())
    assert (paths.home / "adapters" / "blocks" / manifest["blocks"][0]["id"] / "adapter_model.safetensors").is_file()
