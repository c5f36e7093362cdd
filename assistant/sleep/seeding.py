"""Knowledge Seeding: move what the teacher knows *with* a session into the student *without* it.

Teacher: the pre-sleep model (frozen blocks, ``new_block=False``) with the session's knowledge in
its context. Student: the grown model (frozen blocks + the new block) with the prompt alone. Only
the new block trains, on the paper's objective L_KS = E[(1 - alpha) r - alpha D] (maximised):

- distillation (D): per-token JSD(beta) between teacher and student over completions that are the
  student's own samples (on-policy, share ``on_policy`` = the paper's lambda) or the teacher's
  answers (off-policy);
- learning to imitate (LTI, r): the student completes a random prefix of the teacher's answer, a
  group of samples at a time; reward gamma * r_sem + (1 - gamma) * r_abs with group-normalised
  advantages (GRPO-style). r_sem is the teacher's own judgement: the mean per-token probability
  the teacher, who has the session in context, gives the student's answer.

Every ``lti_every``-th step takes both terms in one optimiser step on their weighted sum (the
others distil alone). Taking LTI as steps of its own made a third of Adam's steps, each of unit
size whatever its loss, follow one noisy group of four samples: on the bench's first night
(sleep seeds 0 and 3) recall of held-out phrasings was 43% and 37% against 50% and 50% without LTI
(alpha, measured the same way, is in ``losses.SEEDING_ALPHA``).

Two more kinds of rows keep old knowledge: replay of earlier nights' prompts, and generic prompts,
both distilled from the pre-sleep model *as it is* (same input, no new context): a KL anchor, so the
new block changes only what tonight's sessions are about. A replayed prompt that tonight asks too, or
that tonight's sessions answer differently (``supersede``), is dropped, so a newer fact supersedes an
older one instead of fighting it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from assistant.sleep import losses, rewards
from backends.base import BlockTrainer, Sampling

Reward = Callable[[str, str, float], float]  # (candidate, reference, teacher's judgement) -> reward
TEACHER_CACHE_BYTES = 2 << 30  # the teacher's kept log-probabilities: about 250 answers of 30 tokens on Qwen2.5


@dataclass(frozen=True)
class SeedingSettings:
    """The night's training budget and the paper's open hyperparameters (documented choices)."""

    # Recall of held-out phrasings kept rising with steps on the bench's first night (sleep seed 0:
    # 30% at 120 steps, 70% at 360, 77% at 720), while the in-context cost hardly moved from 120 to
    # 360 and doubled by 720; a night of 10 sessions takes about 90 s at 360 on one core.
    steps: int = 360
    checkpoints: int = 3  # block states kept along the way (evenly spaced, the last included) for the gate
    batch_size: int = 8
    on_policy: float = 0.0  # lambda: GKD favours on-policy, but the teacher's answers taught nano and Qwen more, for less time
    beta: float = losses.JSD_BETA
    alpha: float = losses.SEEDING_ALPHA
    gamma: float = rewards.IMITATION_GAMMA
    threshold: float = rewards.EDIT_DISTANCE_THRESHOLD
    lti_every: int = 2  # every this many steps, the step takes an LTI group too (0: no LTI)
    lti_group: int = 4  # samples per prefix: the group of the group-normalised advantage
    # Rows from earlier nights' prompts added to each batch, as a share of its size (none on a first
    # night). Replay used to take its place in the batch: on the bench's second night 0.25 kept 87-91%
    # of night 1's answers (rejected) and 0.5 kept 96%, but tonight's rows fell from 6 a batch to 2.
    replay_share: float = 0.5
    anchor_share: float = 0.25  # of each batch, generic rows anchored to the pre-sleep model
    sample_temperature: float = 1.0
    # Each anchor row's tokens count this many times in the divergence (a weighted mean), so
    # everyday reading is held harder without taking tonight's rows out of the batch, as a larger
    # anchor_share does. Bench night 1 (67 held-out phrasings), the best recall among the gate's
    # candidates that read within 2 points, sleep seeds 0, 1, 2: weight 1 76, 70, 61%; 4 84, 84,
    # 70%; 8 79, 76% (seeds 0, 1). The whole block at 360 steps read 6.5 points below the
    # pre-sleep model with weight 1, 4.7 with 4 and 2.5 with 8 (means), recalling 80, 82, 79%.
    anchor_weight: float = 4.0
    max_answer_tokens: int = 48
    seed: int = 0


@dataclass
class Row:
    """A prompt to learn: the teacher's input, the student's input, and the teacher's answer."""

    teacher_prompt: str
    student_prompt: str
    answer: str
    kind: str = "new"  # new (tonight's knowledge), replay (earlier nights), anchor (generic)
    question: str = ""  # the bare question, kept with the night's adapter for later replay
    session_id: int | None = None  # the session whose answer it is (tonight's and re-taught rows)
    teacher_ids: list[int] = field(default_factory=list)
    student_ids: list[int] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)


