"""What a night learns from: a session's knowledge as the teacher's context, and prompts about it.

What the user said is the knowledge; the assistant's earlier replies are not (they may be wrong, and
the user may have corrected them), so the teacher's context holds the user's turns only, in order,
so that a later statement supersedes an earlier one. A session longer than the context budget is
split into overlapping windows of user turns rather than silently cut.

Prompts come from the session itself: the questions the user asked in it, and questions the teacher
writes about it when asked (any chat model can; the bundled nano model was trained to). A share of
the written questions is held out as the gate's probes, never trained on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

QUESTION_REQUEST = "What questions could I ask about this conversation?"
RESTATE_REQUEST = "What did I tell you?"
ACKNOWLEDGEMENT = "Noted."
_NUMBERED = re.compile(r"^\s*\d+[.)]\s*(.+?\?)\s*$")


@dataclass
class Lesson:
    """One window of one session: the teacher's context, and the prompts it answers."""

    session_id: int
    context: list[dict]
    train_prompts: list[str] = field(default_factory=list)
    probe_prompts: list[str] = field(default_factory=list)


def user_turn(text: str) -> list[dict]:
    """A chat of one user message (a question put to the student, or to the teacher after a context)."""
    return [{"role": "user", "content": text}]


def knowledge_context(messages: Sequence[dict]) -> list[dict]:
    """The user's turns, in order, as one message the teacher has "heard", then a neutral reply."""
    said = [m["content"].strip() for m in messages if m["role"] == "user" and m["content"].strip()]
    return [{"role": "user", "content": "\n".join(said)}, {"role": "assistant", "content": ACKNOWLEDGEMENT}]


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


def asked_questions(messages: Sequence[dict]) -> list[str]:
    """Questions the user asked during the session, each a prompt whose answer is in the session."""
    found: dict[str, None] = {}
    for message in messages:
        if message["role"] != "user":
            continue
        for sentence in re.split(r"(?<=[.!?])\s+|\n", message["content"]):
            if sentence.strip().endswith("?") and len(sentence) < 200:
                found.setdefault(sentence.strip(), None)
    return list(found)


def split_prompts(prompts: Sequence[str], probe_share: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """(train, probes): at least one probe when there are two prompts or more."""
    shuffled = list(dict.fromkeys(prompts))
    rng.shuffle(shuffled)
    probes = int(round(len(shuffled) * probe_share))
    if len(shuffled) >= 2:
        probes = max(1, probes)
    return shuffled[probes:], shuffled[:probes]
