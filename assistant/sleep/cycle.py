"""One night, in the paper's words: teach, consolidate, dream, gate, promote (or keep the old).

Runs in the sleep process (``assistant.sleep.runner``), never in the chat's: grows a zero-init block
on the frozen live stack for the sessions no live adapter has learnt, and trains it to answer without
a session as the teacher answers with it. Each file it writes appears whole or not at all and the
promotion is one transaction, so a killed sleep leaves the store and the live adapter as they were.
Each stage is a function of the night; one that finds nothing to do sets the report, and it ends.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import replace

from assistant import adapters
from assistant.config import Config, Paths
from assistant.sleep import dreaming, gate, reference, supersede, teach as teaching
from assistant.sleep.lessons import said
from assistant.sleep.night import MIN_PROBES, Night, SleepReport, SleepSettings, open_night
from assistant.sleep.seeding import Row, SeedingSettings, consolidate as train
from assistant.store import Store
from backends.base import BlockTrainer

__all__ = ["SleepReport", "SleepSettings", "sleep_cycle"]


def teach(night: Night) -> None:
    """The teacher writes and answers tonight's questions; earlier answers tonight contradicts leave."""
    night.say("teach", 0.02, f"reading {len(night.sessions)} session(s) and writing questions about them")
    tonight = {sid: [m for m in night.store.messages(sid) if m["status"] == "complete"] for sid in night.sessions}
    s = night.settings
    lessons = teaching.lessons_of(night.trainer, night.render, list(tonight.items()), lists=s.question_lists,
                                  grounding=s.grounding, rng=night.rng, until=night.widening_deadline())
    if not lessons:
        night.report = night.nothing("the teacher found nothing in these sessions that the model does not already answer")
        return
    night.lessons, held = teaching.hold_out(lessons, s.probe_share, night.rng)
    night.probes = held + teaching.rephrased(night.trainer, night.render, night.lessons, held, s.grounding)
    earlier = night.earlier_answers(asked=night.questions())
    night.say("teach", 0.08, f"reading {len(earlier)} earlier answer(s) against tonight's sessions")
    then = {sid: said(night.store.messages(sid)) for sid in {p.session_id for p in earlier}}
    stale = supersede.superseded(night.trainer, night.render, earlier, then,
                                 [(sid, said(messages)) for sid, messages in tonight.items()], s.grounding)
    night.earlier = [p for p in earlier if p.question not in stale]
    # A small night has too few rephrasings to hold out: it is judged on what it was taught as well.
    held_out = len(night.probes) >= MIN_PROBES
    night.asked = night.probes if held_out else night.probes + [lesson.probe() for lesson in night.lessons]
    night.rows = teaching.rows(night.trainer, night.render, list(tonight.items()), night.lessons, night.replayed())
    night.training.update(superseded=len(stale),
                          judged_on="held-out questions" if held_out else "taught and held-out questions")


def consolidate(night: Night) -> None:
    """Knowledge Seeding on tonight's rows, replay and everyday anchors, within the night's budget."""
    night.say("consolidate", 0.15, "reading the everyday material with the model as it was")
    weights = f"{night.model.weights}/{night.trainer.precision}"  # the bare model's likelihoods depend on both
    night.material = reference.bare_answers(night.trainer, night.render, night.material_source, night.scales,
                                            weights, night.stack.extra.get("material"))
    night.readings = reference.readings(night.render, night.material_source, night.material)
    night.anchors = [Row(p, p, a, kind="anchor")
                     for p, a in reference.anchors(night.render, night.material_source, night.material)]
    started = time.monotonic()
    night.before = gate.measure(night.trainer, night.render, night.asked, night.earlier, night.readings,
                                new_block=False)
    judging = time.monotonic() - started  # what each candidate will cost the gate
    s = night.settings
    seeding = SeedingSettings(steps=s.max_steps, batch_size=s.batch_size, replay_share=s.replay_share,
                              anchor_share=s.anchor_share, lti_every=2 if s.imitation else 0, seed=s.seed + night.run_id)
    deadline = time.monotonic() + night.left() - judging * (seeding.checkpoints + 2 * s.dream + 1) - 10
    log = train(night.trainer, night.rows + night.anchors, seeding, deadline=deadline,
                progress=lambda step, total: night.say("consolidate", 0.2 + 0.6 * step / total, f"step {step}/{total}"),
                checkpoint=lambda step: night.candidates.__setitem__(f"step {step}", night.trainer.new_block_state()))
    night.training.update(log.summary())


