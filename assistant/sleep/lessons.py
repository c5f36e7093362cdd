"""What a night learns from: a session's knowledge as the teacher's context, and prompts about it.

What the user said is the knowledge; the assistant's earlier replies are not (they may be wrong, and
the user may have corrected them), so the teacher's context holds the user's turns only, in order,
so that a later statement supersedes an earlier one. A session longer than the context budget is
split into overlapping windows of user turns rather than silently cut.

Prompts come from the session itself: the questions the user asked in it, and questions the teacher
writes when asked about it, and about each sentence the user told alone, so that no fact goes
unasked (any chat model can; the bundled nano model was trained to). A share of
them is held out as the gate's probes, never trained on: rephrasings of what another question
teaches (or a question asked once, after a lead-in its training did not use), so that every fact
the teacher asks about is learnt and the gate asks it in words the night never trained on, as the
user will.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from assistant.sleep.counterfactual import folded, mentions, names
from assistant.sleep.rewards import normalise_answer

QUESTION_REQUEST = "What questions could I ask about this conversation?"
RESTATE_REQUEST = "What did I tell you?"
ACKNOWLEDGEMENT = "Noted."
# Ways a user may lead into a question, none of them a question's own wording: the student is asked
# each taught question in a few of them as well, so that what it learns answers the question however
# it is put, not only after the teacher's exact words. Taught only in the teacher's words, the bench's
# first night recalled 57% and 43% (sleep seeds 0 and 3) of questions in phrasings it never saw
# ("Do you remember what my dog is called?"); with two framings a question, 67% and 63%.
FRAMINGS = ("Quick question: {}", "I forgot. {}", "Hey, {}", "Tell me, {}", "Sorry to ask again, {}")
_FIRST_PERSON = frozenset({"i", "i'm", "i've", "i'd", "i'll", "me", "my", "mine", "myself", "we", "us", "our"})
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
_TOKEN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9'-]*[A-Za-z0-9])?")  # a word or a number ("42", "Zara's")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s*(.+?\?)\s*$")


@dataclass
class Lesson:
    """One window of one session: the teacher's context, and the questions it answers."""

    session_id: int
    context: list[dict]
    prompts: list[str] = field(default_factory=list)


def user_turn(text: str) -> list[dict]:
    """A chat of one user message (a question put to the student, or to the teacher after a context)."""
    return [{"role": "user", "content": text}]


def knowledge_context(messages: Sequence[dict]) -> list[dict]:
    """The user's turns, in order, as one message the teacher has "heard", then a neutral reply."""
    said = [m["content"].strip() for m in messages if m["role"] == "user" and m["content"].strip()]
    return [{"role": "user", "content": "\n".join(said)}, {"role": "assistant", "content": ACKNOWLEDGEMENT}]


def framed(question: str, framing: str) -> str:
    """``question`` led in by one of the ``FRAMINGS`` ("Hey, where do I live?")."""
    if framing.endswith(", {}") and question[:2] != question[:2].upper():
        question = question[0].lower() + question[1:]
    return framing.format(question)


def unframed(question: str) -> str:
    """``question`` without the lead-in ``framed`` put before it ("Hey, where do I live?" asks
    "where do I live?"): a lead-in says nothing about what is asked."""
    for framing in FRAMINGS:
        lead_in = framing.removesuffix("{}")
        if question.lower().startswith(lead_in.lower()):
            return question[len(lead_in):]
    return question


def said(context: Sequence[dict]) -> str:
    """The user's words in a context, one turn per line (a knowledge context's single turn)."""
    return "\n".join(m["content"] for m in context if m["role"] == "user")


def windows(messages: Sequence[dict], fits: Callable[[list[dict]], bool], overlap: int = 2) -> list[list[dict]]:
    """Split a session's user turns into windows whose context ``fits``, consecutive ones overlapping."""
    turns = [m for m in messages if m["role"] == "user" and m["content"].strip()]
    if not turns or fits(knowledge_context(turns)):
        return [list(turns)] if turns else []
    result: list[list[dict]] = []
    start = 0
    while start < len(turns):
        end = start + 1
        while end < len(turns) and fits(knowledge_context(turns[start : end + 1])):
            end += 1
        result.append(turns[start:end])
        if end >= len(turns):
            break
        start = max(start + 1, end - overlap)
    return result