@dataclass
class SeedingLog:
    losses: list[float] = field(default_factory=list)  # each step's loss (with LTI's surrogate on its steps)
    lti_rewards: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        tail = self.losses[-10:] or [math.nan]
        return {
            "steps": len(self.losses),
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": sum(tail) / len(tail),
            "lti_reward_mean": sum(self.lti_rewards) / len(self.lti_rewards) if self.lti_rewards else None,
        }


def end_of_turn(trainer: BlockTrainer) -> str:
    """The text the chat template puts after an assistant reply (e.g. ``<|im_end|>``)."""
    user = [{"role": "user", "content": "x"}]
    prompt = trainer.render_chat(user)
    full = trainer.render_chat(user + [{"role": "assistant", "content": "y"}], add_generation_prompt=False)
    return full[len(prompt) + 1 :].rstrip() if full.startswith(prompt) else ""


def prepare(trainer: BlockTrainer, rows: Sequence[Row], marker: str) -> None:
    """Tokenize every row once (answers end with the end-of-turn marker, so stopping is learnt)."""
    for row in rows:
        row.teacher_ids = trainer.encode(row.teacher_prompt)
        row.student_ids = trainer.encode(row.student_prompt)
        row.answer_ids = trainer.encode(row.answer + marker)


def consolidate(
    trainer: BlockTrainer,
    rows: Sequence[Row],
    settings: SeedingSettings,
    progress: Callable[[int, int], None] = lambda step, total: None,
    reward_fn: Reward | None = None,
    checkpoint: Callable[[int], None] = lambda step: None,
    deadline: float | None = None,
) -> SeedingLog:
    """Train the new block for ``settings.steps`` steps, or fewer to end by ``deadline`` (a
    ``time.monotonic()`` value); returns the curve.

    ``checkpoint(step)`` is called ``settings.checkpoints`` times, evenly spaced over the steps or
    the time, whichever runs out first, the last step always included (the caller keeps the
    block's state there), so the gate can choose how far training should go."""
    if settings.steps < 1:
        raise ValueError(f"a night trains at least one step, got {settings.steps}")
    rng = random.Random(settings.seed)
    marker = end_of_turn(trainer)
    prepare(trainer, rows, marker)
    pools = {kind: [r for r in rows if r.kind == kind] for kind in ("new", "replay", "anchor")}
    if not pools["new"]:
        raise ValueError("nothing to consolidate: no prompts about tonight's sessions")
    log = SeedingLog()
    started, kept, last = time.monotonic(), 0, 0
    reward = reward_fn or imitation(settings.gamma, settings.threshold)
    teacher = TeacherCache(trainer)

    def done() -> float:  # the share of the training behind us, by steps or by time
        by_time = (time.monotonic() - started) / max(deadline - started, 1e-9) if deadline is not None else 0.0
        return max(len(log.losses) / settings.steps, by_time)

    for step in range(settings.steps):
        if step and done() >= 1.0:
            break
        batch = _batch(pools, settings, rng)
        group = None
        if settings.lti_every and (step + 1) % settings.lti_every == 0:
            group = _lti_group(trainer, rng.choice(pools["new"]), settings, rng, marker, reward)
            log.lti_rewards.append(sum(group.rewards) / len(group.rewards))
        log.losses.append(seeding_step(trainer, batch, group, settings, rng, marker, teacher))
        if kept < settings.checkpoints - 1 and _due(done(), kept, settings):
            kept, last = kept + 1, step + 1
            checkpoint(step + 1)
        progress(step + 1, max(step + 1, min(settings.steps, round((step + 1) / max(done(), 1e-9)))))
    if last != len(log.losses):
        checkpoint(len(log.losses))
    return log


