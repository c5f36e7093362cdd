"""The night's orchestration, through ``sleep_cycle`` on a real store with a scripted engine.

``tests/fakes.FakeTrainer`` stands in for the model at the ``BlockTrainer`` seam, so each night
takes milliseconds: these tests check what a night selects, what it records when the gate
promotes or rejects, what later nights replay, and that a crash changes nothing live. Whether a
night teaches a real model is measured in tests/test_sleep_nano.py and by `somnus bench sleep`.

A night here trains 4 steps and keeps 3 checkpoints, at steps 1, 3 and 4: the gate's candidates.
The fake's block strength is its steps, so with ``learns_after=3`` the last two candidates recall
what they were taught and the first recalls nothing. Each fact has three questions and half of a
night's questions are held out, so a fact told alone is taught one and leaves two for the gate.
The fake's tokens are bytes, so its question list is cut at ``teach.QUESTIONS.max_tokens`` bytes:
a session of two facts is asked four questions, not six.
"""

from __future__ import annotations

import functools
import inspect
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from unittest import mock

import pytest
from fakes import (
    UNKNOWN,
    UNREAD,
    VOCAB,
    Fact,
    FakeChatBackend,
    FakeCrash,
    FakeTrainer,
    make_model_folder,
    parse_chat,
)

from assistant import adapters, forget
from assistant.chat import Chat
from assistant.config import Config, Paths, load_config, open_paths
from assistant.models import resolve_model
from assistant.sleep import cycle, dreaming, sleep_lock
from assistant.sleep.cycle import SleepReport, SleepSettings, sleep_cycle
from assistant.sleep.gate import Probe, kept_training
from assistant.sleep.material import EVERYDAY, READINGS
from assistant.sleep.night import MLP
from assistant.sleep.runner import SleepBusy
from assistant.sleep.seeding import SeedingSettings
from assistant.sleep.teach import ASK, RECITE
from assistant.store import Store, open_store
from backends.base import Adapter, Backend, BlockTrainer, Sampling
from backends.peft_io import read_lora

PORTO = Fact("I live in Porto.", ("Where do I live?", "Which city do I live in?", "What city is my home?"),
             "You live in Porto.")
# Said on a later day: it answers Porto's questions otherwise, and the teacher writes other ones about it.
LYON = Fact("Now I live in the city of Lyon.",
            ("Which city is my home now?", "What is my home city now?", "Where have I moved to?", *PORTO.questions),
            "You live in Lyon.", writes=("Which city is my home now?", "What is my home city now?", "Where have I moved to?"))
REX = Fact("My dog is called Rex.", ("What is my dog called?", "What is my dog's name?", "What name does my dog have?"),
           "Your dog is called Rex.")
ZARA = Fact("My sister is called Zara.",
            ("What is my sister called?", "What is my sister's name?", "What name does my sister have?"),
            "Your sister is called Zara.")
FACTS = [PORTO, LYON, REX, ZARA]
LEARNS = 3.0  # the checkpoints at steps 3 and 4 recall, the one at step 1 does not

SETTINGS = SleepSettings(max_steps=4, batch_size=4, question_lists=1, budget_minutes=5, probe_share=0.5)
# The fake learns only from the teacher's answers (its own samples teach it nothing), so the nights
# here distil off-policy: which checkpoint recalls is then the script's, not the sampler's luck
# (on-policy, a one-fact night would rarely train on the teacher's answer: see the xfail below).
ON_POLICY = 0.0


@dataclass
class Day:
    """A data folder with a store and a model folder that only the fake opens."""

    paths: Paths
    config: Config
    store: Store

    def session(self, *said: str) -> int:
        session = self.store.create_session(model=self.config.model)
        for text in said:
            self.store.add_message(session, "user", text)
            self.store.add_message(session, "assistant", "Noted.")
        return session

    def sleep(self, fake: FakeTrainer, on_policy: float = ON_POLICY, **changes) -> SleepReport:
        seeding = functools.partial(SeedingSettings, on_policy=on_policy)  # SleepSettings leaves it at the default
        with mock.patch.object(cycle, "SeedingSettings", seeding):
            return sleep_cycle(self.paths, self.config, self.store, settings=replace(SETTINGS, **changes),
                               open_trainer=fake.open)

    def manifest(self, version: int) -> dict:
        return json.loads(adapters.manifest_path(self.paths.home, version).read_text())

    def manifests(self) -> dict[str, bytes]:
        folder = self.paths.home / "adapters"
        return {path.name: path.read_bytes() for path in folder.glob("*.json")} if folder.is_dir() else {}

    def blocks_on_disk(self) -> set[str]:
        folder = self.paths.home / "adapters" / "blocks"
        return {path.name for path in folder.iterdir()} if folder.is_dir() else set()

    def pending(self) -> list[int]:
        return [row["session_id"] for row in self.store.sleep.unconsolidated_sessions()]

    def live_state(self) -> tuple:
        """Everything a night may change only by promoting: the live adapter and every version."""
        return (self.store.sleep.live_adapter(), self.store.sleep.adapters(), self.manifests(),
                adapters.live_stack(self.store))


