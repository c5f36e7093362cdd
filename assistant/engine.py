"""The chat engine a session talks to: the configured model, loaded, wearing the live adapter stack.

Loading a model takes seconds (torch alone takes a while to import), so the app loads it in a
worker thread and a message sent meanwhile waits for it; the CLI loads it at once. The engine
wears the live stack from the store: what the model learnt in its sleeps. A reply holds the
engine for its whole generation, so ``reload`` (after a sleep promotes a new adapter, or on a
change of model) waits for the reply in flight and never pulls the model from under it.
``bind`` points a conversation's ``Chat`` at whatever the engine holds now, with the system
prompt that model reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from assistant.chat import Chat, sampling_from
from assistant.config import Config, Paths, SomnusError
from assistant.models import (
    Model,
    ModelError,
    Progress,
    gguf_for,
    local_model,
    system_prompt_for,
)

if TYPE_CHECKING:
    from assistant.crashes import ReplyJournal
    from assistant.store import Store
    from backends.base import Backend


class EngineUnavailable(SomnusError):
    """The model could not be loaded; the message says why and what to change."""


def open_chat_backend(config: Config, paths: Paths, store: Store | None = None,
                      progress: Progress | None = None) -> tuple[Backend, Model]:
    """The chat backend for the configured model and engine setting, loaded, and the model it runs.
    A packaged model's first use imports it, reporting to ``progress``.

    With a ``store``, the backend wears the live adapter stack: what the model learnt in its sleeps.
    """
    from assistant.adapters import live_adapters
    from backends.select import choose_engines, open_backend

    model = local_model(config.model, paths, progress)
    requested = "llamacpp" if model.kind == "gguf" and config.backend == "auto" else config.backend
    engine, _training_engine = choose_engines(requested)
    if engine == "llamacpp":
        backend = open_backend(engine, gguf_path=gguf_for(model, paths, progress))
    elif model.kind == "gguf":
        raise ModelError(f"the {engine} engine needs a Hugging Face model folder, not the GGUF file {model.path}: "
                         "use --backend llamacpp")
    else:
        backend = open_backend(engine, hf_dir=model.path)
    if store is not None:
        backend.set_adapters(live_adapters(store, model))
    return backend, model


class ChatEngine:
    """One chat backend and the model it runs, shared by the conversations of an app or a command.

    ``store`` is where the live adapter is read (None: the bare model, for a private chat on a
    machine that has recorded nothing yet).
    """

    def __init__(self, paths: Paths, config: Config, store: Store | None,
                 progress: Progress | None = None) -> None:
        self.paths = paths
        self.config = config
        self.store = store
        self.backend: Any = None
        self.model: Model | None = None
        self.problem: str | None = None  # why the model could not be loaded, as one line
        self.error: Exception | None = None  # and the error itself, for callers that raise it as it is
        self.adapter_version: int | None = None  # the live adapter when the model was opened
        self._progress = progress
        self._loaded = threading.Event()
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self.problem is None

    @property
    def loading(self) -> bool:
        return not self._loaded.is_set()

    def outdated(self) -> bool:
        """A sleep (here or in another process) promoted an adapter, or a rollback retired one, since loading."""
        if not self.ready or self.store is None:
            return False
        return self._live_version() != self.adapter_version

    def load(self) -> None:
        """Open the configured model (blocking: the app calls it from a worker thread)."""
        with self._lock:
            self._open()

    def reload(self, config: Config | None = None) -> None:
        """Close the model and open it again (with ``config`` when given), once no reply is running."""
        with self._lock:
            self._loaded.clear()  # under the lock, so a load finishing meanwhile cannot mark a closed engine ready
            self._close()
            if config is not None:
                self.config = config
            self._open()

    @contextmanager
    def using(self) -> Iterator[tuple[Any, Model]]:
        """The backend and model, held for the block; waits while the model loads."""
        self._loaded.wait()
        with self._lock:
            if self.problem is not None:
                raise EngineUnavailable(self.problem)
            yield self.backend, self.model

    def bind(self, chat: Chat | None, backend: Any, model: Model, *, store: Store | None = None,
             session_id: int | None = None, private: bool = False,
             journal: ReplyJournal | None = None) -> Chat:
        """``chat`` (a new one for the session when None) on ``backend`` and ``model``, as held by
        ``using``, with the system prompt and sampling this model reads under the config."""
        if chat is None:
            chat = Chat(backend, model=model.ref, store=store, session_id=session_id,
                        sampling=sampling_from(self.config), private=private, journal=journal)
        chat.backend, chat.model = backend, model.ref
        chat.system = system_prompt_for(model, self.config)
        return chat

    def close(self) -> None:
        with self._lock:
            self._close()

    def _live_version(self) -> int | None:
        live = self.store.sleep.live_adapter() if self.store is not None else None
        return live["version"] if live else None

    def _open(self) -> None:
        self.problem = self.error = None
        self.adapter_version = self._live_version()  # read first: a promotion landing meanwhile shows as a change
        try:
            self.backend, self.model = open_chat_backend(self.config, self.paths, self.store, self._progress)
        except Exception as error:  # engines raise their own error types; the caller shows the line
            self.error = error
            self.problem = " ".join(str(error).split()) or type(error).__name__
        finally:
            self._loaded.set()

    def _close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend = self.model = None