def _due(done: float, kept: int, settings: SeedingSettings) -> bool:
    """Whether the next checkpoint is due: its share of the training reached, to the nearest step."""
    return done + 0.5 / settings.steps >= (kept + 1) / settings.checkpoints


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """The steps ``consolidate`` checkpoints when no deadline cuts it short: ``count`` evenly
    spaced, ending at ``steps`` (fewer when there are fewer steps)."""
    if steps < 1 or count < 1:
        return []
    settings, kept, marks = SeedingSettings(steps=steps, checkpoints=count), 0, []
    for step in range(1, steps):
        if kept < count - 1 and _due(step / steps, kept, settings):
            kept += 1
            marks.append(step)
    return marks + [steps]


def _batch(pools: dict[str, list[Row]], settings: SeedingSettings, rng: random.Random) -> list[Row]:
    """``batch_size`` rows of tonight's and anchors, plus the replayed ones: a later night learns its
    own sessions as fast as the first."""
    size = settings.batch_size
    anchors = min(len(pools["anchor"]), round(size * settings.anchor_share))
    replayed = min(len(pools["replay"]), round(size * settings.replay_share))
    return ([rng.choice(pools["new"]) for _ in range(size - anchors)]
            + rng.sample(pools["anchor"], anchors) + rng.sample(pools["replay"], replayed))


def distill_step(
    trainer: BlockTrainer, batch: Sequence[Row], settings: SeedingSettings, rng: random.Random, marker: str
) -> float:
    """A step of distillation alone (dreaming's anchor)."""
    return seeding_step(trainer, batch, None, settings, rng, marker)


def seeding_step(
    trainer: BlockTrainer,
    batch: Sequence[Row],
    group: ImitationGroup | None,
    settings: SeedingSettings,
    rng: random.Random,
    marker: str,
    teacher: TeacherCache | None = None,
) -> float:
    """One optimiser step on the Knowledge Seeding loss: generalized JSD on a mix of the student's
    samples and the teacher's answers (anchor rows weighted by ``anchor_weight``), plus, given an
    LTI ``group``, its policy-gradient term, the two weighted by alpha
    (``losses.seeding_objective``). Both ride in one batch; each term reads its own rows of the
    logits. ``teacher`` keeps the teacher's log-probabilities of the rows it has seen. Returns the loss."""
    # By position: a batch may draw a row twice, and each draw is sampled (or not) on its own.
    on_policy = [i for i, row in enumerate(batch) if row.kind == "new" and rng.random() < settings.on_policy]
    answers = [row.answer_ids for row in batch]
    fixed = [i not in on_policy for i in range(len(batch))]
    if on_policy:
        sampling = Sampling(max_tokens=settings.max_answer_tokens, temperature=settings.sample_temperature,
                            seed=rng.randrange(2**31))
        texts = trainer.generate([batch[i].student_prompt for i in on_policy], sampling, new_block=True)
        for i, text in zip(on_policy, texts):
            answers[i] = trainer.encode(text + marker)
    teacher_logits = (teacher or TeacherCache(trainer, limit=0))(batch, answers, fixed)
    rows, width = len(batch), max(len(answer) for answer in answers)
    prefixes, targets = [r.student_ids for r in batch], list(answers)
    if group is not None and group.teaches:
        prefixes += [group.prompt_ids] * len(group.completions)
        targets += group.completions
    else:
        group = None
    ops = trainer.ops

    weights = [[settings.anchor_weight if row.kind == "anchor" else 1.0] for row in batch]

    def loss_fn(logits, tokens, mask):
        divergence = losses.generalized_jsd(ops, logits[:rows, :width], teacher_logits,
                                            mask[:rows, :width] * ops.asarray(weights, like=mask),
                                            settings.beta)
        if group is None:
            return settings.alpha * divergence
        imitation_term = -group.loss(ops, logits[rows:], tokens[rows:], mask[rows:])
        return losses.seeding_objective(ops, imitation_term, divergence, settings.alpha)

    return trainer.train_step(prefixes, targets, loss_fn)


