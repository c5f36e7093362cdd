"""Counterfactual sessions: tonight's sessions with the answer's value swapped for another's.

A night that consolidates "my sister is called Zara" must not make the model answer "Zara" when
today's context says her name is Mia: what is in the context is newer than what is in the weights.
Measured on the bundled model: after a first night, 13 of 47 in-context fact answers it had right
turned into a value it had just consolidated ("favourite food: jasmine", learnt as a flower), and
none turned right. Generic anchors cannot teach this, because they never contradict tonight's facts.

So the sleep writes contradictions itself. In the answer to one of tonight's questions, the value
is a word the answer shares with its session and no other session mentions; a copy of the session
with that word replaced by another session's value is a session in which the right answer is the
other value. The pre-sleep model reads it (the cycle keeps only copies it reads correctly), and the
new block is anchored to that reading. This needs no knowledge of what the facts are about.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")
_AFTER = r"(?![\w-])(?!'(?!s\b))"  # a whole word ends here; "Zara's" still mentions "Zara"


def _whole(word: str) -> re.Pattern:
    return re.compile(rf"(?<![\w'-]){re.escape(word)}{_AFTER}", re.IGNORECASE)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def folded(word: str) -> str:
    """A word as words are compared: lower-cased, a possessive folded ("Zara's" -> "zara")."""
    return word.lower().removesuffix("'s")


def names(question: str) -> set[str]:
    """The names a question asks about, folded: its capitalised words after the first, not "I"."""
    return {folded(word) for word in words(question)[1:] if word[0].isupper() and word[1:2].islower()}


def mentions(text: str, word: str) -> bool:
    """Whether ``text`` has ``word`` as a whole word (case-insensitive)."""
    return _whole(word).search(text) is not None


def values(answer: str, question: str, session: str, others: Sequence[str]) -> list[str]:
    """The words of ``answer`` that carry its value: said in its ``session``, not asked in the
    ``question``, and said in none of the ``others`` (so not "called", "lives" or "the")."""
    asked = {folded(w) for w in words(question)}
    found: list[str] = []
    for word in words(answer):
        if (word.lower() not in asked and word not in found and mentions(session, word)
                and not any(mentions(other, word) for other in others)):
            found.append(word)
    return found


def swap(context: Sequence[dict], old: str, new: str) -> list[dict]:
    """A copy of ``context`` in which every whole-word ``old`` reads ``new`` (capitalised where
    ``old`` was, e.g. at the start of a sentence; a capital of ``new`` itself is kept)."""
    pattern = _whole(old)

    def replace(match: re.Match) -> str:
        written = match.group(0)
        return new[:1].upper() + new[1:] if written[:1].isupper() else new

    return [{**message, "content": pattern.sub(replace, message["content"])} for message in context]
