"""Sleep on the bundled model: it learns what the user said, not what the assistant got wrong,
and the gate refuses an adapter that does harm."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from assistant.config import load_config, open_paths
from assistant.engine import open_chat_backend
from assistant.models import NANO_DIR
from assistant.nano import evaluate
from assistant.sleep import cycle, dreams, lessons, losses, rewards
from assistant.sleep.cycle import SleepSettings, sleep_cycle
from assistant.sleep.dreams import DreamSettings
from assistant.sleep.gate import GateSettings, Probe, judge
from assistant.sleep.seeding import Row, SeedingSettings
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
        report = sleep_cycle(paths, config, store)
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
        context = [{"role": "user", "content": "My dog is called Pippin."}, {"role": "assistant", "content": "Noted."}]
        question = "What is my dog's name?"
        reference = trainer.generate([trainer.render_chat(context + [{"role": "user", "content": question}])],
                                     GREEDY, new_block=False)[0]
        probes = [Probe(question, reference.strip())]
        prompts = [trainer.render_chat([{"role": "user", "content": text}])
                   for text in ("Hello!", "Where is Mary?", question, "What can you do?")]
        garbage = [trainer.encode("blue blue blue blue<|im_end|>")] * len(prompts)
        ops = trainer.ops

        def harm(logits, targets, mask):  # teach every prompt to babble
            logprobs = losses.completion_logprobs(ops, logits, targets)
            return -ops.sum(logprobs * mask) / ops.sum(mask)

        for _ in range(30):
            trainer.train_step([trainer.encode(p) for p in prompts], garbage, harm)
        verdict = judge(trainer, probes, [], GateSettings(in_context_sessions=6))
    finally:
        trainer.close()
    assert not verdict.promote
    assert verdict.in_context_after < verdict.in_context_before


def test_the_gate_reads_only_candidates_that_could_go_live_the_largest_change_first():
    trainer = open_trainer("torch", NANO_DIR, lr=5e-3)
    try:
        untrained = trainer.new_block_state()
        question, answer = "What is my dog's name?", "Your dog is called Pippin."
        ops = trainer.ops

        def learn(logits, targets, mask):
            return -ops.sum(losses.completion_logprobs(ops, logits, targets) * mask) / ops.sum(mask)

        prompt = trainer.encode(trainer.render_chat([{"role": "user", "content": question}]))
        for _ in range(40):
            trainer.train_step([prompt], [trainer.encode(answer + "<|im_end|>")], learn)
        settings = GateSettings(in_context_sessions=4, scales=(0.5, 1.0))
        checkpoints = {10: untrained, 40: trainer.new_block_state()}
        verdict, judged = cycle.Gate(trainer, [Probe(question, answer)], [], settings).choose(checkpoints)
        unreadable = replace(settings, in_context_tolerance=-1.0)  # reading must rise 100 points: none passes
        _, failed = cycle.Gate(trainer, [Probe(question, answer)], [], unreadable).choose(checkpoints)
    finally:
        trainer.close()
    assert [(c["steps"], c["scale"]) for c in judged] == [(10, 0.5), (10, 1.0), (40, 0.5), (40, 1.0)]
    assert [c["recall"] for c in judged[:2]] == [0.0, 0.0] and judged[3]["recall"] == 1.0
    hopeful = sorted((c for c in judged if c["recall"] > 0), key=lambda c: (-c["steps"] * c["scale"], -c["steps"]))
    read = [c for c in hopeful if c["in_context"] is not None]  # in the order they were read
    assert all(c in hopeful for c in judged if c["in_context"] is not None)  # nothing new recalled: never read
    assert read == hopeful[:len(read)] and (read[0]["steps"], read[0]["scale"]) == (40, 1.0)  # the largest first
    passed = [c for c in read if c["promote"]]
    assert passed == read[-1:] or not passed and len(read) == 2  # reading stops at the first that passes
    chosen = [c for c in judged if c["chosen"]]
    best_read = max(read, key=lambda c: c["in_context"])  # none passing: the one that read best is left
    assert chosen == (passed or [best_read]) and chosen[0]["recall"] == verdict.recall_after
    read_unpassed = [c for c in failed if c["in_context"] is not None]
    assert len(read_unpassed) == 2 and not any(c["promote"] for c in read_unpassed)
    assert [c for c in failed if c["chosen"]] == [max(read_unpassed, key=lambda c: c["in_context"])]


def _night_of_two_sessions(tmp_path, settings, **kwargs):
    """A night on the bundled model: two sessions told, then a sleep with ``settings``."""
    paths = open_paths(tmp_path / "home")
    config = load_config(paths).with_overrides(model="nano", backend="torch")
    with open_store(paths, config) as store:
        for turns in (["My sister is called Wanda.", "I live in Tallinn."],
                      ["Mary moved to the kitchen.\nJohn went to the garden.", "Mary travelled to the office."]):
            session = store.create_session(model="nano")
            for turn in turns:
                store.add_message(session, "user", turn)
                store.add_message(session, "assistant", "Noted.")
        report = sleep_cycle(paths, config, store, settings=settings, **kwargs)
        journal = store.sleep.dreams(report.run)
    return paths, report, journal


def test_a_night_dreams_after_consolidating_and_keeps_a_journal(tmp_path):
    settings = SleepSettings(seeding=SeedingSettings(steps=40), dreams=DreamSettings(draws=2, steps=6))
    paths, report, journal = _night_of_two_sessions(tmp_path, settings)
    summary = report.dreaming
    assert summary["written"] == len(journal) > 0
    assert summary["kept"] == sum(d["kept"] for d in journal) > 0
    assert summary["chosen"] in ("consolidated", "dreamt")
    checkpoints = report.training["checkpoints"]
    # the gate judged each third of the training at each scale
    assert [(c["steps"], c["scale"]) for c in checkpoints] == [(steps, scale) for steps in (13, 27, 40)
                                                                for scale in GateSettings().scales]
    chosen = [c for c in checkpoints if c["chosen"]]  # the consolidation that went forward, dreamt on or not
    assert len(chosen) == 1 and chosen[0]["recall"] == summary["recall_consolidated"]
    assert report.recall_after == summary[f"recall_{summary['chosen']}"]
    kept = [d for d in journal if d["kept"]]
    assert all(d["reference"] and d["score"] is not None and d["reward"] is not None for d in kept)
    assert all(d["question"].endswith("?") for d in journal)
    assert {d["source"] for d in journal} <= set(dreams.SOURCES)
    probes = {p.question for p in _night_probes(paths, report)}
    assert not probes & {d["question"] for d in journal}  # the gate's questions are never dreamt
    printed = subprocess.run([sys.executable, "-m", "cli", "--home", str(paths.home), "dreams"],
                             capture_output=True, text=True, timeout=120, check=True,
                             env={**os.environ, "COLUMNS": "250"}).stdout
    assert f"sleep run {report.run}: {len(journal)} dream(s), {summary['kept']} kept" in printed
    assert kept[0]["question"][:30] in printed


def test_a_night_of_bad_dreams_is_caught_and_the_consolidated_block_goes_live(tmp_path):
    def bad_reward(candidate, reference, semantic):  # pays for straying from the teacher
        return 1.0 - rewards.imitation_reward(candidate, reference, semantic=semantic)

    settings = SleepSettings(seeding=SeedingSettings(steps=40),
                             dreams=DreamSettings(draws=2, steps=16, lr=3e-2, keep_top=4, keep_random=0))
    _, report, journal = _night_of_two_sessions(tmp_path, settings, dream_reward=bad_reward)
    summary = report.dreaming
    assert summary["kept"] > 0
    assert summary["chosen"] == "consolidated", summary
    harmed = summary["recall_dreamt"] < summary["recall_consolidated"] or "fell" in summary["dreamt_verdict"]
    assert harmed, summary  # the dreams really did harm, and the gate saw it
    assert report.recall_after == summary["recall_consolidated"]


def _night_probes(paths, report):
    from assistant import adapters

    stack = adapters.load_stack(adapters.manifest_path(paths.home, report.adapter))
    return [Probe(**p) for p in stack.extra["probes"]]


def test_contrary_anchors_are_tonights_questions_over_sessions_that_say_otherwise():
    told = {1: ("My sister is called Zara.", "What is my sister's name?", "Your sister is called Zara."),
            2: ("I live in Porto.", "Where do I live?", "You live in Porto.")}
    trainer = open_trainer("torch", NANO_DIR)
    try:
        night = [lessons.Lesson(sid, lessons.knowledge_context([{"role": "user", "content": said}]), [question])
                 for sid, (said, question, _) in told.items()]
        rows = [Row("", "", answer, question=question, session_id=sid) for sid, (_, question, answer) in told.items()]
        anchors = cycle.contrary(trainer, night, rows, 4, random.Random(0))
    finally:
        trainer.close()
    assert len(anchors) == 2
    swapped = {"My sister is called Porto.": "Porto", "I live in Zara.": "Zara"}
    for anchor in anchors:
        assert anchor.kind == "anchor" and anchor.teacher_prompt == anchor.student_prompt
        [value] = [value for said, value in swapped.items() if said in anchor.student_prompt]
        assert value in anchor.answer  # the pre-sleep model read the session that says otherwise


def _taught_night(said: str, questions: list[str]) -> tuple[list[Row], list[Probe], list[str]]:
    """``cycle.teach`` on the bare nano model, for a night of one session that tells ``said`` and
    asks ``questions``: its rows, its probes and the probes' prompts as the gate puts them."""
    night = [lessons.Lesson(1, lessons.knowledge_context([{"role": "user", "content": said}]), questions)]
    trainer = open_trainer("torch", NANO_DIR)
    try:
        rows, probes = cycle.teach(trainer, night, SleepSettings(), random.Random(0))
        return rows, probes, [trainer.render_chat(lessons.user_turn(probe.question)) for probe in probes]
    finally:
        trainer.close()


