"""Dreaming: once consolidation is done, the model rehearses what it learnt on exercises it writes.

Stage 2 of a night, in the paper's order, on a copy of the consolidated block (two-stage isolation:
the cycle keeps the consolidated weights, and the gate later promotes whichever is better):

1. write: the consolidated model (new block on) samples questions about the night's memories, with
   noise over the frozen blocks of earlier nights (the paper's "random expert"): each draw drops or
   rescales old blocks at random, so dreams mix old and new memories. A draw writes about
   - one of tonight's sessions (new phrasings of what it was told),
   - one of tonight's sessions joined with a session of an earlier night (old and new together),
   - what it recalls being told, with no session in context at all (its own memory, under noise);
2. judge: the teacher (the pre-sleep model as it is) answers each dream with each memory it may
   be about in its context: the sessions it was written about and newer ones that say the same
   specific words (a recollection: the memories that say its most specific word; ``candidates``).
   An answer counts only if the teacher is confident of it *and* the memory is what makes it
   confident (the same answer is several times less likely with no memory in context). The
   reference is the newest such memory's answer (a newer fact supersedes an older one); a dream
   no memory answers this way is discarded: there are no gold answers;
3. select: each dream is scored by the norm of the new block's gradient of its supervised loss
   (how much the consolidated model still has to learn from it); the top k and b random others
   are kept ("random" selection, the ablation, keeps k + b at random);
4. rehearse: small-batch RL on the kept dreams, each asked as written or after a lead-in
   (``lessons.FRAMINGS``), GRPO-style as in LTI (a group of samples per dream,
   group-normalised advantages, the same imitation reward against the teacher's reference), with
   the reference itself as one more member of each group, so a dream the student cannot yet answer
   at all still teaches it something.

The gradient norm was chosen over alignment with held-out probes' gradients: those probes are the
gate's, and scoring dreams by them would train on the gate's questions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from assistant.sleep import counterfactual, lessons, losses, seeding
from assistant.sleep.lessons import user_turn
from assistant.sleep.rewards import normalise_answer
from backends.base import BlockTrainer, Sampling

SOURCES = ("tonight", "combined", "recollection")


@dataclass(frozen=True)
class DreamSettings:
    """How much the night dreams. ``steps = 0`` turns dreaming off; ``noise = 0`` turns off the noise."""

    draws: int = 4  # noise draws; each writes one question list per source
    noise: float = 0.5  # share of old blocks dropped (half of it) or rescaled by up to +-noise
    selection: str = "gradient"  # or "random": the ablation without gradient selection
    keep_top: int = 8
    keep_random: int = 4
    steps: int = 24  # rehearsal steps, one dream and a group of samples each
    group: int = 4
    guide: bool = True  # the teacher's reference joins each group (see ``seeding.imitation_group``)
    framings: int = 2  # each step asks its dream as written or after one of this many ``lessons.FRAMINGS``
    confidence: float = 0.5  # the teacher's least mean token probability for a reference
    grounding: float = 2.0  # how many times likelier the memory must make the reference than no memory
    # The rehearsal's own rate. Measured on the bench's first generated night: at 1e-3 the dreamt copy's
    # in-context reading fell from 56% to 41% (the gate kept the consolidated block); at 2e-4 it held.
    # Measured again with the judge of ``candidates`` (sleep seeds 0 and 1, 30 held-out probes): at
    # 2e-4 and 24 steps the dreamt copy recalled exactly what the consolidated one did (67%, 63%); at
    # 1e-3, 48 steps and 8 draws it recalled less (60%, 57%) and read worse (the gate said 70% -> 66%).
    lr: float = 2e-4
    temperature: float = 1.0
    max_tokens: int = 96
    older_sessions: int = 3  # sessions of earlier nights dreamt about beside tonight's
    seed: int = 0


@dataclass(frozen=True)
class Memory:
    """A session's knowledge as the teacher hears it, oldest first in every list of memories."""

    session_id: int
    context: list[dict]


@dataclass
class Dream:
    question: str
    source: str
    scales: list[float]
    about: tuple[int, ...] = ()  # the sessions it was written about (none for a recollection)
    reference: str = ""
    confidence: float | None = None
    session_id: int | None = None
    score: float | None = None
    kept: bool = False
    reward: float | None = None
    teacher_prompt: str = ""

    def journal(self) -> dict:
        """The dream as the journal stores it."""
        return {"question": self.question, "source": self.source, "reference": self.reference,
                "confidence": self.confidence, "score": self.score, "kept": self.kept,
                "reward": self.reward, "scales": self.scales}


# -- pure parts ---------------------------------------------------------------------------------


