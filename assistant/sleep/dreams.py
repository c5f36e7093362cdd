"""Dreaming: once consolidation is done, the model rehearses what it learnt on exercises it writes.

Stage 2 of a night, in the paper's order, on a copy of the consolidated block (the gate later
judges it beside the consolidation's checkpoints):

1. write: the consolidated model (new block on) writes questions about the night's memories,
   tonight's sessions and a few of earlier nights', with noise over the frozen blocks of earlier
   nights (the paper's "random expert"): each draw drops or rescales old blocks at random, so the
   questions mix old and new memories;
2. judge: the teacher (the pre-sleep model, the memory in context) answers each; a dream is kept
   only when the memory grounds the answer, by the same likelihood test as the night's own
   lessons (``teach.answer``): there are no gold answers;
3. select: each dream is scored by the norm of the new block's gradient of its supervised loss
   (how much the consolidated model still has to learn from it); the top ``keep_top`` and
   ``keep_random`` random others are kept;
4. rehearse: small-batch RL on the kept dreams, GRPO-style as in LTI (a group of samples per dream,
   group-normalised advantages, the imitation reward against the teacher's answer), with that
   answer as one more member of each group, so a dream the student cannot yet answer at all still
   teaches it something; each step is followed by an anchor step (the caller's).

The gradient norm was chosen over alignment with held-out probes' gradients: those probes are the
gate's, and scoring dreams by them would train on the gate's questions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from assistant.sleep import losses, seeding, teach
from assistant.sleep.lessons import user_turn
from backends.base import BlockTrainer, Sampling

Render = Callable[[list[dict]], str]


@dataclass(frozen=True)
class DreamSettings:
    draws: int = 2  # noise draws, each a question list per memory
    noise: float = 0.5  # share of old blocks dropped (half of it) or rescaled by up to +-noise
    keep_top: int = 8
    keep_random: int = 4
    steps: int = 24  # rehearsal steps, one dream and a group of samples each
    group: int = 4
    lr: float = 2e-4  # the rehearsal's own rate: RL steps on a copy must not undo the consolidation
    older_sessions: int = 3  # sessions of earlier nights dreamt about beside tonight's
    grounding: float = 2.0
    seed: int = 0


@dataclass(frozen=True)
class Memory:
    """A session's knowledge as the teacher hears it."""

    session_id: int
    context: list[dict]
    source: str = "tonight"  # or "older"


@dataclass
class Dream:
    question: str
    source: str
    scales: list[float]
    session_id: int | None = None
    reference: str = ""
    teacher_prompt: str = ""
    score: float | None = None
    kept: bool = False
    reward: float | None = None

    def journal(self) -> dict:
        """The dream as the journal stores it."""
        return {"question": self.question, "source": self.source, "session_id": self.session_id,
                "reference": self.reference, "score": self.score, "kept": self.kept, "reward": self.reward,
                "scales": self.scales}


@dataclass
class DreamLog:
    dreams: list[Dream] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        judged = [d for d in self.dreams if d.reference]
        kept = [d for d in judged if d.kept]
        rewards = [d.reward for d in kept if d.reward is not None]
        return {"written": len(self.dreams), "judged": len(judged), "kept": len(kept),
                "reward_mean": round(sum(rewards) / len(rewards), 4) if rewards else None,
                "seconds": round(self.seconds, 1)}


def block_noise(scales: Sequence[float], amount: float, rng: random.Random) -> list[float]:
    """Random scales for the frozen blocks: each is dropped with probability ``amount / 2`` and
    otherwise rescaled by a factor in [1 - amount, 1 + amount] (a dropped block comes back at 1)."""
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"block noise must be in [0, 1], not {amount}")
    if amount == 0.0:
        return list(scales)
    return [0.0 if rng.random() < amount / 2 else (scale or 1.0) * rng.uniform(1 - amount, 1 + amount)
            for scale in scales]


def select(scores: Sequence[float], top: int, extra: int, rng: random.Random) -> list[int]:
    """Indices kept, sorted: the ``top`` highest scores plus ``extra`` random others."""
    if top + extra >= len(scores):
        return list(range(len(scores)))
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:top] + rng.sample(ranked[top:], extra))


def write(trainer: BlockTrainer, render: Render, memories: Sequence[Memory], scales: Sequence[float],
          settings: DreamSettings, rng: random.Random) -> list[Dream]:
    """Question lists sampled with the new block on, one noise draw at a time; scales are restored."""
    dreams: list[Dream] = []
    try:
        for _ in range(settings.draws):
            noisy = block_noise(scales, settings.noise, rng)
            trainer.set_block_scales(noisy)
            sampling = Sampling(max_tokens=teach.QUESTIONS.max_tokens, temperature=1.0, seed=rng.randrange(2**31))
            written = trainer.generate([render(m.context + user_turn(teach.ASK)) for m in memories], sampling,
                                       new_block=True)
            dreams += [Dream(q, m.source, [round(s, 3) for s in noisy], m.session_id)
                       for m, text in zip(memories, written) for q in teach.parse_questions(text)]
    finally:
        trainer.set_block_scales(list(scales))
    return dreams


