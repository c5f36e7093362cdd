"""What a night learns from: a session's knowledge as the teacher's context.

What the user said is the knowledge; the assistant's earlier replies are not (they may be wrong, and
the user may have corrected them), so the teacher's context holds the user's turns only, in order,
so that a later statement supersedes an earlier one. A session longer than the context budget is
split into overlapping windows of user turns rather than silently cut.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

ACKNOWLEDGEMENT = "Noted."
SENTENCE_GAP = re.compile(r"((?<=[.!?])\s+|\n)")  # captured, so a split keeps the gaps (``teach.pieces``)


def user_turn(text: str) -> list[dict]:
    """A chat of one user message (a question put to the student, or to the teacher after a context)."""
    return [{"role": "user", "content": text}]


def said(messages: Sequence[dict]) -> str:
    """The user's words in ``messages``, one turn per line."""
    return "\n".join(m["content"].strip() for m in messages if m["role"] == "user" and m["content"].strip())


def knowledge_context(messages: Sequence[dict]) -> list[dict]:
    """The user's turns, in order, as one message the teacher has "heard", then a neutral reply."""
    return [{"role": "user", "content": said(messages)}, {"role": "assistant", "content": ACKNOWLEDGEMENT}]


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


def sentences(text: str) -> list[str]:
    """``text`` cut after each full stop, question or exclamation mark and at each line break."""
    return [sentence for sentence in map(str.strip, SENTENCE_GAP.split(text)) if sentence]