def block_noise(scales: Sequence[float], amount: float, rng: random.Random) -> list[float]:
    """Random scales for the frozen blocks: each is dropped with probability ``amount / 2`` and
    otherwise rescaled by a factor in [1 - amount, 1 + amount] (a dropped block comes back at 1)."""
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"block noise must be in [0, 1], not {amount}")
    if amount == 0.0:
        return list(scales)
    noisy = []
    for scale in scales:
        if rng.random() < amount / 2:
            noisy.append(0.0)
        else:
            noisy.append((scale or 1.0) * rng.uniform(1 - amount, 1 + amount))
    return noisy


def select(scores: Sequence[float], top: int, extra: int, rng: random.Random) -> list[int]:
    """Indices kept, sorted: the ``top`` highest scores plus ``extra`` random others."""
    if top + extra >= len(scores):
        return list(range(len(scores)))
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:top] + rng.sample(ranked[top:], extra))


def newest_grounded(
    with_memory: Sequence[float], without: Sequence[float], confidence: float, grounding: float
) -> int | None:
    """Index of the newest (last) memory whose answer the teacher gives with probability at least
    ``confidence``, and at least ``grounding`` times its probability with no memory; or None."""
    for index in range(len(with_memory) - 1, -1, -1):
        if with_memory[index] >= confidence and with_memory[index] >= grounding * without[index]:
            return index
    return None


