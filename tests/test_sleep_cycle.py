"""The sleep as a user meets it: a real store, the real CLI and runner process, the tiny model.

These tests check the machinery (what is written, what is refused, what survives a kill). A night
that grows a block needs a model that reads what it is told, so those run on the bundled nano model
(the tiny random one grounds no answer: its nights have nothing to teach); whether sleep teaches is
measured in tests/test_sleep_nano.py and by `somnus bench sleep`.
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
from assistant.models import NANO_DIR, resolve_model
from assistant.sleep import runner
from assistant.store import open_store


@pytest.fixture
def nano():
    if not (NANO_DIR / "model.safetensors").is_file():
        pytest.skip("nano model not built")
    return NANO_DIR


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
    assert "Warning" not in result.stderr  # the sleep process says nothing of its own on the terminal
    report = json.loads(result.stdout)
    assert report["status"] == "nothing"
    assert "nothing to consolidate" in report["reason"]
    for key in ("adapter", "sessions", "recall_before", "recall_after", "retention", "seconds"):
        assert key in report


@pytest.mark.slow
def test_a_night_writes_a_versioned_adapter_and_a_report(tmp_path, nano):
    home = tmp_path / "home"
    paths, config = record_day(home, nano)
    report = json.loads(somnus(home, nano, "sleep", "--now", "--json", "--steps", "2").stdout)
    assert report["status"] in ("promoted", "rejected")
    assert report["adapter"] == 1 and report["sessions"] == [1]
    manifest = json.loads((home / "adapters" / "v0001.json").read_text())
    block = manifest["blocks"][0]
    assert block["sessions"] == [1]
    # what every later night holds reading and anchors to: the bare model's answers, computed once
    assert manifest["material"]["weights"] == f"{manifest['weights']}/float32"  # and the precision read in
    assert len(manifest["material"]["readings"]) == len(manifest["material"]["base"]) > 0
    assert manifest["taught"] and all(p["session_id"] == 1 for p in manifest["taught"])
    assert (home / "adapters" / "blocks" / block["id"] / "adapter_model.safetensors").is_file()
    assert oct(os.stat(home / "adapters" / "v0001.json").st_mode & 0o777) == "0o600"
    listed = json.loads(somnus(home, nano, "adapters", "--json").stdout)
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
def test_a_sleep_killed_mid_night_changes_nothing_and_the_next_one_succeeds(tmp_path, nano):
    home = tmp_path / "home"
    paths, config = record_day(home, nano)
    before = ledger_state(paths, config)
    config = config.with_overrides(model=str(nano), backend="torch")
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
def test_blocks_grown_on_other_weights_are_neither_worn_nor_grown_on(tmp_path, nano):
    home = tmp_path / "home"
    paths, config = record_day(home, nano)
    model = resolve_model(str(nano), paths)
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
def test_a_night_on_the_mlx_engine_goes_through_the_same_cycle(tmp_path, nano):
    """The orchestration is written once: the MLX trainer consolidates, and the gate judges its
    checkpoints, exactly as on torch."""
    pytest.importorskip("mlx.core")
    import functools

    from assistant.sleep.cycle import SleepSettings, sleep_cycle
    from backends.select import open_trainer

    paths, config = record_day(tmp_path / "home", nano)
    settings = SleepSettings(max_steps=3, question_lists=1)
    with open_store(paths, config) as store:
        report = sleep_cycle(paths, config, store, settings=settings,
                             open_trainer=functools.partial(open_trainer, "mlx"))
    assert report.status in ("promoted", "rejected"), report.reason
    judged = report.training["checkpoints"]
    assert [c["steps"] for c in judged] == [1, 2, 3]
    assert sum(c["chosen"] for c in judged) == 1
    manifest = json.loads((paths.home / "adapters" / "v0001.json").read_text())
    assert (paths.home / "adapters" / "blocks" / manifest["blocks"][0]["id"] / "adapter_model.safetensors").is_file()
