"""The chat engine: one conversation with a loaded backend, recorded turn by turn.

What is recorded, and when:
- the user's turn is stored *before* generation starts, so nothing the user wrote is lost,
  even when the reply fails, is cancelled, or the message is too long for the model;
- once generation has started, exactly one assistant turn is stored when it ends: ``complete``,
  ``cancelled`` (the partial text the user saw, when ``cancel`` is set or on Ctrl-C) or
  ``error`` (the partial text, when the engine fails);
- the prompt is built from complete turns only, so an interrupted reply never reads as if the
  model had said it;
- a private chat records nothing at all; it keeps its turns in memory for its own context;
- the system prompt goes before every prompt and is never recorded: it is not part of the session;
- with a ``journal``, a reply in flight is marked on disk, so one that a native engine crash cut
  short (no Python frame is left to record it) is told at the next start.

``Chat.reply`` blocks and reports pieces through a callback, so a TUI runs it in a worker thread
and cancels it from the interface thread with a ``threading.Event``. One reply at a time per Chat.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from backends.base import Backend, Sampling

from assistant.config import Config, SomnusError
from assistant.crashes import ReplyJournal
from assistant.persona import framed
from assistant.store import Store, now


class ChatError(SomnusError):
    """A turn that cannot be answered as asked."""


class ContextOverflowError(ChatError):
    """The newest message alone does not fit in the model's context (it is still recorded)."""


@dataclass(frozen=True)
class Reply:
    """How a turn ended. ``message_id`` is the stored assistant turn (None when private)."""

    text: str
    status: str
    session_id: int | None
    message_id: int | None
    prompt_tokens: int
    completion_tokens: int


def sampling_from(config: Config) -> Sampling:
    return Sampling(max_tokens=config.max_tokens, temperature=config.temperature)


class Chat:
    """A session's conversation: prompts from its history, replies streamed and recorded."""

    def __init__(
        self,
        backend: Backend,
        *,
        model: str,
        store: Store | None = None,
        session_id: int | None = None,
        sampling: Sampling = Sampling(),
        private: bool = False,
        system: str | None = None,
        journal: ReplyJournal | None = None,
    ) -> None:
        if store is None and not private:
            raise ValueError("a recorded chat needs a store (or pass private=True)")
        self.backend = backend
        self.model = model
        self.sampling = sampling
        self.private = private
        self.system = system  # put before every prompt, never recorded: it is not part of the session
        self._store = store
        self._journal = journal
        self._session_id = session_id
        self._history: list[dict[str, str]] = []
        if session_id is not None and store is not None:
            store.session(session_id)  # a clear error now for an unknown id, not at the first turn
            self._history = [{"role": m["role"], "content": m["content"]}
                             for m in store.messages(session_id) if m["status"] == "complete"]

    @property
    def session_id(self) -> int | None:
        """The recorded session (created at the first turn; always None for a private chat)."""
        return None if self.private else self._session_id

    def reply(
        self,
        text: str,
        *,
        on_piece: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Reply:
        """Record ``text`` as the user's turn, then generate, stream and record the answer."""
        if not text.strip():
            raise ChatError("the message is empty")
        self._record("user", text)
        self._history.append({"role": "user", "content": text})
        prompt, prompt_tokens = self._fit_prompt()
        started = now()
        pieces: list[str] = []
        in_flight = self._journal.replying(self.session_id, self.model) if self._journal else nullcontext()
        try:
            with in_flight:
                for piece in self.backend.stream(prompt, self.sampling, cancel):
                    pieces.append(piece)
                    if on_piece is not None:
                        on_piece(piece)
        except KeyboardInterrupt:
            self._finish("".join(pieces), "cancelled", prompt_tokens, started)
            raise
        except BaseException:
            self._finish("".join(pieces), "error", prompt_tokens, started)
            raise
        status = "cancelled" if cancel is not None and cancel.is_set() else "complete"
        return self._finish("".join(pieces), status, prompt_tokens, started)

    def _finish(self, text: str, status: str, prompt_tokens: int, started: str) -> Reply:
        """Record the assistant's turn; token counts are of the text as the model would re-read it."""
        completion_tokens = self.backend.count_tokens(text) if text else 0
        message_id = self._record("assistant", text, status=status, model=self.model, created=started,
                                  prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        if status == "complete":
            self._history.append({"role": "assistant", "content": text})
        return Reply(text, status, self.session_id, message_id, prompt_tokens, completion_tokens)

    def _record(self, role: str, content: str, **details: object) -> int | None:
        if self.private:
            return None
        assert self._store is not None
        if self._session_id is None:
            self._session_id = self._store.create_session(model=self.model)
        return self._store.add_message(self._session_id, role, content, **details)

    def _fit_prompt(self) -> tuple[str, int]:
        """The prompt of the most recent turns that leave room for the reply, and its token count.

        Binary search over how many turns to keep: rendering grows with every turn added, and a
        long session would otherwise be rendered once per turn. The system prompt goes first when
        the newest turn would not fit beside it: the user's message matters more.
        """
        context = self.backend.context_length
        budget = context - self.sampling.max_tokens
        if budget <= 0:
            raise ChatError(f"max_tokens ({self.sampling.max_tokens}) leaves no room for a prompt in the "
                            f"model's {context}-token context: lower max_tokens in config.toml")
        measured: dict[tuple[int, str | None], tuple[str, int]] = {}
        system = self.system

        def measure(turns: int) -> tuple[str, int]:
            if (turns, system) not in measured:
                prompt = self.backend.render_chat(framed(self._history[-turns:], system),
                                                  add_generation_prompt=True)
                measured[turns, system] = (prompt, self.backend.count_tokens(prompt))
            return measured[turns, system]

        if system is not None and measure(1)[1] > budget:
            system = None
        newest_tokens = measure(1)[1]
        if newest_tokens > budget:
            recorded = "" if self.private else "it was recorded, but "
            raise ContextOverflowError(
                f"the message is too long for the model: {newest_tokens} tokens, but only {budget} of its "
                f"{context}-token context are left after the reply's {self.sampling.max_tokens}; "
                f"{recorded}not answered")
        low, high = 1, len(self._history)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if measure(middle)[1] <= budget else (low, middle - 1)
        if self._history[-low]["role"] == "assistant":
            low -= 1  # start the window on a user turn, as conversations do
        return measure(low)
