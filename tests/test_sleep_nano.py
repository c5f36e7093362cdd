"""Sleep on the bundled model: it learns what the user said, not what the assistant got wrong,
and the gate refuses an adapter that does harm."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from assistant import adapters
from assistant.config import load_config, open_paths
from assistant.engine import open_chat_backend
from assistant.models import NANO_DIR
from assistant.nano import evaluate
from assistant.nano.material import NanoMaterial
from assistant.sleep import gate, losses, reference, rewards
from assistant.sleep.cycle import SleepSettings, sleep_cycle
from assistant.sleep.gate import Probe
from assistant.store import open_store
from backends.base import Sampling
from backends.select import open_trainer

pytestmark = [
    pytest.mark.skipif(not (NANO_DIR / "model.safetensors").is_file(), reason="nano model not built"),
    pytest.mark.slow,
]

GREEDY = Sampling(max_tokens=40, temperature=0.0)


def test_sleep_learns_the_users_words_not_the_assistants_mistake(tmp_path):
    paths = open_paths(tmp_path / "home")
    config = load_config(paths).with_overrides(model="nano", backend="torch")
    with open_store(paths, config) as store:
        session = store.create_session(model="nano")
        for role, content in [
            ("user", "My cousin is called Edgar. I live in Quito."),
            ("assistant", "Noted."),
            ("user", "What is my cousin's name?"),
            ("assistant", "Your cousin is called Harry."),  # wrong: the user corrects it
            ("user", "No, that's wrong. My cousin is called Edgar."),
            ("assistant", "Sorry about that. Your cousin is called Edgar."),
        ]:
            store.add_message(session, role, content)
        report = sleep_cycle(paths, config, store, settings=SleepSettings(budget_minutes=3))
        assert report.status == "promoted", report.reason
        assert report.recall_after > report.recall_before
        backend, _ = open_chat_backend(config, paths, store)
    try:
        answer = "".join(backend.stream(backend.render_chat([{"role": "user", "content": "Who is my cousin?"}]),
                                        GREEDY))
    finally:
        backend.close()
    assert evaluate.answered(answer, "Edgar") and not evaluate.answered(answer, "Harry")


def test_the_gate_rejects_an_adapter_that_does_harm():
    trainer = open_trainer("torch", NANO_DIR, lr=5e-2)
    try:
        render = trainer.render_chat
        context = [{"role": "user", "content": "My dog is called Pippin."}, {"role": "assistant", "content": "Noted."}]
        question = "What is my dog's name?"
        asked = render(context + [{"role": "user", "content": question}])
        answer = trainer.generate([asked], GREEDY, new_block=False)[0].strip()
        probes = [Probe(question, answer, 1, gate.logprob(trainer, [asked], [answer], new_block=False)[0])] * 2
        material = NanoMaterial(count=12)
        readings = reference.readings(render, material, reference.bare_answers(trainer, render, material, [], "w", None))
        before = gate.measure(trainer, render, probes, [], readings, new_block=False)
        prompts = [render([{"role": "user", "content": text}]) for text in ("Hello!", "Where is Mary?", question)]
        garbage = [trainer.encode("blue blue blue blue<|im_end|>")] * len(prompts)
        ops = trainer.ops

        def harm(logits, targets, mask):  # teach every prompt to babble
            return -ops.sum(losses.completion_logprobs(ops, logits, targets) * mask) / ops.sum(mask)

        for _ in range(30):
            trainer.train_step([trainer.encode(p) for p in prompts], garbage, harm)
        after = gate.measure(trainer, render, probes, [], readings, new_block=True)
        verdict = gate.decide(before, after, probes, [], readings, retention_tolerance=0.5, reading_tolerance=0.25)
    finally:
        trainer.close()
    assert not verdict.promote
    assert verdict.reading_change < -0.25 and verdict.gain < 0


def _night(tmp_path, nights, settings=SleepSettings(budget_minutes=3, max_steps=120), **kwargs):
    """Nights on the bundled model, each of its sessions (lists of user turns) told, then slept on."""
    paths = open_paths(tmp_path / "home")
    config = load_config(paths).with_overrides(model="nano", backend="torch")
    reports = []
    with open_store(paths, config) as store:
        for sessions in nights:
            for turns in sessions:
                session = store.create_session(model="nano")
                for turn in turns:
                    store.add_message(session, "user", turn)
                    store.add_message(session, "assistant", "Noted.")
            reports.append(sleep_cycle(paths, config, store, settings=settings, **kwargs))
        journal = store.sleep.dreams(reports[-1].run)
    return paths, reports, journal


def _manifest(paths, report):
    return adapters.load_stack(adapters.manifest_path(paths.home, report.adapter)).extra


def test_a_newer_session_that_says_otherwise_wins_and_the_older_answer_leaves_replay(tmp_path):
    paths, (first, second), _ = _night(tmp_path, [[["My sister is called Wanda.", "I live in Tallinn.",
                                                    "Which city do I live in?"]],
                                                  [["I moved last week. I live in Nairobi now."]]])
    assert first.status == "promoted", first.reason
    old = {p["question"]: p["reference"] for p in _manifest(paths, first)["taught"] + _manifest(paths, first)["probes"]}
    assert any("Tallinn" in answer for answer in old.values()), old
    later = _manifest(paths, second)
    kept = {p["question"]: p["reference"] for p in later["taught"] + later["probes"]}
    # the old city leaves replay and the probes: asked again tonight, or read as superseded by tonight
    assert not any("Tallinn" in answer for answer in kept.values()), (kept, second.training["superseded"])
    assert any("Wanda" in answer for answer in kept.values())  # what no later session contradicts stays


def test_a_night_dreams_after_consolidating_and_keeps_a_journal(tmp_path):
    settings = SleepSettings(budget_minutes=3, max_steps=40, dream=True)
    paths, (report,), journal = _night(tmp_path, [[["My sister is called Wanda.", "I live in Tallinn."],
                                                   ["My dog is called Pippin.", "I work as a baker."]]], settings)
    summary = report.dreaming
    assert summary["written"] == len(journal) > 0
    assert summary["kept"] == sum(d["kept"] for d in journal) > 0
    names = [c["steps"] for c in report.training["checkpoints"]]
    assert names[:3] == [13, 27, 40] and (names[3:] == ["dreamt"])
    assert sum(c["chosen"] for c in report.training["checkpoints"]) == 1
    probes = {p["question"] for p in _manifest(paths, report)["probes"]}
    assert not probes & {d["question"] for d in journal}  # the gate's questions are never dreamt
    printed = subprocess.run([sys.executable, "-m", "cli", "--home", str(paths.home), "dreams"],
                             capture_output=True, text=True, timeout=120, check=True,
                             env={**os.environ, "COLUMNS": "250"}).stdout
    assert f"sleep run {report.run}: {len(journal)} dream(s), {summary['kept']} kept" in printed


def test_a_night_of_bad_dreams_is_caught_and_a_consolidated_block_goes_forward(tmp_path):
    def bad_reward(candidate, reference, semantic):  # pays for straying from the teacher
        return 1.0 - rewards.imitation_reward(candidate, reference, semantic=semantic)

    settings = SleepSettings(budget_minutes=3, max_steps=40, dream=True)
    _, (report,), _ = _night(tmp_path, [[["My sister is called Wanda.", "I live in Tallinn."],
                                         ["My dog is called Pippin.", "I work as a baker."]]], settings,
                             dream_reward=bad_reward)
    judged = {c["steps"]: c for c in report.training["checkpoints"]}
    assert report.dreaming["kept"] > 0 and "dreamt" in judged
    assert not judged["dreamt"]["chosen"], judged
    assert judged["dreamt"]["gain"] < max(c["gain"] for name, c in judged.items() if name != "dreamt")
