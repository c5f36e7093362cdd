"""Stage 2 of the night: the model dreams about what it learnt and rehearses the most useful dreams.

On a copy of the consolidated block, tonight's sessions and a few older ones are dreamt about
under noise over the older blocks (``dreams``); each rehearsal step is followed by a distillation
step on the night's replay and anchor rows, so rehearsing tonight's memories holds the rest where it
was. The dreamt block becomes one more candidate for the gate, beside the consolidation's.
"""

from __future__ import annotations

from dataclasses import replace

from assistant.sleep import dreams, seeding
from assistant.sleep import teach as teaching
from assistant.sleep.gate import Verdict
from assistant.sleep.night import Night

DREAMS = dreams.DreamSettings()


def dream_night(night: Night) -> dict:
    trainer, rng = night.trainer, night.rng
    tonight = {lesson.session_id: list(lesson.context) for lesson in night.lessons}
    memories = [dreams.Memory(sid, context) for sid, context in tonight.items()]
    older_ids = sorted({sid for block in night.stack.blocks for sid in block.sessions} - set(tonight))
    for sid in sorted(rng.sample(older_ids, min(len(older_ids), DREAMS.older_sessions))):
        if night.exists(sid):
            contexts = teaching.session_contexts(trainer, night.render, night.store.messages(sid))
            memories += [dreams.Memory(sid, contexts[0], "older")] if contexts else []
    last = list(night.candidates.values())[-1]
    trainer.load_new_block_state(last, lr=DREAMS.lr)  # the copy, with its own optimiser
    keep = [row for row in night.rows if row.kind == "replay"] + night.anchors
    marker = seeding.end_of_turn(trainer)
    distil = seeding.SeedingSettings(batch_size=night.settings.batch_size)

    def anchor() -> float:
        return seeding.distill_step(trainer, rng.sample(keep, min(len(keep), distil.batch_size)), distil, rng, marker)

    log = dreams.dream(trainer, night.render, memories, scales=night.scales,
                       held_out={p.question for p in night.probes + night.earlier},
                       settings=replace(DREAMS, seed=night.settings.seed + night.run_id),
                       reward=night.dream_reward or seeding.imitation(distil.gamma, distil.threshold),
                       anchor=anchor if keep else None,
                       progress=lambda message, fraction: night.say("dream", 0.8 + 0.05 * fraction, message))
    night.store.sleep.add_dreams(night.run_id, [d.journal() for d in log.dreams])
    if any(d.kept for d in log.dreams):
        night.candidates["dreamt"] = trainer.new_block_state()
    return log.summary()


def outcome(verdicts: list[tuple[Verdict, str]], chosen: str) -> dict:
    """What the report says of dreaming: whether the dreamt block won, and each side's recall."""
    consolidated = max((v for v, name in verdicts if name != "dreamt"), key=lambda v: (v.promote, v.gain_lower))
    dreamt = next(v for v, name in verdicts if name == "dreamt")
    return {"chosen": "dreamt" if chosen == "dreamt" else "consolidated", "recall_dreamt": dreamt.recall_after,
            "recall_consolidated": consolidated.recall_after}