def open_day(home: Path, model_folder: Path, database: Path | None = None) -> Day:
    """A data folder at ``home``; ``database``: an empty store to start from (already migrated)."""
    paths = open_paths(home)
    if database is not None:
        shutil.copyfile(database, paths.database)
    config = load_config(paths).with_overrides(model=str(make_model_folder(model_folder)))
    store = open_store(paths, config)
    store.db.execute("PRAGMA synchronous=OFF")  # these nights crash the process, never the machine: no fsync
    return Day(paths, config, store)


@pytest.fixture(scope="module")
def empty_database(tmp_path_factory) -> Path:
    """One migrated, empty store file that each test copies: migrating anew took most of a test's time."""
    paths = open_paths(tmp_path_factory.mktemp("template"))
    open_store(paths, Config()).close()
    return paths.database


@pytest.fixture
def day(somnus_home, tmp_path, empty_database):
    day = open_day(somnus_home, tmp_path / "model", empty_database)
    yield day
    day.store.close()


def learner(**script) -> FakeTrainer:
    return FakeTrainer(FACTS, **{"learns_after": LEARNS, **script})


def asked(prompt: str) -> str:
    """The last thing the user says in a rendered prompt."""
    turns, _ = parse_chat(prompt)
    return turns[-1]["content"] if turns and turns[-1]["role"] == "user" else ""


def answers(entries: list[dict], key: str) -> set[str]:
    return {entry[key] for entry in entries}


# -- the fake itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fake", "protocol"), [(FakeTrainer(), BlockTrainer), (FakeChatBackend(), Backend)])
def test_the_fakes_implement_the_engine_protocols_method_for_method(fake, protocol):
    assert isinstance(fake, protocol)
    methods = [name for name, member in vars(protocol).items() if inspect.isfunction(member) and name[0] != "_"]
    for name in methods:
        wanted, got = inspect.signature(getattr(protocol, name)), inspect.signature(getattr(type(fake), name))
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
            (p.name, p.kind, p.default) for p in wanted.parameters.values()], name


def test_the_fakes_logits_are_sure_of_what_it_says_and_nothing_else():
    fake = FakeTrainer([PORTO])
    prompt = fake.render_chat([{"role": "user", "content": PORTO.said}, {"role": "assistant", "content": "Noted."},
                               {"role": "user", "content": "Where do I live?"}])
    [said] = fake.generate([prompt], Sampling(max_tokens=48), new_block=False)
    right, wrong = fake.encode(said + "<|end|>"), fake.encode("You live in Lyon.<|end|>")
    logits, mask = fake.completion_logits([fake.encode(prompt)] * 2, [right, wrong], new_block=False)
    assert said == PORTO.answer and tuple(logits.shape) == (2, len(right), VOCAB)
    assert mask.tolist() == [[1.0] * len(right), [1.0] * len(wrong) + [0.0] * (len(right) - len(wrong))]
    targets = [right, wrong + [0] * (len(right) - len(wrong))]
    sure = (fake.ops.take_along_last_axis(fake.ops.log_softmax(logits), targets) * mask).sum(dim=-1)
    assert float(sure[0]) > -0.2 and float(sure[1]) < -20  # Lyon leaves what it would say at "L"


# -- which sessions a night selects -----------------------------------------------------------------


def test_a_night_with_nothing_said_reports_nothing_and_opens_no_engine(day):
    fake = learner()
    report = day.sleep(fake)
    assert report.status == "nothing" and report.reason.startswith("nothing to consolidate")
    assert fake.nights == []
    assert day.store.sleep.adapters() == [] and day.manifests() == {} and day.blocks_on_disk() == set()
    run = day.store.sleep.last_run()
    assert run["id"] == report.run and run["status"] == "complete" and run["report"]["status"] == "nothing"


def test_a_night_trains_at_the_rate_for_its_models_width(day):
    config = Path(day.config.model) / "config.json"
    day.session(PORTO.said)
    fake = learner()
    day.sleep(fake)  # the fake model's config names no width: the rate as set
    config.write_text(json.dumps({"model_type": "somnus-fake", "hidden_size": 256}))
    day.session(REX.said)
    day.sleep(fake)
    assert [night.lr for night in fake.nights] == [SETTINGS.lr, SETTINGS.lr * 4]


def test_a_night_sleeps_only_on_the_sessions_no_live_adapter_learnt(day):
    porto, rex = day.session(PORTO.said), day.session(REX.said)
    first = day.sleep(learner())
    zara = day.session(ZARA.said)
    assert day.pending() == [zara]
    fake = learner()
    second = day.sleep(fake)
    assert (first.status, first.sessions) == ("promoted", [porto, rex])
    assert (second.status, second.sessions) == ("promoted", [zara])
    asked = [p for p in fake.night.prompts(new_block=False) if p.endswith(f"<|user|>{ASK}<|end|>\n<|assistant|>")]
    assert asked and all(ZARA.said in p and PORTO.said not in p and REX.said not in p for p in asked)
    assert [block["sessions"] for block in day.manifest(2)["blocks"]] == [[porto, rex], [zara]]
    assert [(a["version"], a["status"], a["sessions"]) for a in day.store.sleep.adapters()] == [
        (2, "live", [zara]), (1, "retired", [porto, rex])]
    assert day.pending() == []


