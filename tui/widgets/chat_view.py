"""The conversation: the user's turns as typed, the assistant's as Markdown, streamed as they come.

The view is anchored to its end, so a streaming reply stays in sight; a user who scrolls up to
read is left alone (Textual releases the anchor) until they scroll back down or send a message.
"""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

STATUS_NOTES = {"cancelled": "stopped", "error": "failed"}


class UserTurn(Static):
    """What the user wrote, shown as typed (never read as markup)."""

    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False, classes="turn")


class AssistantTurn(Markdown):
    """A reply; while it streams, ``stream`` appends the pieces as they arrive."""

    def __init__(self, text: str = "", status: str = "complete") -> None:
        super().__init__(text, classes="turn")
        self.mark(status)

    def begin_stream(self) -> MarkdownStream:
        return Markdown.get_stream(self)

    def mark(self, status: str) -> None:
        """Say under the reply when it did not end normally (kept as the user saw it)."""
        self.set_class(status in STATUS_NOTES, "-incomplete")
        self.border_subtitle = STATUS_NOTES.get(status, "")


class Notice(Static):
    """A line from Somnus itself (an error, a loading model), not part of the conversation."""

    def __init__(self, text: str, *, error: bool = False) -> None:
        super().__init__(text, markup=False, classes="notice -error" if error else "notice")


class ChatView(VerticalScroll):
    """The turns of the session on screen."""

    def on_mount(self) -> None:
        self.anchor()

    async def show_messages(self, messages: list[dict]) -> None:
        """Replace the view with a stored session's messages."""
        await self.remove_children()
        await self.mount_all([UserTurn(message["content"]) if message["role"] == "user"
                              else AssistantTurn(message["content"], message["status"])
                              for message in messages if message["role"] in ("user", "assistant")])
        self.anchor()

    async def add_turn(self, text: str) -> AssistantTurn:
        """The user's turn and an empty reply under it, scrolled into view (sending re-anchors)."""
        reply = AssistantTurn()
        await self.mount_all([UserTurn(text), reply])
        self.anchor()
        return reply

    async def add_notice(self, text: str, *, error: bool = False) -> Notice:
        notice = Notice(text, error=error)
        await self.mount(notice)
        return notice
