"""Teach: the teacher reads each session and writes the night's lessons.

The teacher is the pre-sleep model with a window of the session in context (the user's turns,
``lessons.knowledge_context``: what the assistant replied may be wrong and is not knowledge). It is
asked, as the user would ask, for questions about what it was told (besides those the user asked
in the session), in each of a few wordings (``REQUESTS``): once greedily and ``lists - 1`` times
sampled, each a list a chat model writes in its own way (numbered, bulleted or plain lines: a line
that ends in a question mark is a question). It answers each question with the
window in context, greedily and to the end of its turn; an answer cut by the length limit is
dropped, not taught half-said.

An answer is kept only when the session is what makes it likely: its log-probability with the
window in context must exceed that with a window of another of tonight's sessions in its place (the
question alone on a night of one session) by ``grounding`` nats (the pointwise mutual information of
answer and session). That one likelihood test, in any language, drops an answer the teacher invents
(nothing in the session supports it), one about itself rather than the user, one the live model
already gives (nothing left to learn), and one that any told session makes likely (an
acknowledgement, a ramble in the session's style): only what this session says passes.

Beside the lessons, every window is recited (``recitals``): the user's own words are the answer to
"What did I tell you?", so the block learns what was said, not only the teacher's questions about it.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from assistant.sleep.gate import Probe, logprob
from assistant.sleep.lessons import SENTENCE_GAP, knowledge_context, sentences, user_turn, windows
from assistant.sleep.seeding import Row
from backends.base import BlockTrainer, Sampling

ASK = "What questions could I ask you about what I told you?"
# Models answer requests differently: each window is asked both ways. On SmolLM2-135M the list request
# reached 10 of 30 told facts and ASK 1; the bundled nano model answers ASK only (docs/decisions.md).
REQUESTS = (ASK, "List 5 short questions about what I told you, one per line.")
RECITE = "What did I tell you?"
RECITALS = 2  # rows per piece of a window: about a quarter of tonight's rows (docs/decisions.md)
QUESTIONS = Sampling(max_tokens=128, temperature=0.0)
ANSWER = Sampling(max_tokens=64, temperature=0.0)
_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022>]+|\(?\d+[.):]|[A-Za-z][.)]|#+)?\s*(?:\*\*)?\s*")
Render = Callable[[list[dict]], str]


@dataclass(frozen=True)
class Lesson:
    """A question about a window of a session, and the teacher's grounded answer to it."""

    session_id: int
    context: tuple[dict, ...]
    question: str
    answer: str
    taught: float  # the teacher's log-probability of its answer, the window in context
    evidence: float  # how much more likely the window makes it (nats)

    def probe(self) -> Probe:
        return Probe(self.question, self.answer, self.session_id, self.taught)


def parse_questions(text: str) -> list[str]:
    """The questions of a reply, one per line whatever its list marks, each once, in order."""
    found: dict[str, None] = {}
    for line in text.splitlines():
        while (bare := _LIST_MARK.sub("", line, count=1).strip().strip("*\"'").strip()) != line:
            line = bare
        if line.endswith(("?", "\uff1f")) and 3 <= len(line) <= 200:
            found.setdefault(line, None)
    return list(found)


def session_contexts(trainer: BlockTrainer, render: Render, messages: Sequence[dict]) -> list[list[dict]]:
    """The teacher's contexts for a session: its user turns, in windows that leave room to answer."""
    budget = trainer.context_length - ANSWER.max_tokens - QUESTIONS.max_tokens - 32
    turns = [m for m in messages if m.get("status", "complete") == "complete"]
    return [knowledge_context(window) for window in
            windows(turns, lambda ctx: len(trainer.encode(render(ctx + user_turn(ASK)))) <= budget)]


def write_questions(trainer: BlockTrainer, render: Render, contexts: Sequence[list[dict]],
                    sampling: Sampling) -> list[list[str]]:
    """For each context, the questions the teacher writes about it in one pass: a list for each of
    the ``REQUESTS``, each question once."""
    if not contexts:
        return []
    written: list[list[str]] = [[] for _ in contexts]
    for request in REQUESTS:
        prompts = [render(ctx + user_turn(request)) for ctx in contexts]
        for index, text in enumerate(trainer.generate(prompts, sampling, new_block=False)):
            written[index].append(text)
    return [list(dict.fromkeys(q for text in texts for q in parse_questions(text))) for texts in written]