def test_a_session_that_went_on_after_a_sleep_is_slept_on_for_its_new_part(day):
    session = day.session(PORTO.said)
    assert day.sleep(learner()).status == "promoted"
    learnt_through = day.store.messages(session)[-1]["id"]
    day.store.add_message(session, "user", REX.said)
    day.store.add_message(session, "assistant", "Noted.")
    pending = day.store.sleep.unconsolidated_sessions()
    assert [(row["session_id"], row["consolidated_through"], row["new_messages"]) for row in pending] == [
        (session, learnt_through, 2)]
    report = day.sleep(learner())
    assert report.status == "promoted" and report.sessions == [session]
    first, second = day.manifest(1), day.manifest(2)
    tonight = [p for p in second["taught"] + second["probes"] if p not in first["taught"] + first["probes"]]
    # judged by what is new: Porto the live model already answers, so it is not taught again
    assert answers(tonight, "reference") == {REX.answer} and {p["session_id"] for p in tonight} == {session}
    assert day.pending() == []


def test_after_a_rollback_the_retired_nights_sessions_are_slept_on_again_on_the_parents_stack(day):
    porto = day.session(PORTO.said)
    day.sleep(learner())
    rex = day.session(REX.said)
    day.sleep(learner())
    assert day.store.sleep.rollback()["version"] == 1
    assert day.pending() == [rex]
    fake = learner()
    report = day.sleep(fake)
    assert (report.status, report.adapter, report.sessions) == ("promoted", 3, [rex])
    assert fake.night.blocks == adapters.live_stack(day.store).adapters()[:1]  # v1's block only, not v2's
    third = day.manifest(3)
    assert third["parent"] == 1 and [block["sessions"] for block in third["blocks"]] == [[porto], [rex]]
    assert [(a["version"], a["status"]) for a in day.store.sleep.adapters()] == [
        (3, "live"), (2, "retired"), (1, "retired")]


def test_a_private_chat_is_never_recorded_so_never_slept_on(day):
    backend = FakeChatBackend()
    Chat(backend, model="fake", store=day.store, private=True).reply(ZARA.said)
    recorded = Chat(backend, model="fake", store=day.store)
    recorded.reply(PORTO.said)
    assert sorted(s["id"] for s in day.store.sessions()) == [recorded.session_id]
    fake = learner()
    report = day.sleep(fake)
    assert report.status == "promoted" and report.sessions == [recorded.session_id]
    assert not [prompt for prompt in fake.night.prompts() if ZARA.said in prompt]
    manifest = json.dumps(day.manifest(1))
    assert PORTO.answer in manifest and ZARA.answer not in manifest


def test_a_night_whose_sessions_hold_nothing_to_ask_grows_no_block(day):
    day.session("Hello there!", "Thanks, bye.")
    fake = learner()
    report = day.sleep(fake)
    assert report.status == "nothing" and report.reason.startswith("the teacher found nothing")
    assert day.store.sleep.adapters() == [] and day.manifests() == {} and day.blocks_on_disk() == set()
    assert fake.night.closed and fake.night.calls["train_step"] == 0
    assert day.pending() == []  # the bare model holds it: the next night does not read it again
    later = day.session(PORTO.said)
    assert day.pending() == [later] and day.sleep(learner()).sessions == [later]


@pytest.mark.parametrize("invented", ["Paris, I think.", "You live in Paris."])
def test_an_answer_the_teacher_invents_is_never_taught(day, invented):
    """An invented answer is one the session does not make likely: the teacher gives it with the
    session in context and without alike, so it fails the grounding test, however it is worded."""
    day.session(PORTO.said)

    def inventing(turns, new_block):  # asked where the user lives, it names a city the user never named
        return invented if turns and PORTO.asked_by(turns[-1]["content"]) else None

    fake = learner(respond=inventing)
    report = day.sleep(fake)
    assert [g.text for g in fake.night.generated if PORTO.asked_by(asked(g.prompt))] == [invented] * 3
    assert report.status == "nothing" and report.reason.startswith("the teacher found nothing")
    assert fake.night.calls["train_step"] == 0 and day.manifests() == {}


def test_an_answer_the_session_makes_likely_is_taught_and_one_it_does_not_is_left_out(day):
    day.session(PORTO.said, REX.said)

    def inventing(turns, new_block):  # the dog's name it would give without the session too
        return "Your dog is called Bello." if turns and REX.asked_by(turns[-1]["content"]) else None

    report = day.sleep(learner(respond=inventing))
    manifest = day.manifest(report.adapter)
    assert report.status == "promoted"
    assert answers(manifest["taught"] + manifest["probes"], "reference") == {PORTO.answer}