def test_a_fact_asked_once_is_taught_and_the_gate_asks_it_in_a_framing_training_did_not_use():
    rows, [probe], [probe_prompt] = _taught_night("John went to the hallway. Mary moved to the garden.",
                                                  ["Where is John?", "Where is Mary?"])
    assert {row.question for row in rows} == {"Where is John?", "Where is Mary?"}  # both taught
    assert {row.answer for row in rows} == {"John is in the hallway.", "Mary is in the garden."}
    assert len(rows) == 2 * (1 + SleepSettings().framings)
    assert probe.question[:5] != "Where" and probe.question.lower().endswith(("where is john?", "where is mary?"))
    assert probe_prompt not in {row.student_prompt for row in rows}  # a framing its training did not use


def test_a_fact_the_live_model_already_gives_is_taught_but_never_probed():
    """Asked alone, the bare nano model says "Your cousin is called Irene.": a probe of that
    answer could not show what a night learns, so the gate's one probe is about Mary."""
    rows, [probe], _ = _taught_night("My cousin is called Irene. Mary moved to the garden.",
                                     ["What is the name of my cousin?", "Where is Mary?"])
    assert {(row.question, row.answer) for row in cycle.taught(rows)} == {
        ("What is the name of my cousin?", "Your cousin is called Irene."), ("Where is Mary?", "Mary is in the garden.")}
    assert probe.question.lower().endswith("where is mary?") and probe.reference == "Mary is in the garden."