def judge(trainer: BlockTrainer, render: Render, dreams: Sequence[Dream], memories: Sequence[Memory],
          grounding: float) -> list[Dream]:
    """The dreams whose memory grounds the teacher's answer, each given that answer as reference."""
    context = {m.session_id: m.context for m in memories}
    asked = [(d.session_id, context[d.session_id], d.question) for d in dreams]
    answered = {(l.session_id, l.question): l for l in teach.answer(trainer, render, asked, grounding)}
    for dream in dreams:
        if (lesson := answered.get((dream.session_id, dream.question))) is not None:
            dream.reference = lesson.answer
            dream.teacher_prompt = render(list(lesson.context) + user_turn(dream.question))
    return [d for d in dreams if d.reference]


def score(trainer: BlockTrainer, render: Render, dreams: Sequence[Dream]) -> None:
    """Each dream's gradient norm on the new block: the supervised loss of its reference."""
    marker, ops = seeding.end_of_turn(trainer), trainer.ops

    def loss_fn(logits, targets, mask):
        return -ops.sum(losses.completion_logprobs(ops, logits, targets) * mask) / ops.sum(mask)

    for dream in dreams:
        prompt = trainer.encode(render(user_turn(dream.question)))
        dream.score = round(trainer.gradient_norm([prompt], [trainer.encode(dream.reference + marker)], loss_fn), 5)


def rehearse(trainer: BlockTrainer, render: Render, dreams: Sequence[Dream], settings: DreamSettings,
             rng: random.Random, reward: seeding.Reward, anchor: Callable[[], float] | None = None,
             progress: Callable[[int, int], None] = lambda step, total: None) -> None:
    """GRPO-style steps on the kept dreams, in shuffled rounds; each dream's mean reward is kept."""
    marker = seeding.end_of_turn(trainer)
    rows = [seeding.Row(d.teacher_prompt, render(user_turn(d.question)), d.reference, question=d.question)
            for d in dreams]
    seeding.prepare(trainer, rows, marker)
    earned: dict[int, list[float]] = {index: [] for index in range(len(rows))}
    order: list[int] = []
    for step in range(settings.steps):
        order = order or rng.sample(range(len(rows)), len(rows))
        index = order.pop()
        sampling = Sampling(max_tokens=48, temperature=1.0, seed=rng.randrange(2**31))
        earned[index] += seeding.policy_step(trainer, seeding.imitation_group(
            trainer, rows[index], "", group=settings.group, sampling=sampling, reward=reward, marker=marker,
            guide=True))
        if anchor is not None:
            anchor()
        progress(step + 1, settings.steps)
    for index, dream in enumerate(dreams):
        if earned[index]:
            dream.reward = round(sum(earned[index]) / len(earned[index]), 4)


def dream(trainer: BlockTrainer, render: Render, memories: Sequence[Memory], *, scales: Sequence[float],
          held_out: set[str], settings: DreamSettings, reward: seeding.Reward,
          anchor: Callable[[], float] | None = None,
          progress: Callable[[str, float], None] = lambda message, fraction: None) -> DreamLog:
    """Write, judge, select and rehearse (the new block must already be the consolidated copy).

    ``held_out`` are the gate's questions: a dream that asks one is dropped, so the gate still
    measures recall on questions the night never trained on."""
    started, rng = time.perf_counter(), random.Random(settings.seed)
    progress("writing dreams", 0.0)
    written = write(trainer, render, memories, scales, settings, rng)
    unique = {(d.session_id, d.question): d for d in written if d.question not in held_out}
    log = DreamLog(list(unique.values()))
    if log.dreams:
        progress(f"judging {len(log.dreams)} dream(s)", 0.2)
        judged = judge(trainer, render, log.dreams, memories, settings.grounding)
        if judged:
            progress(f"scoring {len(judged)} dream(s)", 0.35)
            score(trainer, render, judged)
            kept = [judged[i] for i in select([d.score for d in judged], settings.keep_top, settings.keep_random, rng)]
            for d in kept:
                d.kept = True
            rehearse(trainer, render, kept, settings, rng, reward, anchor, progress=lambda step, total: progress(
                f"rehearsing, step {step}/{total}", 0.4 + 0.6 * step / total))
    log.seconds = time.perf_counter() - started
    return log