def parse_questions(text: str) -> list[str]:
    """The numbered questions of a reply ("1. Where is John?"), in order, without duplicates."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match:
            seen.setdefault(match.group(1), None)
    return list(seen)


def sentences(text: str) -> list[str]:
    """``text`` cut after each full stop, question or exclamation mark and at each line break."""
    return [sentence for sentence in map(str.strip, _SENTENCE_END.split(text)) if sentence]


def _user_sentences(messages: Sequence[dict]) -> list[str]:
    """The user's sentences, in order, each once."""
    found: dict[str, None] = {}
    for message in messages:
        if message["role"] == "user":
            for sentence in sentences(message["content"]):
                found.setdefault(sentence, None)
    return list(found)


def asked_questions(messages: Sequence[dict]) -> list[str]:
    """Questions the user asked during the session, each a prompt whose answer is in the session."""
    return [sentence for sentence in _user_sentences(messages) if sentence.endswith("?") and len(sentence) < 200]


def statement_contexts(messages: Sequence[dict]) -> list[list[dict]]:
    """Each sentence the user told (not asked) as a knowledge context of its own.

    Asked about a whole session, a small model writes questions about two or three of its facts
    and leaves the rest untaught: on the bench's first night (sleep seed 0) it wrote no question
    about 2 of the 30 facts and only a garbled one about a third, and the block recalled none of
    the three. Asked about one sentence at a time, it writes a question about
    that sentence's fact (the teacher still answers it with the whole session in context). Bench
    night 1 (sleep seed 1234, 288 anchors): the gate's pick held 66% of the night's 67 held-out
    phrasings without these contexts and 82% with them."""
    return [knowledge_context([{"role": "user", "content": sentence}])
            for sentence in _user_sentences(messages) if not sentence.endswith("?")]


def told(question: str, answer: str, context: Sequence[dict]) -> bool:
    """Whether the user told ``answer``'s value about whom ``question`` asks: a sentence they said
    holds the answer's most specific word (of those the question does not ask, the one fewest
    sentences say) and names the question's subject: every name it asks about, or the user
    ("I", "my") when it names no one. A question about neither needs only the sentence.

    Why: a small teacher answers whatever it is asked from whatever it is given. Asked about
    "Alexander works as a sailor." alone, the nano model wrote "What is my job?", and with the
    session in context the teacher answered "You work as a sailor.": taught, that made bench night
    1's architect a sailor in both held-out phrasings. An answer no sentence says (a city for a
    session that names none) is the teacher's invention, not the user's knowledge, and is not taught
    either: a fact the user told still has the questions written about its own sentence."""
    user_sentences = _user_sentences(context)
    asked = {folded(word) for word in _TOKEN.findall(question)}
    saying: dict[str, list[int]] = {}
    for word in _TOKEN.findall(answer):
        key = folded(word)
        if key not in asked and key not in saying:
            if found := [i for i, sentence in enumerate(user_sentences) if mentions(sentence, key)]:
                saying[key] = found
    if not saying:
        return False
    fewest = min(map(len, saying.values()))
    subject = names(question)

    def about_subject(sentence: str) -> bool:
        said = {folded(word) for word in _TOKEN.findall(sentence)}
        if subject:
            return subject <= said
        return not asked & _FIRST_PERSON or bool(said & _FIRST_PERSON)

    return any(about_subject(user_sentences[i]) for found in saying.values() if len(found) == fewest for i in found)


def hold_out(answers: dict[str, str], share: float, rng: random.Random) -> tuple[set[str], list[str]]:
    """The gate's probes among ``answers`` (question -> the teacher's answer), about ``share`` of
    them (one at least, unless ``share`` is 0): ``(held, lone)``. ``held`` leave training: questions whose answer another
    question also gets (one question per answer stays in training). When there are too few of
    those, ``lone`` questions (no other question gets their answer) fill the share: they stay in
    training, and the gate asks them in a framing their training did not use.

    Holding out questions at random left a fact whose only question was drawn untaught: 17% and
    20% of the bench's first night (sleep seeds 0 and 3) were never trained on, and none recalled.
    A bAbI night asks "Where is X?" once per person, so its one probe was a person left untaught."""
    if not answers or share <= 0:
        return set(), []
    by_answer: dict[str, list[str]] = defaultdict(list)
    for question, answer in answers.items():
        by_answer[normalise_answer(answer)].append(question)  # the same answer as the gate sees it
    spare = [question for questions in by_answer.values() for question in rng.sample(questions, len(questions))[1:]]
    rng.shuffle(spare)
    wanted = max(1, round(len(answers) * share))
    held = spare[:wanted]
    lone = sorted(questions[0] for questions in by_answer.values() if len(questions) == 1)
    return set(held), rng.sample(lone, min(len(lone), wanted - len(held))) if len(held) < wanted else []
