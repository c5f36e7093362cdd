"""The sessions sidebar: past sessions, the most recent first, and a search over everything said."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, ListItem, ListView

UNTITLED = "(untitled)"


@dataclass(frozen=True)
class SessionEntry:
    """One line of the list: a session, with the matching words when it was found by search."""

    session_id: int
    title: str
    snippet: str = ""


def search_entries(store, query: str) -> list[SessionEntry]:
    """Sessions whose messages contain the words (full-text search, best first), then by title."""
    entries: dict[int, SessionEntry] = {}
    for hit in store.search(query, limit=50):
        entries.setdefault(hit["session_id"], SessionEntry(hit["session_id"], hit["title"], hit["snippet"]))
    wanted = query.casefold().strip()
    for session in store.sessions():
        if wanted in session["title"].casefold():
            entries.setdefault(session["id"], SessionEntry(session["id"], session["title"]))
    return list(entries.values())


class SessionItem(ListItem):
    def __init__(self, entry: SessionEntry) -> None:
        self.entry = entry
        lines = [Label(entry.title or UNTITLED, markup=False, classes="title")]
        if entry.snippet:
            lines.append(Label(" ".join(entry.snippet.split()), markup=False, classes="snippet"))
        super().__init__(*lines, id=f"session-{entry.session_id}")


class SessionMessage(Message):
    """Something the user asked of one session in the list."""

    def __init__(self, session_id: int) -> None:
        super().__init__()
        self.session_id = session_id


class SessionSidebar(Vertical):
    """Lists sessions; Enter opens one, F2 renames it, Delete asks before deleting it."""

    BINDINGS = [
        Binding("f2", "rename", "Rename"),
        Binding("delete", "delete", "Delete"),
    ]

    class Chosen(SessionMessage):
        """Open this session."""

    class RenameAsked(SessionMessage):
        """Ask the user for a new title."""

    class DeleteAsked(SessionMessage):
        """Ask the user to confirm, then delete."""

    def __init__(self, store) -> None:
        super().__init__(id="sidebar")
        self.store = store
        self.current: int | None = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search sessions", id="session-search")
        yield ListView(id="sessions")

    @property
    def query_text(self) -> str:
        return self.query_one("#session-search", Input).value

    async def reload(self) -> None:
        """List the sessions again (or the search results), keeping the current one highlighted."""
        query = self.query_text.strip()
        entries = search_entries(self.store, query) if query else [
            SessionEntry(row["id"], row["title"]) for row in self.store.sessions()]
        listing = self.query_one("#sessions", ListView)
        await listing.clear()
        await listing.extend(SessionItem(entry) for entry in entries)
        ids = [entry.session_id for entry in entries]
        listing.index = ids.index(self.current) if self.current in ids else None

    @on(Input.Changed, "#session-search")
    async def _search(self) -> None:
        await self.reload()

    @on(Input.Submitted, "#session-search")
    def _to_results(self) -> None:
        """Enter in the search box moves to the first result, so a second Enter opens it."""
        listing = self.query_one("#sessions", ListView)
        if listing.index is None and listing.children:
            listing.index = 0
        listing.focus()

    @on(ListView.Selected, "#sessions")
    def _chosen(self, event: ListView.Selected) -> None:
        self.post_message(self.Chosen(event.item.entry.session_id))

    def _highlighted(self) -> int | None:
        item = self.query_one("#sessions", ListView).highlighted_child
        return item.entry.session_id if isinstance(item, SessionItem) else None

    def action_rename(self) -> None:
        if (session_id := self._highlighted()) is not None:
            self.post_message(self.RenameAsked(session_id))

    def action_delete(self) -> None:
        if (session_id := self._highlighted()) is not None:
            self.post_message(self.DeleteAsked(session_id))
