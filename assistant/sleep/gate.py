"""The gate: a new adapter goes live only if it recalls more and forgets nothing that matters.

In real use there is no gold answer. The probes are questions the teacher wrote about tonight's
sessions and that training never saw; the teacher, with the session in its context, gives the
reference answer. Recall is the share of probes the model answers *without* the session the way the
teacher answers *with* it. Retention re-asks earlier nights' probes and the prompts they learnt
(stored with their answers in the adapter manifests, less those tonight's sessions supersede) and
measures in-context reading on fresh generated stories, before and after (and against the reading
of the model before the stack's first night, so losses cannot add up night by night).

An answer matches its reference when they are equal after ``normalise_answer`` (case, spacing, end
punctuation): strict on purpose, since a near miss on a name is a wrong name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from assistant.nano import evaluate
from assistant.sleep.lessons import user_turn
from assistant.sleep.rewards import normalise_answer
from backends.base import BlockTrainer, Sampling

GREEDY = Sampling(max_tokens=48, temperature=0.0)


@dataclass(frozen=True)
class Probe:
    """A question about a session and the teacher's answer with the session in context."""

    question: str
    reference: str
    session_id: int | None = None


@dataclass(frozen=True)
class GateSettings:
    retention_tolerance: float = 0.05  # old recall may fall by at most this share of its value
    retention_probes: int = 64  # earlier nights' questions asked for it (a seeded sample beyond that)
    # In-context accuracy may fall by at most 1.5 points on the gate's sessions, so that it falls by
    # less than 2 on sessions the gate never read. The reading that picks a candidate also judges it,
    # and one reading tells candidates apart poorly: bench night 1 (sleep seed 1234), the nine read
    # 94.3-97.5% on these 72 sessions and 95.8-97.6% on the bench's 40 others, in no common order.
    # With 2 points, the bench's five nights (nights 1 and 4 live) lost 2.4 on those 40.
    in_context_tolerance: float = 0.015
    # Fresh generated sessions for the in-context check: 36 ask about 145 questions, so one answer
    # moved the measure by 0.7 points (with 12, one flip was 2.4: the whole tolerance). 72 halve
    # that: with 36, nights the gate held within 2 points of the first reading lost 3 on the
    # bench's 40 other sessions, and a block that met the CR bar missed the floor by one answer.
    in_context_sessions: int = 72
    seed: int = 4242
    # How much of the night's block may go live: each checkpoint is also judged with its change to
    # the weights scaled down (interpolating towards the pre-sleep model, as WiSE-FT does), which
    # trades a little recall for in-context reading. On the bench's first night (sleep seeds 0 and
    # 3, 360 steps) 0.85 of the block kept in-context reading within 0.7 and 4.2 points where the
    # whole block lost 3.5 and 5.6, recalling 53% and 57% of held-out phrasings against 60% and 57%.
    # 0.4 and 0.55 were tried twice for nights of one bAbI story, which lose 2-6 points at 0.7 and
    # above: two and three of ten nights went live, and the bench's in-context drop rose to 3.6
    # and 3.0 points, over the bar of 2.
    scales: tuple[float, ...] = (0.7, 0.85, 1.0)


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str
    recall_before: float
    recall_after: float
    retention: float
    old_recall_before: float | None
    old_recall_after: float | None
    in_context_before: float
    in_context_after: float
    probes: int

    def record(self) -> dict:
        return asdict(self)


def fits(trainer: BlockTrainer, prompt: str) -> bool:
    """Whether ``prompt`` leaves room for a greedy answer in the model's context."""
    return len(trainer.encode(prompt)) + GREEDY.max_tokens <= trainer.context_length


def matches(answer: str, reference: str) -> bool:
    return normalise_answer(answer) == normalise_answer(reference)


def alone(trainer: BlockTrainer, probes: Sequence[Probe]) -> list[str]:
    """Each probe's question as the model is asked it: in a fresh chat, no session in context."""
    return [trainer.render_chat(user_turn(p.question)) for p in probes]


def hits(trainer: BlockTrainer, probes: Sequence[Probe], *, new_block: bool) -> tuple[bool, ...]:
    """Which probes are answered, with no session in context, as the teacher answered them."""
    if not probes:
        return ()
    answers = trainer.generate(alone(trainer, probes), GREEDY, new_block=new_block)
    return tuple(matches(a, p.reference) for a, p in zip(answers, probes))


def recall(trainer: BlockTrainer, probes: Sequence[Probe], *, new_block: bool) -> float:
    """Share of probes answered, with no session in context, as the teacher answered them."""
    answered = hits(trainer, probes, new_block=new_block)
    return sum(answered) / len(answered) if answered else 0.0