def test_the_nights_prompts_read_after_the_days_system_prompt(day):
    day.session(PORTO.said)
    fake = learner()
    day.sleep(fake)
    framing = f"<|system|>{day.config.system_prompt}<|end|>\n"
    assert day.config.system_prompt and fake.night.generated and fake.night.trained
    assert all(prompt.startswith(framing) for prompt in fake.night.prompts())
    assert all(row.prompt.startswith(framing) for row in fake.night.trained)
    day.config = day.config.with_overrides(system_prompt="")
    day.session(REX.said)
    day.sleep(fake)
    assert fake.night.generated and not [prompt for prompt in fake.night.prompts() if "<|system|>" in prompt]


def test_a_night_about_what_the_live_model_already_answers_marks_it_learnt_without_a_block(day):
    first = day.session(PORTO.said)
    assert day.sleep(learner()).status == "promoted"
    before = day.manifests()
    again = day.session("As I said, " + PORTO.said)
    fake = learner()
    report = day.sleep(fake)
    assert report.status == "nothing" and "already answer" in report.reason
    assert fake.night.prompts(new_block=False)  # the teacher did read the session and answer its questions
    assert fake.night.calls["train_step"] == 0 and day.manifests() == before
    assert [(a["version"], a["status"], a["sessions"]) for a in day.store.sleep.adapters()] == [
        (1, "live", [first, again])]
    assert day.pending() == []


# -- promotion bookkeeping ---------------------------------------------------------------------------


def test_a_promoted_night_records_its_manifest_block_live_adapter_and_what_it_learnt(day):
    porto, pets = day.session(PORTO.said), day.session(REX.said, ZARA.said)
    fake = learner()
    report = day.sleep(fake, max_steps=12)  # enough draws that every taught question is trained on
    assert report.status == "promoted" and report.adapter == 1 and report.sessions == [porto, pets]
    assert (report.recall_before, report.recall_after) == (0.0, 1.0)

    manifest = day.manifest(1)
    [block] = manifest["blocks"]
    assert manifest["version"] == 1 and manifest["parent"] is None  # the bare model is no version
    assert set(manifest) == {"version", "parent", "blocks", "model", "weights", "verdict", "taught", "probes",
                             "material"}
    assert block["sessions"] == [porto, pets] and block["sleep_run"] == report.run
    assert fake.night.saved == [Path(block["path"])] and block["id"].startswith("night0001-")
    assert {layer.module.rsplit(".", 1)[-1] for layer in read_lora(Path(block["path"]))} == set(MLP)
    model = resolve_model(day.config.model, day.paths)
    assert (manifest["model"], manifest["weights"]) == (model.ref, model.weights)
    taught, held = manifest["taught"], manifest["probes"]
    assert all(set(p) == set(asdict(Probe("q", "a"))) for p in taught + held)
    assert answers(taught, "reference") == {PORTO.answer, REX.answer, ZARA.answer}  # every fact is taught
    assert len(held) == round((len(taught) + len(held)) * SETTINGS.probe_share)
    assert not answers(taught, "question") & answers(held, "question")  # the gate's probes were never trained on
    trained = {row.question for row in fake.night.trained if row.question}
    assert answers(taught, "question") <= trained and not answers(held, "question") & trained
    assert RECITE in trained and RECITE not in answers(taught + held, "question")  # recited, never kept or probed
    by_answer = {PORTO.answer: porto, REX.answer: pets, ZARA.answer: pets}
    assert all(p["session_id"] == by_answer[p["reference"]] and p["taught"] > -1 for p in taught + held)
    assert manifest["verdict"]["promote"] and manifest["verdict"]["probes"] >= len(held)
    material = manifest["material"]  # the bare model's answers to the everyday material, for later nights
    assert material["weights"] == f"{model.weights}/float32" and material["everyday"] == [UNKNOWN] * len(EVERYDAY)
    assert len(material["readings"]) == len(material["base"]) == len(READINGS)

    live = day.store.sleep.live_adapter()
    assert (live["version"], live["parent_version"], live["status"], live["path"], live["sleep_run_id"]) == (
        1, None, "live", str(adapters.manifest_path(day.paths.home, 1)), report.run)
    assert live["scores"] == manifest["verdict"]
    assert adapters.live_stack(day.store).adapters() == [Adapter(Path(block["path"]), 1.0)]
    assert day.store.sleep.adapters()[0]["sessions"] == [porto, pets]
    run = day.store.sleep.run(report.run)
    assert run["status"] == "complete" and run["report"]["status"] == "promoted"
    learnt_through = day.store.messages(pets)[-1]["id"]  # provenance is per message, not per session
    day.store.add_message(pets, "user", "One more thing.")
    assert [(r["session_id"], r["consolidated_through"]) for r in day.store.sleep.unconsolidated_sessions()] == [
        (pets, learnt_through)]