def specific_words(question: str, memories: Sequence[str]) -> dict[str, list[int]]:
    """The words of a question that tell memories apart, each with the indices of the memories
    that say it: a name (a capitalised word after the first, not "I") said by any, another word
    said by one at least and by half of them at most (one, of one or two). A word most memories
    say ("my", "is") tells none of them apart."""
    names = counterfactual.names(question)
    found = {}
    for word in dict.fromkeys(map(counterfactual.folded, counterfactual.words(question))):
        saying = [i for i, text in enumerate(memories) if counterfactual.mentions(text, word)]
        if saying and (word in names or len(saying) <= max(1, len(memories) // 2)):
            found[word] = saying
    if not names <= found.keys():
        return {}  # a name no memory says: the question is about someone nobody mentioned
    return found


def relevant(question: str, memories: Sequence[str]) -> list[int]:
    """Indices of the memories a question is about: those saying its most specific word (the one
    the fewest memories say, ``specific_words``) and every name it asks about.

    Why: a small teacher answers from whatever it is given. Asked "Which city does Mei live in?"
    over a session about Alexander's harp, it says "Mei lives inarp.", confidently and, by the
    grounding ratio, because of that session; judged on every memory, the newest such reading won,
    and half of a night's dreams taught a value from the wrong session."""
    found = specific_words(question, memories)
    if not found:
        return []
    fewest = min(map(len, found.values()))
    chosen = {i for saying in found.values() if len(saying) == fewest for i in saying}
    names = counterfactual.names(question)
    return sorted(i for i in chosen if all(i in found[name] for name in names))


def well_formed(question: str, max_words: int = 16) -> bool:
    """One short question: a single sentence ending in its only question mark."""
    body = question.strip()
    return (body.endswith("?") and body.count("?") == 1 and ". " not in body
            and 2 <= len(body.split()) <= max_words and body[0].isupper())


# -- the steps --------------------------------------------------------------------------------------


def write(
    trainer: BlockTrainer,
    tonight: Sequence[Memory],
    older: Sequence[Memory],
    scales: Sequence[float],
    settings: DreamSettings,
    rng: random.Random,
) -> list[Dream]:
    """Sample question lists with the new block on, one noise draw at a time; scales are restored."""
    dreams: list[Dream] = []
    try:
        for _ in range(settings.draws):
            noisy = block_noise(scales, settings.noise, rng)
            trainer.set_block_scales(noisy)
            sampling = Sampling(max_tokens=settings.max_tokens, temperature=settings.temperature,
                                seed=rng.randrange(2**31))
            recalled = trainer.generate([trainer.render_chat(user_turn(lessons.RESTATE_REQUEST))], sampling,
                                        new_block=True)[0].strip()
            new = rng.choice(tonight)
            contexts = {"tonight": (new.context, (new.session_id,))}
            if recalled:
                contexts["recollection"] = (_heard(recalled), ())
            if older:
                old = rng.choice(older)
                joined = _heard(lessons.said(old.context) + "\n" + lessons.said(new.context))
                if _fits(trainer, joined, settings.max_tokens):
                    contexts["combined"] = (joined, (old.session_id, new.session_id))
            sources = [source for source in SOURCES if source in contexts]
            prompts = [trainer.render_chat(contexts[s][0] + user_turn(lessons.QUESTION_REQUEST)) for s in sources]
            written = trainer.generate(prompts, replace(sampling, seed=sampling.seed + 1), new_block=True)
            for source, text in zip(sources, written):
                dreams += [Dream(q, source, [round(s, 3) for s in noisy], contexts[source][1])
                           for q in lessons.parse_questions(text) if well_formed(q)]
    finally:
        trainer.set_block_scales(scales)
    return dreams


def teacher_answers(
    trainer: BlockTrainer, prompts: Sequence[str], bare_ids: Sequence[Sequence[int]]
) -> tuple[list[str], list[float], list[float]]:
    """The pre-sleep model's greedy answer to each prompt (a memory in context, then a question),
    how sure it is of it there, and how sure with the question alone (``bare_ids``): what
    ``newest_grounded`` weighs. Batched by 32."""
    marker = seeding.end_of_turn(trainer)
    greedy = Sampling(max_tokens=48, temperature=0.0)
    answers, sure, unaided = [], [], []
    for start in range(0, len(prompts), 32):
        chunk = slice(start, start + 32)
        texts = [text.strip() for text in trainer.generate(prompts[chunk], greedy, new_block=False)]
        answers += texts
        sure += seeding.mean_token_probability(trainer, [trainer.encode(p) for p in prompts[chunk]], texts, marker)
        unaided += seeding.mean_token_probability(trainer, bare_ids[chunk], texts, marker)
    return answers, sure, unaided


def judge(
    trainer: BlockTrainer, dreams: Sequence[Dream], memories: Sequence[Memory], settings: DreamSettings
) -> list[Dream]:
    """Give each dream the teacher's reference from the newest memory that may answer it
    (``candidates``) and grounds it (see the module's notes); the dreams none grounds keep an
    empty reference."""
    said = [lessons.said(memory.context) for memory in memories]
    sessions = [memory.session_id for memory in memories]
    options = [candidates(dream, sessions, said) for dream in dreams]
    pairs = [(dream, index) for dream, indices in zip(dreams, options) for index in indices]
    prompts = [trainer.render_chat(memories[index].context + user_turn(dream.question)) for dream, index in pairs]
    bare = [trainer.encode(trainer.render_chat(user_turn(dream.question))) for dream in dreams]
    answers, sure, unaided = teacher_answers(
        trainer, prompts, [ids for ids, indices in zip(bare, options) for _ in indices])
    start = 0
    for dream, indices in zip(dreams, options):  # pairs run dream by dream
        row, start = range(start, start + len(indices)), start + len(indices)
        with_memory = [sure[k] if answers[k] else 0.0 for k in row]
        best = newest_grounded(with_memory, [unaided[k] for k in row], settings.confidence, settings.grounding)
        dream.confidence = round(max(with_memory, default=0.0), 4)
        if best is not None:
            k = row[best]
            dream.reference, dream.session_id = answers[k], sessions[pairs[k][1]]
            dream.confidence, dream.teacher_prompt = round(with_memory[best], 4), prompts[k]
    return list(dreams)


def candidates(dream: Dream, sessions: Sequence[int], said: Sequence[str]) -> list[int]:
    """Indices of the memories (oldest first: their ``sessions`` and what was ``said`` in them)
    that may answer a dream. For a dream written about sessions: those of them that say a specific
    word of it (``specific_words``) and every name it asks about, and each newer memory that says
    every specific word they say, which supersedes them ("Where is Mary?" after a newer story
    about Mary). For a recollection: the memories it is about (``relevant``). A question the
    memories it was written about share nothing specific with ("Which city does Azost live in?",
    a name the writer made up) has none."""
    if not dream.about:
        return relevant(dream.question, said)
    found = specific_words(dream.question, said)
    names = counterfactual.names(dream.question)
    written = [index for index, session in enumerate(sessions) if session in dream.about
               and any(index in saying for saying in found.values()) and all(index in found[n] for n in names)]
    if not written:
        return []
    keys = [saying for saying in found.values() if set(saying) & set(written)]
    newer = {index for index in range(max(written) + 1, len(said)) if all(index in saying for saying in keys)}
    return sorted(set(written) | newer)


def score(trainer: BlockTrainer, dreams: Sequence[Dream]) -> None:
    """Each dream's gradient norm on the new block: the supervised loss of its reference."""
    marker = seeding.end_of_turn(trainer)
    ops = trainer.ops

    def loss_fn(logits, targets, mask):
        logprobs = losses.completion_logprobs(ops, logits, targets)
        return -ops.sum(logprobs * mask) / ops.sum(mask)

    for dream in dreams:
        prompt = trainer.encode(trainer.render_chat(user_turn(dream.question)))
        dream.score = round(trainer.gradient_norm([prompt], [trainer.encode(dream.reference + marker)], loss_fn), 5)


def rehearse(
    trainer: BlockTrainer,
    dreams: Sequence[Dream],
    settings: DreamSettings,
    rng: random.Random,
    reward: seeding.Reward,
    anchor: Callable[[], float] | None = None,
    progress: Callable[[int, int], None] = lambda step, total: None,
) -> None:
    """GRPO-style steps on the kept dreams, in shuffled rounds; each dream's mean reward is kept.

    ``anchor`` (one distillation step towards the pre-sleep model on everyday prompts) follows every
    step, as GRPO's KL term to its reference model: rehearsing memories must not unteach reading."""
    marker = seeding.end_of_turn(trainer)
    asked = [[d.question] + [lessons.framed(d.question, f) for f in rng.sample(lessons.FRAMINGS, settings.framings)]
             for d in dreams]
    rows = [[seeding.Row(d.teacher_prompt, trainer.render_chat(user_turn(q)), d.reference, question=d.question)
             for q in questions] for d, questions in zip(dreams, asked)]
    seeding.prepare(trainer, [row for variants in rows for row in variants], marker)
    earned: dict[int, list[float]] = {index: [] for index in range(len(rows))}
    order: list[int] = []
    for step in range(settings.steps):
        if not order:
            order = rng.sample(range(len(rows)), len(rows))
        index = order.pop()
        sampling = Sampling(max_tokens=48, temperature=settings.temperature, seed=rng.randrange(2**31))
        earned[index] += seeding.policy_step(trainer, seeding.imitation_group(
            trainer, rng.choice(rows[index]), "", group=settings.group, sampling=sampling, reward=reward,
            marker=marker, guide=settings.guide))
        if anchor is not None:
            anchor()
        progress(step + 1, settings.steps)
    for index, dream in enumerate(dreams):
        if earned[index]:
            dream.reward = round(sum(earned[index]) / len(earned[index]), 4)


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


def dream(
    trainer: BlockTrainer,
    tonight: Sequence[Memory],
    older: Sequence[Memory],
    *,
    scales: Sequence[float],
    held_out: set[str],
    settings: DreamSettings,
    reward: seeding.Reward,
    anchor: Callable[[], float] | None = None,
    progress: Callable[[str, float], None] = lambda message, fraction: None,
) -> DreamLog:
    """Write, judge, select and rehearse (the new block must already be the consolidated copy).

    ``held_out`` are the gate's questions: a dream that happens to ask one is dropped, so the gate
    still measures recall on questions the night never trained on."""
    started = time.perf_counter()
    log = _dream(trainer, tonight, older, scales, held_out, settings, reward, anchor, progress)
    log.seconds = time.perf_counter() - started
    return log


def _dream(trainer, tonight, older, scales, held_out, settings, reward, anchor, progress) -> DreamLog:
    rng = random.Random(settings.seed)
    progress("writing dreams", 0.0)
    written = write(trainer, tonight, older, scales, settings, rng)
    unique: dict[str, Dream] = {}
    banned = {normalise_answer(q) for q in held_out}
    for candidate in written:
        key = normalise_answer(candidate.question)
        if key not in banned:
            unique.setdefault(key, candidate)
    log = DreamLog(list(unique.values()))
    if not log.dreams:
        return log
    progress(f"judging {len(log.dreams)} dream(s)", 0.2)
    judged = [d for d in judge(trainer, log.dreams, list(older) + list(tonight), settings) if d.reference]
    if not judged:
        return log
    progress(f"scoring {len(judged)} dream(s)", 0.35)
    if settings.selection == "gradient":
        score(trainer, judged)
        kept = select([d.score for d in judged], settings.keep_top, settings.keep_random, rng)
    elif settings.selection == "random":
        kept = select([0.0] * len(judged), 0, settings.keep_top + settings.keep_random, rng)
    else:
        raise ValueError(f"unknown dream selection {settings.selection!r} (gradient or random)")
    for index in kept:
        judged[index].kept = True
    rehearse(trainer, [judged[i] for i in kept], settings, rng, reward, anchor,
             progress=lambda step, total: progress(f"rehearsing, step {step}/{total}", 0.4 + 0.6 * step / total))
    return log


def _heard(text: str) -> list[dict]:
    """A context in which the user said ``text`` (the shape of ``lessons.knowledge_context``)."""
    return lessons.knowledge_context(user_turn(text))


def _fits(trainer: BlockTrainer, context: list[dict], max_tokens: int) -> bool:
    prompt = trainer.render_chat(context + user_turn(lessons.QUESTION_REQUEST))
    return len(trainer.encode(prompt)) + 2 * max_tokens <= trainer.context_length