def in_context(trainer: BlockTrainer, settings: GateSettings, *, new_block: bool) -> float:
    """Reading accuracy with the facts in context, on fresh generated held-out sessions."""
    sessions = evaluate.heldout_sessions(settings.seed, settings.in_context_sessions)
    contexts, values = [], []
    for session in sessions:
        for probe in session.probes:
            context = trainer.render_chat(session.chat()[: probe.at])
            if fits(trainer, context):
                contexts.append(context)
                values.append(probe.value)
    answers = trainer.generate(contexts, GREEDY, new_block=new_block)
    return sum(evaluate.answered(a, v) for a, v in zip(answers, values)) / max(len(values), 1)


@dataclass(frozen=True)
class Measurement:
    """What the gate measures of one model: tonight's recall, old recall, in-context reading."""

    recall: float
    old_recall: float | None
    in_context: float | None  # None: not read (``measure(..., reading=False)``)
    old_hits: tuple[bool, ...] = ()  # which of the old probes it answers (``old_recall`` is their share)


def measure(
    trainer: BlockTrainer, new_probes: Sequence[Probe], old_probes: Sequence[Probe], settings: GateSettings,
    *, new_block: bool, reading: bool = True,
) -> Measurement:
    """The live stack (``new_block=False``) or a candidate (``True``) on the gate's probes, and
    on in-context reading unless ``reading`` is off (the costly part, added later if needed)."""
    old = hits(trainer, old_probes, new_block=new_block)
    return Measurement(
        recall(trainer, new_probes, new_block=new_block),
        sum(old) / len(old) if old else None,
        in_context(trainer, settings, new_block=new_block) if reading else None,
        old,
    )


def kept_share(old_recall_before: float | None, old_recall_after: float | None, old_hits_after: Sequence[bool] = (),
               known: Sequence[bool] = ()) -> float:
    """Retention: the share of old recall a candidate keeps, against tonight's live model and
    against ``known`` (see ``decide``), whichever is less."""
    share = 1.0 if not old_recall_before else (old_recall_after or 0.0) / old_recall_before
    if any(known) and old_hits_after:
        share = min(share, sum(hit for hit, was in zip(old_hits_after, known) if was) / sum(known))
    return share


def decide(before: Measurement, after: Measurement, probes: int, settings: GateSettings,
           reading_base: float | None = None, known: Sequence[bool] = ()) -> Verdict:
    """Promote only if recall rises, old recall keeps its value and in-context reading holds.

    Reading holds against tonight's live model and against ``reading_base``, the model's reading
    before its first night: judged only night by night, small losses add up (the bench's five
    generated nights each passed, and together lost 3.6 points against a bar of 2). Old recall
    likewise holds against tonight's live model and against ``known``, which of the old probes
    the stack has answered on some night since theirs: two nights that each kept 95-96% of
    tonight's old recall left the bench 80% of night 1's facts."""
    retention = kept_share(before.old_recall, after.old_recall, after.old_hits, known)
    if not probes:
        promote, reason = False, "no held-out question to judge recall by: kept the live adapter"
    elif after.recall <= before.recall:
        promote, reason = False, f"recall did not rise ({before.recall:.0%} -> {after.recall:.0%})"
    elif retention < 1 - settings.retention_tolerance:
        promote, reason = False, f"old memories faded (retention {retention:.0%})"
    elif after.in_context < (reading := max(before.in_context, reading_base or 0.0)) - settings.in_context_tolerance:
        promote, reason = False, f"in-context reading fell ({reading:.0%} -> {after.in_context:.0%})"
    else:
        promote, reason = True, f"recall {before.recall:.0%} -> {after.recall:.0%}, retention {retention:.0%}"
    return Verdict(promote, reason, before.recall, after.recall, retention, before.old_recall, after.old_recall,
                   before.in_context, after.in_context, probes)


def better(candidate: Verdict, incumbent: Verdict) -> bool:
    """Whether ``candidate`` should go live instead of ``incumbent``: promotable, and either the
    incumbent is not or the candidate recalls strictly more (a tie keeps the incumbent)."""
    if not candidate.promote:
        return False
    return not incumbent.promote or candidate.recall_after > incumbent.recall_after


def judge(
    trainer: BlockTrainer, new_probes: Sequence[Probe], old_probes: Sequence[Probe], settings: GateSettings
) -> Verdict:
    """Measure the live stack (new block off) and the candidate (new block on), then decide."""
    before = measure(trainer, new_probes, old_probes, settings, new_block=False)
    after = measure(trainer, new_probes, old_probes, settings, new_block=True)
    return decide(before, after, len(new_probes), settings)


def kept_training(training: dict) -> str | None:
    """How much of the night's consolidation the gate let go forward (and dreaming, if it ran,
    started from), for reports: "240 of 360 steps, 0.85 of the block" (None when the report
    predates checkpoints)."""
    judged = training.get("checkpoints") or []
    chosen = [c for c in judged if c.get("chosen")]
    if not chosen:
        return None
    return f"{chosen[0]['steps']} of {max(c['steps'] for c in judged)} steps, {chosen[0]['scale']:g} of the block"