def test_a_night_whose_block_recalls_nothing_is_rejected_and_the_bare_model_stays_live(day):
    session = day.session(PORTO.said)
    report = day.sleep(learner(learns_after=None))
    assert report.status == "rejected" and report.reason.startswith("recall did not rise")
    assert day.store.sleep.live_adapter() is None and adapters.live_stack(day.store).blocks == ()
    [rejected] = day.store.sleep.adapters()
    assert (rejected["version"], rejected["status"], rejected["sessions"]) == (1, "rejected", [])
    assert rejected["scores"]["reason"] == report.reason == day.manifest(1)["verdict"]["reason"]
    assert day.store.sleep.run(report.run)["report"]["reason"] == report.reason
    assert day.pending() == [session]  # the next night tries again
    retried = day.sleep(learner())
    assert (retried.status, retried.adapter, retried.sessions) == ("promoted", 2, [session])
    assert [block["sessions"] for block in day.manifest(2)["blocks"]] == [[session]]  # not grown on the rejected one


def test_a_night_that_makes_earlier_nights_fade_is_rejected_and_the_live_adapter_kept(day):
    day.session(PORTO.said)
    assert day.sleep(learner()).status == "promoted"
    before = day.live_state()
    later = day.session(REX.said)
    report = day.sleep(learner(forgets=[PORTO], forgets_after=LEARNS))
    assert report.status == "rejected" and report.reason.startswith("earlier answers faded")
    assert report.retention == 0.0 and report.recall_after == 1.0
    live, versions, manifests, stack = day.live_state()
    assert (live, stack) == (before[0], before[3])
    assert manifests == {**before[2], "v0002.json": manifests["v0002.json"]}  # v1's bytes untouched
    assert [(a["version"], a["status"]) for a in versions] == [(2, "rejected"), (1, "live")]
    assert day.pending() == [later]


def test_a_night_that_costs_in_context_reading_is_rejected(day):
    day.session(PORTO.said, REX.said)
    fake = learner(reading_lost_after=LEARNS)
    report = day.sleep(fake)
    assert report.status == "rejected" and report.reason.startswith("in-context reading fell")
    assert (report.in_context_before, report.in_context_after, report.recall_after) == (1.0, 0.0, 1.0)
    assert day.store.sleep.live_adapter() is None
    assert day.manifest(1)["verdict"]["reading_change"] < -SETTINGS.reading_tolerance
    reading = [{"role": "user", "content": READINGS[1][0]}, {"role": "assistant", "content": "Got it."},
               {"role": "user", "content": READINGS[1][1]}]
    assert fake.answer(reading, new_block=True) == UNREAD  # the block saved is the one that cannot read


def test_the_gate_promotes_the_checkpoint_that_recalls_and_still_reads(day):
    day.session(PORTO.said, REX.said)
    fake = learner(reading_lost_after=LEARNS + 1)
    report = day.sleep(fake)
    judged = {c["steps"]: c for c in report.training["checkpoints"]}
    assert report.status == "promoted" and report.in_context_after == 1.0
    assert sorted(judged) == [1, 3, 4]
    assert [(judged[s]["promote"], judged[s]["chosen"]) for s in (1, 3, 4)] == [
        (False, False), (True, True), (False, False)]
    assert judged[1]["recall_after"] == 0.0 and judged[4]["recall_after"] == 1.0  # 4 recalls, and cannot read
    assert fake.strength() == pytest.approx(3.0)  # the chosen candidate is the block saved, not the last one trained
    assert day.manifest(1)["verdict"]["promote"] and day.store.sleep.live_adapter()["version"] == 1


def test_blocks_grown_on_other_weights_are_neither_worn_nor_grown_on(day, tmp_path):
    day.session(PORTO.said)
    assert day.sleep(learner()).status == "promoted"
    retrained = make_model_folder(tmp_path / "retrained")
    (retrained / "model.safetensors").write_bytes(b"other weights")
    day.config = day.config.with_overrides(model=str(retrained))
    session = day.session(REX.said)
    fake = learner()
    report = day.sleep(fake)
    assert fake.night.blocks == [] and fake.night.model_path == retrained.resolve()
    assert report.status == "promoted" and report.sessions == [session]
    second = day.manifest(2)
    assert not second["parent"] and [block["sessions"] for block in second["blocks"]] == [[session]]
    assert answers(second["taught"] + second["probes"], "reference") == {REX.answer}  # nothing of the old stack's
    assert second["material"]["weights"] == f"{resolve_model(str(retrained), day.paths).weights}/float32"


# -- what later nights replay ------------------------------------------------------------------------


