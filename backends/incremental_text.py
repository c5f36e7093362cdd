"""Streaming text out of a token loop without ever showing half a character.

Byte-level tokens can end in the middle of a multi-byte character; every engine that decodes
its own tokens needs the same careful bookkeeping, so it lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalText:
    """Turns a growing list of token ids into new text pieces.

    A tail that decodes to U+FFFD (an incomplete character) is held back until the next token
    completes it. Only a short window of recent tokens is decoded each step, so streaming stays
    linear in the output length.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.window_start = 0  # first token of the window decoded each step
        self.read_end = 0  # tokens up to here have been turned into text

    def add(self, token: int) -> str:
        self.ids.append(token)
        seen = self.decode(self.ids[self.window_start : self.read_end])
        text = self.decode(self.ids[self.window_start :])
        if len(text) <= len(seen) or text.endswith("\ufffd"):
            return ""
        self.window_start, self.read_end = self.read_end, len(self.ids)
        return text[len(seen) :]

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        seen = self.decode(self.ids[self.window_start : self.read_end])
        return self.decode(self.ids[self.window_start :])[len(seen) :]