def test_a_night_that_tells_only_what_the_live_adapter_knows_grows_no_block(tmp_path):
    from assistant import adapters
    from assistant.models import resolve_model

    paths = open_paths(tmp_path / "home")
    config = load_config(paths).with_overrides(model="nano", backend="torch")
    model = resolve_model("nano", paths)
    zero = adapters.Block("night0001-zero", adapters.block_dir(paths.home, "night0001-zero"))
    trainer = open_trainer("torch", NANO_DIR)
    try:
        trainer.save_new_block(zero.path)  # a grown block, untrained: the live stack is the bare model
    finally:
        trainer.close()
    manifest = adapters.save_stack(paths.home, adapters.Stack(1, (zero,), None, {"model": model.ref,
                                                                             "weights": model.weights}))
    with open_store(paths, config) as store:
        live = store.sleep.add_adapter(1, str(manifest))
        store.sleep.promote(live, {})
        session = store.create_session(model="nano")
        store.add_message(session, "user", "My cousin is called Irene.")
        store.add_message(session, "assistant", "Noted.")
        report = sleep_cycle(paths, config, store, settings=SleepSettings(question_samples=0))
        assert (report.status, report.sessions, report.adapter) == ("nothing", [session], None), report.reason
        assert report.reason == "the live model already answers every question about these sessions"
        assert store.sleep.unconsolidated_sessions() == []  # learnt, by the live adapter
        assert [(a["id"], a["status"], a["sessions"]) for a in store.sleep.adapters()] == [(live, "live", [session])]


def test_a_question_is_taught_from_the_newest_session_that_tells_its_answer_and_no_other():
    def heard(said: str) -> list[dict]:
        return lessons.knowledge_context([{"role": "user", "content": said}])

    night = [lessons.Lesson(1, heard("My home is in Boston."), ["Which city do I live in?"]),
             lessons.Lesson(2, heard("Eric works as a gardener."), ["Which city do I live in?", "What is my job?",
                                                                     "What is Eric's job?"])]
    trainer = open_trainer("torch", NANO_DIR)
    try:
        rows, _ = cycle.teach(trainer, night, replace(SleepSettings(), probe_share=0.0), random.Random(0))
    finally:
        trainer.close()
    taught = {row.question: row for row in rows}
    assert set(taught) == {"Which city do I live in?", "What is Eric's job?"}  # the user told no job of theirs
    assert "Boston" in taught["Which city do I live in?"].answer and taught["Which city do I live in?"].session_id == 1
    assert "gardener" in taught["What is Eric's job?"].answer and taught["What is Eric's job?"].session_id == 2