class TeacherCache:
    """The teacher's log-probabilities over a batch's completions, kept for the fixed rows.

    A fixed row (its completion is the teacher's own answer or an anchor's, not a fresh sample) has
    the same teacher distribution all night: the teacher is frozen. Its pass over the row's
    session window is most of an off-policy step on a real model, so it runs once per row and the
    result is kept in float16 (log-probabilities: exact near 0, where the mass is), up to
    ``limit`` bytes; past that, rows are computed each time they are drawn."""

    def __init__(self, trainer: BlockTrainer, limit: int = TEACHER_CACHE_BYTES) -> None:
        self.trainer, self.limit, self.used = trainer, limit, 0
        self.kept: dict[tuple, object] = {}

    def __call__(self, batch: Sequence[Row], answers: Sequence[Sequence[int]], fixed: Sequence[bool]):
        """[len(batch), longest answer, V] log-probabilities of the frozen teacher (stack without
        the new block) over each row's completion in ``answers`` after its teacher prompt."""
        keys = [(tuple(row.teacher_ids), tuple(answer)) for row, answer in zip(batch, answers)]
        need = [i for i, key in enumerate(keys) if not (fixed[i] and key in self.kept)]
        ops, fresh = self.trainer.ops, {}
        if need:
            logits, _ = self.trainer.completion_logits([batch[i].teacher_ids for i in need],
                                                       [answers[i] for i in need], new_block=False)
            logprobs = ops.log_softmax(logits)
            for k, i in enumerate(need):
                fresh[i] = logprobs[k, : len(answers[i])]
                size = 2 * len(answers[i]) * logprobs.shape[-1]
                if fixed[i] and keys[i] not in self.kept and self.used + size <= self.limit:
                    self.kept[keys[i]], self.used = ops.to_compact(fresh[i]), self.used + size
        rows = [fresh[i] if i in fresh else self.kept[key] for i, key in enumerate(keys)]
        return ops.stack_rows(rows, max(len(answer) for answer in answers))


@dataclass
class ImitationGroup:
    """A group of the student's completions of one prompt, rewarded against the teacher's answer."""

    prompt_ids: list[int]
    completions: list[list[int]]
    rewards: list[float]  # the student's samples' (the guiding reference's is left out)
    advantages: object  # group-normalised, over every completion
    teaches: bool  # an all-equal group has zero advantage: nothing to learn from it

    def loss(self, ops, logits, targets, mask):
        """The policy-gradient loss of this group's rows of a batch's logits."""
        return losses.policy_gradient_loss(ops, losses.completion_logprobs(ops, logits, targets), self.advantages,
                                           mask)


def _lti_group(
    trainer: BlockTrainer, row: Row, settings: SeedingSettings, rng: random.Random, marker: str, reward: Reward
) -> ImitationGroup:
    """Learning to imitate: the student completes a random prefix of the teacher's answer."""
    answer_tokens = trainer.encode(row.answer)
    cut = rng.randint(0, max(0, len(answer_tokens) - 1))
    sampling = Sampling(max_tokens=settings.max_answer_tokens, temperature=settings.sample_temperature,
                        seed=rng.randrange(2**31))
    return imitation_group(trainer, row, trainer.decode(answer_tokens[:cut]), group=settings.lti_group,
                           sampling=sampling, reward=reward, marker=marker)


