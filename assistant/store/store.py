"""The user's conversations in SQLite: sessions, their messages, and full-text search.

One ``Store`` may be shared by threads (a TUI's worker streams a reply while the interface
lists sessions): a lock serialises access to the single connection, and every write is one
``BEGIN IMMEDIATE`` transaction, so another process's writer makes us wait, never lose data.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlite_utils import Database

from assistant.config import Config, Paths
from assistant.store.connection import StoreError, connect, translated_errors
from assistant.store.migrations import migrate
from assistant.store.sleep import SleepLedger
from assistant.store.timestamps import now

ROLES = ("user", "assistant", "system")
STATUSES = ("complete", "cancelled", "error")
TITLE_LENGTH = 60

_SESSION_COLUMNS = """
    sessions.id, sessions.title, sessions.created, sessions.updated, sessions.model,
    (SELECT count(*) FROM messages WHERE messages.session_id = sessions.id) AS message_count,
    (SELECT content FROM messages WHERE messages.session_id = sessions.id AND role = 'assistant'
     ORDER BY id DESC LIMIT 1) AS last_reply
"""


class Store:
    """Sessions and messages in one SQLite file; ``store.sleep`` holds the sleep cycle's records."""

    def __init__(self, path: Path, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._lock = threading.RLock()
        self.db = Database(connect(self.path, busy_timeout))
        try:
            with self.reading():
                migrate(self.db, self.path)
        except BaseException:
            self.db.close()
            raise
        self.sleep = SleepLedger(self)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def reading(self) -> Iterator[Database]:
        """Exclusive use of the connection, with SQLite errors turned into StoreError."""
        with self._lock, translated_errors(self.path, self.busy_timeout):
            yield self.db

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """One write transaction: all of it is stored, or none of it."""
        with self.reading() as db:
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.conn.in_transaction:
                    db.conn.execute("ROLLBACK")
                raise
            db.conn.execute("COMMIT")

    def create_session(self, model: str | None = None, title: str = "") -> int:
        """A new, empty session; its title defaults to the start of its first user message."""
        stamp = now()
        with self.transaction() as db:
            return db["sessions"].insert({"title": title, "created": stamp, "updated": stamp, "model": model}).last_pk

    def session(self, session_id: int) -> dict:
        with self.reading() as db:
            rows = list(db.query(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?", [session_id]))
        if not rows:
            raise StoreError(f"no session {session_id} in {self.path} (see `somnus sessions`)")
        return rows[0]

    def has_session(self, session_id: int) -> bool:
        with self.reading() as db:
            return db.execute("SELECT 1 FROM sessions WHERE id = ?", [session_id]).fetchone() is not None

    def sessions(self, limit: int | None = None) -> list[dict]:
        """Sessions, the most recently active first, with their message count and last reply.

        Activity is ordered by message id, not by time: two turns within one clock tick still sort
        right. A session with no message yet was just created, so it comes first.
        """
        sql = f"""
            SELECT {_SESSION_COLUMNS},
                   (SELECT max(id) FROM messages WHERE messages.session_id = sessions.id) AS latest
            FROM sessions ORDER BY latest IS NOT NULL, latest DESC, id DESC LIMIT ?
        """
        with self.reading() as db:
            rows = list(db.query(sql, [-1 if limit is None else limit]))
        for row in rows:
            del row["latest"]
        return rows

    def add_message(
        self,
        session_id: int,
        role: str,
        content: str,
        *,
        status: str = "complete",
        model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        created: str | None = None,
    ) -> int:
        """Record one message (``created`` defaults to now; ``completed`` is always now)."""
        _check_message(role, content, status)
        stamp = now()
        record = {
            "session_id": session_id,
            "role": role,
            "content": content,
            "created": created or stamp,
            "completed": stamp,
            "model": model,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "status": status,
        }
        with self.transaction() as db:
            session = db.execute("SELECT title FROM sessions WHERE id = ?", [session_id]).fetchone()
            if session is None:
                raise StoreError(f"no session {session_id} in {self.path} (see `somnus sessions`)")
            message_id = db["messages"].insert(record).last_pk
            title = session[0] or (_title_from(content) if role == "user" else "")
            db.execute("UPDATE sessions SET updated = ?, title = ? WHERE id = ?", [stamp, title, session_id])
        return message_id

    def rename_session(self, session_id: int, title: str) -> str:
        """Give the session the title the user chose (one line, shortened like generated titles)."""
        cleaned = _title_from(title)
        if not cleaned:
            raise StoreError("a session title cannot be empty; nothing was changed")
        with self.transaction() as db:
            self._require_session(db, session_id)
            db.execute("UPDATE sessions SET title = ? WHERE id = ?", [cleaned, session_id])
        return cleaned

    def scrub(self) -> None:
        """Rewrite the database so that no file holds deleted text: SQLite keeps it in free pages, in
        the full-text index's old segments and in the write-ahead log until told otherwise."""
        with self.reading() as db:
            db.execute("INSERT INTO messages_fts(messages_fts) VALUES('optimize')")
            db.execute("VACUUM")
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise StoreError("another program is reading the database; its deleted text is still in the "
                             "write-ahead log until that program closes it")

    def last_message_time(self) -> str | None:
        """When the latest message was said (in any session, by any process): how long the user has been away."""
        with self.reading() as db:
            row = db.execute("SELECT created FROM messages ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else row[0]

    def messages(self, session_id: int) -> list[dict]:
        """The session's messages in the order they were said."""
        with self.reading() as db:
            return list(db.query("SELECT * FROM messages WHERE session_id = ? ORDER BY id", [session_id]))

    def search(self, query: str, limit: int = 20, *, any_word: bool = False) -> list[dict]:
        """Messages matching ``query`` as plain words (no FTS syntax to get wrong), best first: every
        word, or with ``any_word`` any of them (a question asked in other words than were said)."""
        sql = """
            SELECT messages.id AS message_id, messages.session_id, messages.role, messages.created,
                   sessions.title, snippet(messages_fts, 0, '[', ']', '...', 16) AS snippet
            FROM messages_fts
            JOIN messages ON messages.id = messages_fts.rowid
            JOIN sessions ON sessions.id = messages.session_id
            WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?
        """
        words = re.findall(r"\w+", query) if any_word else [query]
        if not query.strip() or not words:
            return []
        with self.reading() as db:
            return list(db.query(sql, [" OR ".join(db.quote_fts(word) for word in words), limit]))

    def _require_session(self, db: Database, session_id: int) -> None:
        if db.execute("SELECT 1 FROM sessions WHERE id = ?", [session_id]).fetchone() is None:
            raise StoreError(f"no session {session_id} in {self.path} (see `somnus sessions`)")

    def counts(self) -> dict[str, int]:
        with self.reading() as db:
            return {"sessions": db["sessions"].count, "messages": db["messages"].count}


def open_store(paths: Paths, config: Config) -> Store:
    """The store of the data folder ``paths``, waiting as long as the config says for other writers."""
    return Store(paths.database, busy_timeout=config.busy_timeout_seconds)


def _check_message(role: str, content: str, status: str) -> None:
    if role not in ROLES:
        raise StoreError(f"unknown message role {role!r} (one of {', '.join(ROLES)})")
    if status not in STATUSES:
        raise StoreError(f"unknown message status {status!r} (one of {', '.join(STATUSES)})")
    if not isinstance(content, str):
        raise StoreError(f"a message must be text, not {type(content).__name__}; nothing was stored")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as error:
        raise StoreError("the message is not valid UTF-8 text (it holds undecodable bytes); nothing was stored") from error


def _title_from(content: str) -> str:
    first_line = next((line.strip() for line in content.splitlines() if line.strip()), "")
    return first_line if len(first_line) <= TITLE_LENGTH else first_line[: TITLE_LENGTH - 3] + "..."