def test_a_later_night_wears_the_live_stack_and_replays_earlier_nights(day):
    porto = day.session(PORTO.said)
    day.sleep(learner())
    first = day.manifest(1)
    day.session(REX.said)
    fake = learner()
    report = day.sleep(fake)
    assert report.status == "promoted" and report.retention == 1.0
    assert report.training["superseded"] == 0
    assert fake.night.blocks == [Adapter(Path(first["blocks"][0]["path"]), 1.0)]
    replayed = [row for row in fake.night.trained if row.question and PORTO.asked_by(row.question)]
    assert {row.question for row in replayed} == answers(first["taught"], "question")  # never night 1's probes
    assert {row.completion for row in replayed} == {PORTO.answer}
    verdict = day.manifest(2)["verdict"]
    assert verdict["old_change"] == pytest.approx(0.0, abs=0.01)  # night 1's answers were judged, and held
    assert not fake.night.scales  # the bare model's material came from the manifest, not generated again
    assert not [p for p in fake.night.prompts() if EVERYDAY[0] in p]
    second = day.manifest(2)
    assert second["parent"] == 1 and second["blocks"][0] == first["blocks"][0]
    assert second["material"] == first["material"]
    assert all(p in second["taught"] for p in first["taught"])
    assert all(p in second["probes"] for p in first["probes"])
    assert {p["session_id"] for p in second["probes"]} >= {porto}


def test_a_newer_session_that_says_otherwise_wins_and_the_older_answer_leaves_replay(day):
    day.session(PORTO.said)
    assert day.sleep(learner()).status == "promoted"
    day.session(LYON.said)
    fake = learner()
    report = day.sleep(fake)
    assert report.status == "promoted", report.reason
    assert report.training["superseded"] == 3  # night 1's taught answer and its two probes
    assert PORTO.answer not in {row.completion for row in fake.night.trained}
    assert LYON.answer in {row.completion for row in fake.night.trained}
    second = day.manifest(2)
    assert answers(second["taught"] + second["probes"], "reference") == {LYON.answer}
    fake.open(Path(day.config.model), blocks=adapters.live_stack(day.store).adapters())
    assert fake.answer([{"role": "user", "content": "Where do I live?"}], new_block=False) == LYON.answer


def test_an_earlier_answer_tonight_does_not_contradict_stays_beside_a_superseded_one(day):
    day.session(PORTO.said, REX.said)
    assert day.sleep(learner()).status == "promoted"
    day.session(LYON.said)
    fake = learner()
    report = day.sleep(fake)
    assert report.status == "promoted" and report.training["superseded"] == 3
    assert REX.answer in {row.completion for row in fake.night.trained}  # still replayed
    second = day.manifest(2)
    assert answers(second["taught"], "reference") == {REX.answer, LYON.answer}


@pytest.mark.parametrize("on_policy", [SeedingSettings.on_policy, 0.5])
def test_a_night_distils_the_teachers_answers_as_often_as_on_policy_leaves_them(day, on_policy):
    day.session(PORTO.said)
    fake = learner(learns_after=None)  # its samples stay "I don't know.", whatever it was trained on
    report = day.sleep(fake, on_policy=on_policy, max_steps=40)
    [taught] = answers(day.manifest(report.adapter)["taught"], "question")
    tonight = SETTINGS.batch_size - round(SETTINGS.batch_size * SETTINGS.anchor_share)  # the batch's rows not anchors
    assert len([row for row in fake.night.trained if row.question in (taught, RECITE)]) == 40 * tonight
    rows = [row.completion for row in fake.night.trained if row.question == taught]
    assert rows and set(rows) <= {PORTO.answer, UNKNOWN}  # the answer, or the student's sample
    assert abs(rows.count(PORTO.answer) / len(rows) - (1 - on_policy)) < 0.2


# -- dreaming ----------------------------------------------------------------------------------------


def test_a_night_that_dreams_journals_its_dreams_and_rehearses_under_noise(day):
    day.session(PORTO.said)
    day.sleep(learner())
    day.session(REX.said, ZARA.said)
    fake = learner()
    report = day.sleep(fake, dream=True)
    assert report.status == "promoted"
    journal = day.store.sleep.dreams(report.run)
    kept = [dream for dream in journal if dream["kept"]]
    assert len(journal) == report.dreaming["written"] and kept and len(kept) == report.dreaming["kept"]
    assert {dream["reference"] for dream in kept} <= {fact.answer for fact in FACTS}
    assert any(scales != [1.0] for scales in fake.night.scales)  # the old block was worn under noise
    assert fake.night.scales[-1] == [1.0]  # and the noise undone after writing
    assert dreaming.DREAMS.lr in fake.night.loaded_lrs  # the dreams train a copy with their own rate
    assert "dreamt" in [c["steps"] for c in report.training["checkpoints"]]  # the dreamt copy was judged too


def test_a_dreaming_nights_report_says_how_much_of_the_training_went_forward(day):
    day.session(PORTO.said)
    day.sleep(learner())
    day.session(REX.said, ZARA.said)
    report = day.sleep(learner(), dream=True)
    assert "dreamt" in [c["steps"] for c in report.training["checkpoints"]]
    assert kept_training(report.training)