def imitation(gamma: float, threshold: float) -> Reward:
    """The LTI reward: gamma * r_sem + (1 - gamma) * thresholded Levenshtein likeness."""
    return lambda candidate, reference, semantic: rewards.imitation_reward(
        candidate, reference, gamma=gamma, threshold=threshold, semantic=semantic)


def imitation_group(
    trainer: BlockTrainer,
    row: Row,
    prefix_text: str,
    *,
    group: int,
    sampling: Sampling,
    reward: Reward,
    marker: str,
    guide: bool = False,
) -> ImitationGroup:
    """The student completes ``prefix_text`` after its prompt ``group`` times; each sample is
    rewarded against the teacher's answer and the advantages are normalised within the group
    (GRPO-style).

    With ``guide``, the teacher's own answer joins the group as one more member (off-policy
    guidance, as in mixed-policy GRPO): when no sample comes near the reference, a plain group is
    all-equal and teaches nothing, while the guided one still pushes towards the reference."""
    prompt = row.student_prompt + prefix_text
    samples = list(trainer.generate([prompt] * group, sampling, new_block=True))
    if guide:
        samples.append(row.answer.removeprefix(prefix_text))
    completions = [trainer.encode(text + marker) for text in samples]
    semantic = teacher_judgement(trainer, row, [prefix_text + s for s in samples], marker)
    scored = [reward(prefix_text + sample, row.answer, sem) for sample, sem in zip(samples, semantic)]
    ops = trainer.ops
    return ImitationGroup(trainer.encode(prompt), completions, scored[:group],
                          losses.group_advantages(ops, ops.asarray(scored)), max(scored) > min(scored))


def policy_step(trainer: BlockTrainer, group: ImitationGroup) -> list[float]:
    """One small-batch policy-gradient step on an imitation group alone (dreaming's rehearsal);
    returns the rewards of the student's samples."""
    if group.teaches:
        ops = trainer.ops
        trainer.train_step([group.prompt_ids] * len(group.completions), group.completions,
                           lambda logits, targets, mask: group.loss(ops, logits, targets, mask))
    return group.rewards


def teacher_judgement(trainer: BlockTrainer, row: Row, candidates: Sequence[str], marker: str) -> list[float]:
    """r_sem: the teacher's mean per-token probability of each candidate, given the session."""
    return mean_token_probability(trainer, [row.teacher_ids] * len(candidates), candidates, marker)


def mean_token_probability(
    trainer: BlockTrainer, prefixes: Sequence[Sequence[int]], candidates: Sequence[str], marker: str,
    new_block: bool = False,
) -> list[float]:
    """How sure the teacher (frozen blocks only; with ``new_block``, the candidate block the gate
    judges) is of each candidate after its prefix: the geometric mean of its per-token
    probabilities, end-of-turn included."""
    completions = [trainer.encode(c + marker) for c in candidates]
    return [math.exp(total / max(tokens, 1.0))
            for total, tokens in summed_logprobs(trainer, prefixes, completions, new_block=new_block)]


def summed_logprobs(trainer: BlockTrainer, prefixes: Sequence[Sequence[int]],
                    completions: Sequence[Sequence[int]], *, new_block: bool) -> list[tuple[float, float]]:
    """(log-probability summed over its tokens, tokens counted) of each completion after its prefix."""
    logits, mask = trainer.completion_logits(prefixes, completions, new_block=new_block)
    ops = trainer.ops
    totals = ops.sum(losses.completion_logprobs(ops, logits, pad(completions)) * mask, axis=-1)
    return [(float(total), float(tokens)) for total, tokens in zip(totals, ops.sum(mask, axis=-1))]


def pad(rows: Sequence[Sequence[int]]) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [list(r) + [0] * (width - len(r)) for r in rows]