def test_a_night_of_one_story_contradicts_it_with_its_own_other_rooms():
    story = "John went to the hallway. Mary moved to the garden."
    night = [lessons.Lesson(1, lessons.knowledge_context([{"role": "user", "content": story}]),
                            ["Where is John?", "Where is Mary?"])]
    rows = [Row("", "", "John is in the hallway.", question="Where is John?", session_id=1),
            Row("", "", "Mary is in the garden.", question="Where is Mary?", session_id=1)]
    trainer = open_trainer("torch", NANO_DIR)
    try:
        anchors = cycle.contrary(trainer, night, rows, 4, random.Random(0))
    finally:
        trainer.close()
    assert anchors
    for anchor in anchors:
        swapped = "John went to the garden" in anchor.student_prompt or "Mary moved to the hallway" in anchor.student_prompt
        assert swapped and anchor.answer in ("John is in the garden.", "Mary is in the hallway.")


def test_the_teacher_writes_questions_about_every_fact_a_session_tells(tmp_path):
    paths = open_paths(tmp_path / "home")
    config = load_config(paths).with_overrides(model="nano", backend="torch")
    told = "Samuel's home is in Quito. I'm seeing the lawyer on Sunday at 4 pm. My turtle's name is Mango."
    with open_store(paths, config) as store:
        session = store.create_session(model="nano")
        store.add_message(session, "user", told)
        store.add_message(session, "assistant", "Noted.")
        trainer = open_trainer("torch", NANO_DIR)
        try:  # no sampled lists: asked about the whole session, the model writes of Samuel only
            [lesson] = cycle.session_lessons(trainer, store, session, SleepSettings(question_samples=0), random.Random(0))
        finally:
            trainer.close()
    for topic in ("Samuel", "lawyer", "turtle"):
        assert any(topic in question for question in lesson.prompts), lesson.prompts


def test_earlier_sessions_are_taught_again_in_fresh_questions_less_what_a_newer_one_says_anew(tmp_path):
    from assistant import adapters

    paths = open_paths(tmp_path / "home")
    config = load_config(paths).with_overrides(model="nano", backend="torch")
    with open_store(paths, config) as store:
        told = {}
        for said in ("My sister is called Zara. My dog's name is Rex. I live in Porto.", "My sister is called Mia."):
            told[said] = store.create_session(model="nano")
            store.add_message(told[said], "user", said)
            store.add_message(told[said], "assistant", "Noted.")
        first, second = told.values()
        stack = adapters.Stack(2, (adapters.Block("night1", tmp_path / "night1", (first,)),
                                 adapters.Block("night2", tmp_path / "night2", (second,))))
        tonight = [lessons.Lesson(second + 1, lessons.knowledge_context([{"role": "user", "content": "My dog is called Max."}]),
                                  ["What is my dog's name?"])]
        trainer = open_trainer("torch", NANO_DIR)
        try:
            # one session re-taught: the seed draws the first night's
            rows, contrary = cycle.reteach(trainer, store, stack, tonight, set(), set(),
                                            SleepSettings(reteach_sessions=1), random.Random(1))
            probe = min(row.question for row in rows if row.answer == "You live in Porto.")  # an earlier night's probe
            unprobed, _ = cycle.reteach(trainer, store, stack, tonight, set(), {probe},
                                         SleepSettings(reteach_sessions=1), random.Random(1))
        finally:
            trainer.close()
    assert rows and {row.kind for row in rows} == {"replay"}
    assert all("Zara" in row.teacher_prompt and "Mia" not in row.teacher_prompt for row in rows)
    answers = {row.answer for row in rows}
    assert "You live in Porto." in answers
    assert not any("Zara" in answer for answer in answers)  # the second night's Mia supersedes her
    assert "Your dog is called Rex." not in answers  # and tonight's Max him
    assert all("Zara" not in row.student_prompt for row in rows)
    assert contrary and {row.kind for row in contrary} == {"anchor"}
    assert unprobed == [row for row in rows if row.question != probe]  # the gate's question is not taught