def test_a_night_that_does_not_dream_writes_no_dreams(day):
    day.session(PORTO.said)
    fake = learner()
    report = day.sleep(fake)
    assert report.status == "promoted" and report.dreaming == {}
    assert day.store.sleep.dreams(report.run) == [] and fake.night.loaded_lrs == [None] * 4  # 3 judged, 1 saved
    assert [c["steps"] for c in report.training["checkpoints"]] == [1, 3, 4]


# -- crash safety ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "call", "error"), [
    ("generate", 1, FakeCrash("the engine fell over while the teacher wrote questions")),
    ("train_step", 3, FakeCrash("out of memory at step 3")),
    ("train_step", 2, KeyboardInterrupt()),
    ("load_new_block_state", 1, FakeCrash("the gate's first candidate would not load")),
    ("save_new_block", 1, FakeCrash("disk full while writing the block")),
])
def test_a_crash_mid_night_changes_nothing_live_and_the_next_night_succeeds(day, method, call, error):
    day.session(PORTO.said)
    assert day.sleep(learner()).status == "promoted"
    later = day.session(REX.said)
    before, blocks_before = day.live_state(), day.blocks_on_disk()
    fake = learner()
    fake.crash_on(method, call, error)
    with pytest.raises(type(error)):
        day.sleep(fake)
    assert fake.night.calls[method] == call and fake.night.closed
    run = day.store.sleep.last_run()
    assert run["status"] == "failed" and run["error"] == (str(error) or type(error).__name__)
    assert day.live_state() == before and day.pending() == [later]
    left = day.blocks_on_disk() - blocks_before
    if method == "save_new_block":  # the half-written folder stays on disk, and no version names it
        assert len(left) == 1 and not any(name in blob.decode() for name in left for blob in day.manifests().values())
    else:
        assert left == set()
    report = day.sleep(learner())
    assert (report.status, report.adapter, report.sessions) == ("promoted", 2, [later])
    assert not left & day.blocks_on_disk()  # the next night swept what no manifest names


def test_a_run_left_running_by_a_killed_sleep_is_marked_interrupted(day):
    killed = day.store.sleep.start_run()  # as a sleep killed with SIGKILL leaves its run
    day.session(PORTO.said)
    report = day.sleep(learner())
    assert (day.store.sleep.run(killed)["status"], day.store.sleep.run(killed)["error"]) == ("failed", "interrupted")
    assert day.store.sleep.run(report.run)["status"] == "complete"


# -- forgetting a session -----------------------------------------------------------------------------


def worn(day: Day) -> FakeTrainer:
    """The fake wearing the live stack, as the chat would."""
    return FakeTrainer(FACTS).open(resolve_model(day.config.model, day.paths).path,
                                   blocks=adapters.live_stack(day.store).adapters())


def recalls(fake: FakeTrainer, fact: Fact) -> bool:
    return fake.answer([{"role": "user", "content": fact.questions[0]}], new_block=False) == fact.answer


def files_holding(home: Path, text: str) -> list[str]:
    needle = text.encode()
    return sorted(str(path.relative_to(home)) for path in home.rglob("*")
                  if path.is_file() and needle in path.read_bytes())


def two_nights(day: Day) -> tuple[int, int, int]:
    """Night 1 learns Porto and Rex (two sessions), night 2 Zara; both promoted."""
    porto, rex = day.session(PORTO.said), day.session(REX.said)
    assert day.sleep(learner()).status == "promoted"
    zara = day.session(ZARA.said)
    assert day.sleep(learner()).status == "promoted"
    return porto, rex, zara


def test_forgetting_a_session_drops_every_version_it_reached_and_relearns_the_others_night_by_night(day):
    porto, rex, zara = two_nights(day)
    assert recalls(worn(day), PORTO) and files_holding(day.paths.home, "Porto")
    old_blocks = day.blocks_on_disk()

    done = forget.forget(day.paths, day.store, porto)
    assert (done.messages, done.versions, done.nights) == (2, [1, 2], [[rex], [zara]])
    assert day.store.sleep.live_adapter() is None and old_blocks.isdisjoint(day.blocks_on_disk())
    assert [(a["version"], a["status"]) for a in day.store.sleep.adapters()] == [(2, "forgotten"), (1, "forgotten")]
    assert day.manifests() == {} and day.pending() == [rex, zara]
    assert sorted(s["id"] for s in day.store.sessions()) == [rex, zara] and day.store.search("Porto") == []
    assert files_holding(day.paths.home, "Porto") == []  # the database's free pages and log included
    assert day.store.sleep.forgets()[0]["status"] == "relearning"

    for sessions in done.nights:  # what `somnus forget` runs next, one night per dropped block
        report = sleep_cycle(day.paths, day.config, day.store, settings=SETTINGS, sessions=sessions,
                             open_trainer=learner().open)
        assert (report.status, report.sessions) == ("promoted", sessions)
    forget.finished(day.store, done)
    chat = worn(day)
    assert not recalls(chat, PORTO) and recalls(chat, REX) and recalls(chat, ZARA)
    assert [block["sessions"] for block in day.manifest(4)["blocks"]] == [[rex], [zara]]
    assert files_holding(day.paths.home, "Porto") == [] and day.store.sleep.forgets()[0]["status"] == "done"


