"""The loaded model behind the app's conversations: loaded off the interface thread, swapped whole.

Loading a model takes seconds (torch alone takes a while to import), so the app opens at once and
the engine loads in a worker thread; a message sent meanwhile waits for it. The engine wears the
live adapter stack from the store: what the model learnt in its sleeps. A reply holds the
engine for its whole generation, so ``reload`` (after a sleep promotes a new adapter, or on
``/model``) waits for the reply in flight and never pulls the model from under it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from assistant.config import Config, Paths, SomnusError

if TYPE_CHECKING:
    from assistant.store import Store


class EngineUnavailable(SomnusError):
    """The model could not be loaded; the message says why and what to change."""


class ChatEngine:
    """One chat backend and the model it runs, shared by the app's conversations."""

    def __init__(self, paths: Paths, config: Config, store: Store) -> None:
        self.paths = paths
        self.config = config
        self.store = store
        self.backend: Any = None
        self.model: Any = None
        self.problem: str | None = None
        self.adapter_version: int | None = None  # the live adapter when the model was opened
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
        if not self.ready:
            return False
        live = self.store.sleep.live_adapter()
        return (live["version"] if live else None) != self.adapter_version

    def load(self) -> None:
        """Open the configured model (blocking: call it from a worker thread)."""
        with self._lock:
            self._open()

    def reload(self, config: Config | None = None) -> None:
        """Close the model and open it again (with ``config`` when given), once no reply is running."""
        self._loaded.clear()
        with self._lock:
            self._close()
            if config is not None:
                self.config = config
            self._open()

    @contextmanager
    def using(self) -> Iterator[tuple[Any, Any]]:
        """The backend and model, held for the block; waits while the model loads."""
        self._loaded.wait()
        with self._lock:
            if self.problem is not None:
                raise EngineUnavailable(self.problem)
            yield self.backend, self.model

    def _open(self) -> None:
        from assistant.models import open_chat_backend

        self.problem = None
        live = self.store.sleep.live_adapter()  # read first: a promotion landing meanwhile shows as a change
        self.adapter_version = live["version"] if live else None
        try:
            self.backend, self.model = open_chat_backend(self.config, self.paths, self.store)
        except Exception as error:  # engines raise their own error types; the app shows the line
            self.problem = " ".join(str(error).split()) or type(error).__name__
        finally:
            self._loaded.set()

    def _close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend = self.model = None