def dream(night: Night) -> None:
    """Stage 2 (an ablation unless ``settings.dream``): rehearse dreams on a copy of the block."""
    if night.settings.dream:
        night.say("dream", 0.8, "dreaming about tonight's sessions")
        night.dreaming = dreaming.dream_night(night)


def judge(night: Night) -> None:
    """Each candidate block against the pre-sleep model; the one that gains most among those that pass."""
    verdicts = []
    for index, (name, state) in enumerate(night.candidates.items()):
        night.say("gate", 0.85 + 0.1 * index / len(night.candidates), f"judging {name}")
        night.trainer.load_new_block_state(state)
        after = gate.measure(night.trainer, night.render, night.asked, night.earlier, night.readings, new_block=True)
        verdicts.append((gate.decide(night.before, after, night.asked, night.earlier, night.readings,
                                     retention_tolerance=night.settings.retention_tolerance,
                                     reading_tolerance=night.settings.reading_tolerance), name, state))
    night.verdict, name, night.chosen = max(verdicts, key=lambda v: (v[0].promote, v[0].gain_lower))
    night.training["checkpoints"] = [gate.candidate_record(v, n, n == name) for v, n, _ in verdicts]
    if "dreamt" in night.candidates:
        night.dreaming.update(dreaming.outcome([(v, n) for v, n, _ in verdicts], name))


def promote(night: Night) -> None:
    """Save the chosen block and the grown stack's manifest; make it live if the gate said so."""
    ledger, verdict = night.store.sleep, night.verdict
    night.trainer.load_new_block_state(night.chosen)
    block_id = f"night{night.run_id:04d}-{secrets.token_hex(3)}"
    block = adapters.Block(block_id, adapters.block_dir(night.paths.home, block_id), tuple(night.sessions), night.run_id)
    night.trainer.save_new_block(block.path)
    version = ledger.next_version()
    manifest = adapters.save_stack(night.paths.home, replace(night.stack.grown(block, version), extra=night.manifest()))
    adapter_id = ledger.add_adapter(version, str(manifest), parent_version=night.stack.version or None,
                                    sleep_run_id=night.run_id, scores=verdict.record())
    if verdict.promote:
        ledger.promote(adapter_id, night.learnt())
    else:
        ledger.set_adapter_status(adapter_id, "rejected")
    night.report = night.judged(version)


STAGES = (teach, consolidate, dream, judge, promote)


def sleep_cycle(paths: Paths, config: Config, store: Store, *, settings: SleepSettings = SleepSettings(),
                progress: Callable[[str, float, str], None] = lambda stage, fraction, message: None,
                open_trainer: Callable[..., BlockTrainer] | None = None, dream_reward=None, sessions=None) -> SleepReport:
    """Run one night and record it; the caller holds the sleep lock. ``sessions``: learn only these of
    those not yet learnt. ``dream_reward`` replaces the rehearsal's reward (tests give a bad one)."""
    started, ledger = time.time(), store.sleep
    ledger.fail_interrupted_runs()
    run_id = ledger.start_run()
    try:
        night = open_night(paths, config, store, run_id, settings, progress, open_trainer, dream_reward, sessions)
        report = night if isinstance(night, SleepReport) else _stages(night)
    except BaseException as error:
        ledger.finish_run(run_id, "failed", error=str(error) or type(error).__name__)
        raise
    report.run, report.seconds = run_id, round(time.time() - started, 1)
    ledger.finish_run(run_id, "complete", report=report.record())
    progress("done", 1.0, report.reason)
    return report


def _stages(night: Night) -> SleepReport:
    try:
        for stage in STAGES:
            if night.report is None:
                stage(night)
        return night.report
    finally:
        night.trainer.close()