def test_forgetting_the_newest_nights_only_session_keeps_the_older_version_live(day):
    porto, rex, zara = two_nights(day)
    orphan = adapters.block_dir(day.paths.home, "night0009-killed")  # a save killed before its manifest
    orphan.mkdir()
    (orphan / "adapter_model.safetensors").write_text(ZARA.answer)
    done = forget.forget(day.paths, day.store, zara)
    assert (done.versions, done.nights) == ([2], [])
    assert day.store.sleep.live_adapter()["version"] == 1 and day.pending() == []
    chat = worn(day)
    assert recalls(chat, PORTO) and recalls(chat, REX) and not recalls(chat, ZARA)
    assert files_holding(day.paths.home, "Zara") == [] and set(day.manifests()) == {"v0001.json"}


def test_forgetting_a_session_no_block_learnt_leaves_the_adapters_alone(day):
    porto, rex, zara = two_nights(day)
    later = day.session(LYON.said)
    before = day.live_state()
    done = forget.forget(day.paths, day.store, later)
    assert (done.messages, done.versions, done.files) == (2, [], 0)
    assert day.live_state() == before and files_holding(day.paths.home, "Lyon") == []


def test_a_rejected_version_that_learnt_the_session_is_deleted_too_and_the_live_one_kept(day):
    day.session(PORTO.said)
    assert day.sleep(learner()).status == "promoted"
    rex = day.session(REX.said)
    assert day.sleep(learner(learns_after=None)).status == "rejected"
    done = forget.forget(day.paths, day.store, rex)
    assert done.versions == [2] and day.store.sleep.live_adapter()["version"] == 1
    assert set(day.manifests()) == {"v0001.json"} and files_holding(day.paths.home, "Rex") == []


def test_forget_waits_for_no_night_and_refuses_while_one_sleeps(day):
    porto = day.session(PORTO.said)
    with sleep_lock(day.paths), pytest.raises(SleepBusy):
        forget.forget(day.paths, day.store, porto)
    assert sorted(s["id"] for s in day.store.sessions()) == [porto]


KILL_POINTS = {  # where the forget's process dies, as `kill -9` would kill it
    "inside the store's transaction": "assistant.store.sleep.now",
    "after the transaction, before any file": "assistant.forget._finish_files",
    "after the first file deleted": "shutil.rmtree",
    "after the files, before the database is rewritten": "assistant.store.store.Store.scrub",
    "after everything, before the forget is marked": "assistant.store.sleep.SleepLedger.set_forget_status",
}
KILLER = """
import os, signal, sys, functools, importlib
from unittest import mock
from assistant.config import load_config, open_paths
from assistant.store import open_store
from assistant import forget
home, target, session, after = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "after"
module, name = target.rsplit(".", 1)
try:
    owner = importlib.import_module(module)
except ModuleNotFoundError:
    module, cls = module.rsplit(".", 1)
    owner = getattr(importlib.import_module(module), cls)
real = getattr(owner, name)
def die(*args, **kwargs):
    if after:
        real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
paths = open_paths(home)
with open_store(paths, load_config(paths)) as store, mock.patch.object(owner, name, die):
    forget.forget(paths, store, session)
"""


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_forget_killed_at_any_point_leaves_the_old_state_or_the_next_start_finishes_the_new(day, point):
    porto, rex, zara = two_nights(day)
    before = day.live_state()
    day.store.close()
    target = KILL_POINTS[point]
    killed = subprocess.run([sys.executable, "-c", KILLER, str(day.paths.home), target, str(porto),
                             "after" if target == "shutil.rmtree" else "before"], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    day.store = open_store(day.paths, day.config)
    if point == "after the transaction, before any file":  # a forget or a night that holds the lock is left alone
        with sleep_lock(day.paths):
            assert forget.finish_interrupted(day.paths, day.store) == [] and day.blocks_on_disk()
    told = forget.finish_interrupted(day.paths, day.store)  # what every start does first
    assert day.store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    if point == "inside the store's transaction":
        assert told == [] and day.live_state() == before and recalls(worn(day), PORTO)
        assert sorted(s["id"] for s in day.store.sessions()) == [porto, rex, zara]
        return
    assert told == [f"finished forgetting session {porto} (it was interrupted): its adapter blocks and text are gone"]
    assert forget.finish_interrupted(day.paths, day.store) == [] and day.store.sleep.forgets()[0]["status"] == "relearning"
    assert day.store.sleep.live_adapter() is None and adapters.live_stack(day.store).blocks == ()
    assert sorted(s["id"] for s in day.store.sessions()) == [rex, zara] and day.pending() == [rex, zara]
    assert files_holding(day.paths.home, "Porto") == [] and day.manifests() == {}
    assert not recalls(worn(day), PORTO)
