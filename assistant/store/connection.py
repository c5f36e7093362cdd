"""Opening the SQLite file safely, and turning SQLite's failures into one-line errors.

The database holds everything the user ever said to Somnus, so this module never creates over,
truncates or "repairs" a file it does not recognise: a damaged or foreign file is refused by
name and left exactly as it was.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from assistant.config import PRIVATE_FILE_MODE, SomnusError, ensure_private_dir

SQLITE_HEADER = b"SQLite format 3\x00"
APPLICATION_ID = 0x536F6D6E  # "Somn": marks the file as ours, so we never add tables to another app's database


class StoreError(SomnusError):
    """The database cannot be used right now (busy, damaged, foreign) or was asked for something absent."""


def connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A connection to ``path`` in WAL mode that waits ``busy_timeout`` seconds for other writers.

    Autocommit mode (``isolation_level=None``) so that every write transaction is an explicit
    ``BEGIN IMMEDIATE``: it takes the write lock up front, which is what makes the busy timeout
    apply instead of failing at once on a read-to-write upgrade.
    """
    _refuse_non_sqlite(path)
    ensure_private_dir(path.parent)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, PRIVATE_FILE_MODE))
    os.chmod(path, PRIVATE_FILE_MODE)  # SQLite gives the -wal and -shm files the database's own mode
    with translated_errors(path, busy_timeout):
        connection = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            _set_up(connection, path, busy_timeout)
        except BaseException:
            connection.close()
            raise
    return connection


def _set_up(connection: sqlite3.Connection, path: Path, busy_timeout: float) -> None:
    """Claim the file and switch it to WAL, retrying while another process does the same.

    SQLite does not call its busy handler for a journal-mode switch (it could deadlock), so two
    processes opening a new database at once can get SQLITE_BUSY at once: wait for it here instead.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            _claim_or_refuse(connection, path)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
            return
        except sqlite3.OperationalError as error:
            busy = getattr(error, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


@contextmanager
def translated_errors(path: Path, busy_timeout: float) -> Iterator[None]:
    """Re-raise SQLite's exceptions as a StoreError that names the file and says what to do."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        raise StoreError(_explain(error, path, busy_timeout)) from error


def _explain(error: sqlite3.DatabaseError, path: Path, busy_timeout: float) -> str:
    name = getattr(error, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return (f"database {path} is busy: another process is writing to it "
                f"(waited {busy_timeout:g} s); nothing was changed, try again")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return f"database {path} is damaged ({error}); it was left untouched: move it aside to start afresh"
    return f"database {path}: {error}"


def _refuse_non_sqlite(path: Path) -> None:
    try:
        with path.open("rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as error:
        raise StoreError(f"database {path} cannot be read: {error.strerror or error}") from error
    if header and header != SQLITE_HEADER:
        raise StoreError(f"database {path} is not a SQLite database (damaged or another file); it was left untouched")


def _claim_or_refuse(connection: sqlite3.Connection, path: Path) -> None:
    """Mark a new, empty database as ours; refuse one that another program already uses."""
    (application_id,) = connection.execute("PRAGMA application_id").fetchone()
    if application_id == APPLICATION_ID:
        return
    (table_count,) = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    if application_id != 0 or table_count:
        raise StoreError(f"database {path} belongs to another program, not Somnus; it was left untouched")
    connection.execute(f"PRAGMA application_id={APPLICATION_ID}")