def answer(trainer: BlockTrainer, render: Render, asked: Sequence[tuple[int, list[dict], str]],
           grounding: float) -> list[Lesson]:
    """The teacher's answers to ``asked`` (session, context, question), those the context grounds."""
    if not asked:
        return []
    prompts = [render(ctx + user_turn(q)) for _, ctx, q in asked]
    answers = [a.strip() for a in trainer.generate(prompts, ANSWER, new_block=False)]
    whole = [i for i, a in enumerate(answers) if a and len(trainer.encode(a)) < ANSWER.max_tokens]
    contrast = _elsewhere(asked)
    scores = _evidence(trainer, render, [prompts[i] for i in whole], [asked[i][2] for i in whole],
                       [answers[i] for i in whole], [contrast[i] for i in whole])
    return [Lesson(asked[i][0], tuple(asked[i][1]), asked[i][2], answers[i], taught, evidence)
            for i, (taught, evidence) in zip(whole, scores) if evidence >= grounding]


def _evidence(trainer: BlockTrainer, render: Render, prompts: Sequence[str], questions: Sequence[str],
              answers: Sequence[str], contrasts: Sequence[list[dict]]) -> list[tuple[float, float]]:
    """For each answer: its log-probability after its prompt (the window in context, then the
    question), and how many nats more likely that makes it than the question after its contrast."""
    taught = logprob(trainer, prompts, answers, new_block=False)
    elsewhere = logprob(trainer, [render(c + user_turn(q)) for c, q in zip(contrasts, questions)], answers,
                        new_block=False)
    return [(t, t - e) for t, e in zip(taught, elsewhere)]


def _elsewhere(asked: Sequence[tuple[int, Sequence[dict], str]]) -> list[list[dict]]:
    """For each (session, window, question): the window it is weighed against, the first window of
    another session after its own among those asked about (wrapping round to the first), or none."""
    keys = [repr(list(context)) for _, context, _ in asked]
    windows: dict[str, tuple[int, list[dict]]] = {}  # each window once, in the order first asked about
    for key, (sid, context, _) in zip(keys, asked):
        windows.setdefault(key, (sid, list(context)))
    order = list(windows)
    result = []
    for key, (sid, _, _) in zip(keys, asked):
        start = order.index(key)
        after = [windows[k][1] for k in order[start + 1:] + order[:start] if windows[k][0] != sid]
        result.append(after[0] if after else [])
    return result


def lessons_of(trainer: BlockTrainer, render: Render, sessions: Sequence[tuple[int, Sequence[dict]]], *,
               lists: int, grounding: float, rng: random.Random, until: float | None = None) -> list[Lesson]:
    """Tonight's lessons, oldest session first; a question two sessions answer keeps the newer answer.

    The user's own questions and the teacher's greedy lists are always answered. Up to ``lists - 1``
    sampled passes widen them, each written and answered only if it can end by ``until`` (a
    ``time.monotonic()`` value), judged by what the greedy pass took: on a slow model the night
    keeps its time for training."""
    contexts = [(sid, ctx) for sid, messages in sessions for ctx in session_contexts(trainer, render, messages)]
    seen: set[tuple[int, str]] = set()  # (context index, question): each is answered once
    lessons: list[Lesson] = []

    def teach_pass(sampling: Sampling, first: bool) -> None:
        written = write_questions(trainer, render, [ctx for _, ctx in contexts], sampling)
        asked = []
        for index, ((sid, ctx), questions) in enumerate(zip(contexts, written)):
            for question in (_asked_by_user(ctx) if first else []) + questions:
                if (index, question) not in seen:
                    seen.add((index, question))
                    asked.append((sid, ctx, question))
        lessons.extend(answer(trainer, render, asked, grounding))

    started = time.monotonic()
    teach_pass(QUESTIONS, first=True)
    took = time.monotonic() - started
    for _ in range(lists - 1):
        if until is not None and time.monotonic() + took > until:
            break
        teach_pass(replace(QUESTIONS, temperature=0.8, seed=rng.randrange(2**31)), first=False)
    order = {sid: rank for rank, (sid, _) in enumerate(sessions)}
    newest = {lesson.question: lesson for lesson in sorted(lessons, key=lambda lesson: order[lesson.session_id])}
    return list(newest.values())


REPHRASE = 'Ask this question in other words, as one question: "{}"'


