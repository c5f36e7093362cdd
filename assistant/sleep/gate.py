"""The gate: a block goes live only if the model learnt tonight's answers and lost nothing else.

Everything is read from likelihoods, never by matching strings: ``logprob`` is the log-probability
a model gives an answer after a prompt, summed over the answer's tokens and its end of turn, so it
weighs a 3-token and a 30-token answer by the same evidence, in any language. Three questions:

- recall: asked a held-out probe *without* the session, is the candidate surer of the teacher's
  answer than the pre-sleep model? A paired one-sided test over the probes (the mean gain must
  clear its own noise), not a one-probe margin; and more probes must be recalled (below), so a
  block that only nudges its answers' likelihood is not worth a version;
- retention: are earlier nights' answers as likely as before (mean change within tolerance)?
- reading: with a text in context, is the candidate as sure as the model before the stack's first
  night of that model's own answers (``material.readings``)? Held against the bare model, never
  against last night's, so small losses cannot add up night after night.

The shares shown to the user are the same likelihoods seen per probe: a probe counts as recalled
when the model without the session is at most ``RECALL_MARGIN`` nats less sure of the answer than
the teacher with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from assistant.sleep.seeding import end_of_turn, summed_logprobs
from backends.base import BlockTrainer

RECALL_MARGIN = math.log(4)  # recalled: at most 4 times less sure of the whole answer than the teacher
_T95 = {1: 6.31, 2: 2.92, 3: 2.35, 4: 2.13, 5: 2.02, 6: 1.94, 7: 1.89, 8: 1.86, 9: 1.83, 10: 1.81,
        12: 1.78, 15: 1.75, 20: 1.72, 30: 1.70}  # between rows the smaller df's (larger) value  # Student's t, one-sided 95%, by degrees of freedom


@dataclass(frozen=True)
class Probe:
    """A question about a session, the teacher's answer with the session in context, and how sure
    the teacher was of it (``taught``, its log-probability)."""

    question: str
    reference: str
    session_id: int | None = None
    taught: float = 0.0


def logprob(trainer: BlockTrainer, prompts: Sequence[str], answers: Sequence[str], *, new_block: bool,
            batch: int = 8) -> list[float]:
    """Log-probability of each answer (and its end of turn) after its rendered prompt."""
    marker, result = end_of_turn(trainer), []
    for start in range(0, len(prompts), batch):
        result += [total for total, _ in summed_logprobs(
            trainer, [trainer.encode(p) for p in prompts[start:start + batch]],
            [trainer.encode(a + marker) for a in answers[start:start + batch]], new_block=new_block)]
    return result


def one_sided_lower(values: Sequence[float]) -> float:
    """The lower end of a one-sided 95% interval for the mean of ``values`` (Student's t)."""
    n = len(values)
    if n < 2:
        return -math.inf
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T95[max(df for df in _T95 if df <= n - 1)] if n - 1 <= 40 else 1.645  # the nearer smaller df: never looser
    return mean - t * sd / math.sqrt(n)


@dataclass(frozen=True)
class Measurement:
    """One model's log-probabilities of tonight's probes, earlier nights' answers and the readings."""

    new: tuple[float, ...]
    old: tuple[float, ...]
    reading: tuple[float, ...]


@dataclass(frozen=True)
class Readings:
    """The in-context check's prompts and the bare model's answers and log-probabilities of them."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    base: tuple[float, ...]


def measure(trainer: BlockTrainer, render: Callable, probes: Sequence[Probe], old: Sequence[Probe],
            readings: Readings, *, new_block: bool) -> Measurement:
    asked = [render([{"role": "user", "content": p.question}]) for p in list(probes) + list(old)]
    scores = logprob(trainer, asked, [p.reference for p in list(probes) + list(old)], new_block=new_block)
    read = logprob(trainer, readings.prompts, readings.answers, new_block=new_block)
    return Measurement(tuple(scores[:len(probes)]), tuple(scores[len(probes):]), tuple(read))


def recalled(scores: Sequence[float], probes: Sequence[Probe]) -> float:
    """The share of probes answered without the session nearly as surely as the teacher did with it."""
    return sum(s >= p.taught - RECALL_MARGIN for s, p in zip(scores, probes)) / len(probes) if probes else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str
    recall_before: float
    recall_after: float
    retention: float  # share of earlier answers recalled after, of those recalled before
    in_context_before: float  # share of readings within RECALL_MARGIN of the bare model
    in_context_after: float
    gain: float  # mean nats gained on tonight's probes
    gain_lower: float  # its one-sided 95% lower bound
    old_change: float  # mean nats lost or gained on earlier answers
    reading_change: float  # mean nats against the bare model, with the text in context
    probes: int

    def record(self) -> dict:
        return asdict(self)


def decide(before: Measurement, after: Measurement, probes: Sequence[Probe], old: Sequence[Probe],
           readings: Readings, *, retention_tolerance: float, reading_tolerance: float) -> Verdict:
    """Promote when recall rose beyond its noise, earlier answers kept their likelihood and reading
    held against the bare model."""
    gains = [a - b for a, b in zip(after.new, before.new)]
    lower = one_sided_lower(gains)
    old_change = _mean([a - b for a, b in zip(after.old, before.old)])
    reading_change = _mean([a - b for a, b in zip(after.reading, readings.base)])
    was = [b >= p.taught - RECALL_MARGIN for b, p in zip(before.old, old)]
    still = [w and a >= p.taught - RECALL_MARGIN for w, a, p in zip(was, after.old, old)]
    retention = sum(still) / sum(was) if any(was) else 1.0
    share = lambda scores: sum(s >= b - RECALL_MARGIN for s, b in zip(scores, readings.base)) / max(len(readings.base), 1)
    if len(probes) < 2:
        promote, reason = False, "too few held-out questions to judge recall by: kept the live adapter"
    elif lower <= 0:
        promote, reason = False, f"recall did not rise beyond its noise (gain {_mean(gains):+.2f} nats, lower bound {lower:+.2f})"
    elif recalled(after.new, probes) <= recalled(before.new, probes):
        promote, reason = False, (f"no more questions recalled ({recalled(before.new, probes):.0%}), though their "
                                  f"answers grew likelier (+{_mean(gains):.2f} nats)")
    elif old and old_change < -retention_tolerance:
        promote, reason = False, f"earlier answers faded ({old_change:+.2f} nats on average)"
    elif reading_change < -reading_tolerance:
        promote, reason = False, f"in-context reading fell ({reading_change:+.2f} nats against the bare model)"
    else:
        promote, reason = True, (f"recall {recalled(before.new, probes):.0%} -> {recalled(after.new, probes):.0%} "
                                 f"(+{_mean(gains):.2f} nats), earlier answers {old_change:+.2f}, reading {reading_change:+.2f}")
    return Verdict(promote, reason, recalled(before.new, probes), recalled(after.new, probes), retention,
                   share(before.reading), share(after.reading), _mean(gains), lower, old_change, reading_change,
                   len(probes))


def candidate_record(verdict: Verdict, name: str, chosen: bool) -> dict:
    """One judged candidate as the report keeps it ("step 120" is recorded as steps 120)."""
    return {"steps": int(name.split()[-1]) if name.startswith("step ") else name, "chosen": chosen,
            **{key: getattr(verdict, key) for key in ("promote", "gain", "gain_lower", "recall_after")}}


def kept_training(training: dict) -> str | None:
    """How much of the night's consolidation went forward, for reports: "240 of 360 steps" (None
    when the report predates checkpoints)."""
    judged = training.get("checkpoints") or []
    chosen = [c for c in judged if c.get("chosen")]
    steps = [c["steps"] for c in judged if isinstance(c.get("steps"), int)]
    if not chosen or not steps:
        return None
    if not isinstance(chosen[0]["steps"], int):
        return f"the {chosen[0]['steps']} block, grown from {max(steps)} steps"
    return f"{chosen[0]['steps']} of {max(steps)} steps"
