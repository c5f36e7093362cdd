"""What the chat view shows: a recorded session, a new one, or a private one."""

from __future__ import annotations

from dataclasses import dataclass

from assistant.chat import Chat


@dataclass
class Conversation:
    """What the chat view shows: a recorded session (None until its first turn) or a private one."""

    session_id: int | None = None
    private: bool = False
    chat: Chat | None = None  # built once the model is loaded