def rephrased(trainer: BlockTrainer, render: Render, lessons: Sequence[Lesson], probes: Sequence[Probe],
              grounding: float) -> list[Probe]:
    """Probes for the taught ``lessons`` whose answer no held-out question (``probes``) asks: the
    teacher, the window in context, puts each question in other words; a rephrasing counts when the
    window grounds the same answer for it (``grounding`` nats), and it is asked with that answer."""
    probed = {(p.session_id, p.reference) for p in probes}
    lessons = [lesson for lesson in lessons if (lesson.session_id, lesson.answer) not in probed]
    if not lessons:
        return []
    asked = [render(list(l.context) + user_turn(REPHRASE.format(l.question))) for l in lessons]
    written = [next(iter(parse_questions(text)), "") for text in trainer.generate(asked, QUESTIONS, new_block=False)]
    found = [(l, q) for l, q in zip(lessons, written) if q and q.lower() != l.question.lower()]
    if not found:
        return []
    scores = _evidence(trainer, render, [render(list(l.context) + user_turn(q)) for l, q in found],
                       [q for _, q in found], [l.answer for l, _ in found],
                       _elsewhere([(l.session_id, l.context, q) for l, q in found]))
    return [Probe(q, l.answer, l.session_id, taught) for (l, q), (taught, evidence) in zip(found, scores)
            if evidence >= grounding]


def rows(trainer: BlockTrainer, render: Render, sessions: Sequence[tuple[int, Sequence[dict]]],
         taught: Sequence[Lesson], replayed: Sequence[Probe]) -> list[Row]:
    """The consolidation's rows: each taught question (teacher: the window in context; student: the
    question alone), each window of tonight's ``sessions`` recited (``recitals``), and each earlier
    answer replayed (teacher and student alike: the live stack)."""
    return ([Row(render(list(l.context) + user_turn(l.question)), render(user_turn(l.question)), l.answer,
                 question=l.question, session_id=l.session_id) for l in taught]
            + recitals(trainer, render, sessions)
            + [Row(render(user_turn(p.question)), render(user_turn(p.question)), p.reference, kind="replay",
                   question=p.question, session_id=p.session_id) for p in replayed])


def recitals(trainer: BlockTrainer, render: Render, sessions: Sequence[tuple[int, Sequence[dict]]]) -> list[Row]:
    """Each window of ``sessions`` (session id, messages) the teacher reads, recited: rows whose answer
    is the user's own words, asked for by ``RECITE``, ``RECITALS`` times. The teacher reads them from
    its context; the student learns to say them (GKD's supervised rows: a fixed completion, the
    teacher's distribution at each of its tokens). The lessons teach the teacher's questions; the
    recital, what the user said in their own phrasing, from which the block answers ways of asking
    the teacher never wrote, and facts it wrote no question about.

    A window is recited in pieces of whole sentences up to ``QUESTIONS.max_tokens`` tokens, the
    room ``session_contexts`` leaves for a reply, so each row fits the model's context."""
    return [Row(render(context + user_turn(RECITE)), render(user_turn(RECITE)), piece, question=RECITE,
                session_id=sid)
            for sid, messages in sessions for context in session_contexts(trainer, render, messages)
            for piece in pieces(trainer, context[0]["content"]) for _ in range(RECITALS)]


def pieces(trainer: BlockTrainer, text: str, limit: int = QUESTIONS.max_tokens) -> list[str]:
    """``text`` in runs of whole sentences of at most ``limit`` tokens, as the user wrote them, line
    breaks included; a sentence longer than ``limit`` is a run of its own pieces of ``limit`` tokens."""
    parts = SENTENCE_GAP.split(text.strip())
    result: list[str] = []
    gap = ""
    for sentence, after in zip(parts[::2], parts[1::2] + [""]):
        if not (sentence := sentence.strip()):
            continue
        if len(ids := trainer.encode(sentence)) > limit:
            result += [trainer.decode(ids[i:i + limit]).strip() for i in range(0, len(ids), limit)]
        elif result and len(trainer.encode(result[-1] + gap + sentence)) <= limit:
            result[-1] += gap + sentence
        else:
            result.append(sentence)
        gap = after
    return [piece for piece in result if piece]


def _asked_by_user(context: list[dict]) -> list[str]:
    """The questions the user asked in the window: their answers are in the session too."""
    return [s for s in sentences(context[0]["content"]) if s.endswith(("?", "\uff1f")) and len(s) <= 200]


def hold_out(lessons: Sequence[Lesson], share: float, rng: random.Random) -> tuple[list[Lesson], list[Probe]]:
    """(taught, probes): up to ``share`` of the questions become the gate's probes, never trained
    on, each one a question whose teacher's answer another question, still taught, also gets (the
    teacher's own words, identical: the same fact asked in other words). A fact asked only once
    stays taught: held out, it would be a fact the night never saw."""
    by_answer: dict[tuple[int, str], list[Lesson]] = {}
    for lesson in lessons:
        by_answer.setdefault((lesson.session_id, lesson.answer), []).append(lesson)
    spare = [lesson for group in by_answer.values() for lesson in rng.sample(group, len(group))[1:]]
    held = {id(lesson) for lesson in rng.sample(spare, min(len(spare), round(len(lessons) * share)))}
    return [l for l in lessons if id(l) not in held], [l.probe() for l in lessons if id(l) in held]
