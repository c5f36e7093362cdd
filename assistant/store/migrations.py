"""The database schema, as numbered migrations applied in order and recorded by name.

A migration is never edited once released: a schema change is a new function at the end of
the list, so every user's database reaches the same shape whatever version it started from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlite_utils import Database

from assistant.store.connection import StoreError
from assistant.store.timestamps import now

Migration = Callable[[Database], None]
MIGRATIONS: list[Migration] = []
MIGRATIONS_TABLE = "migrations"


def migration(function: Migration) -> Migration:
    MIGRATIONS.append(function)
    return function


def pending_migrations(db: Database, path: Path) -> list[Migration]:
    """The migrations not yet applied to ``db``; refuses a database from a newer Somnus."""
    applied = set()
    if db[MIGRATIONS_TABLE].exists():
        applied = {row["name"] for row in db.query(f"SELECT name FROM {MIGRATIONS_TABLE}")}
    unknown = applied - {function.__name__ for function in MIGRATIONS}
    if unknown:
        raise StoreError(f"database {path} was written by a newer Somnus "
                         f"(unknown migration {sorted(unknown)[0]}); upgrade Somnus to open it")
    return [function for function in MIGRATIONS if function.__name__ not in applied]


def migrate(db: Database, path: Path) -> None:
    """Apply the pending migrations in one write transaction, so two processes never race."""
    if not pending_migrations(db, path):
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        db[MIGRATIONS_TABLE].create({"name": str, "applied": str}, pk="name", if_not_exists=True)
        for function in pending_migrations(db, path):  # again: another process may have migrated meanwhile
            function(db)
            db[MIGRATIONS_TABLE].insert({"name": function.__name__, "applied": now()})
    except BaseException:
        db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")


@migration
def m001_sessions_and_messages(db: Database) -> None:
    db["sessions"].create(
        {"id": int, "title": str, "created": str, "updated": str, "model": str},
        pk="id",
        not_null={"title", "created", "updated"},
        defaults={"title": ""},
    )
    db["messages"].create(
        {
            "id": int,
            "session_id": int,
            "role": str,
            "content": str,
            "created": str,
            "completed": str,
            "model": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "status": str,
        },
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
        not_null={"session_id", "role", "content", "created", "status"},
    )
    db["messages"].create_index(["session_id", "id"])


@migration
def m002_message_search(db: Database) -> None:
    db["messages"].enable_fts(["content"], create_triggers=True)


@migration
def m003_sleep_cycle(db: Database) -> None:
    db["sleep_runs"].create(
        {"id": int, "started": str, "finished": str, "status": str, "stage": str, "report": str, "error": str},
        pk="id",
        not_null={"started", "status"},
    )
    db["adapters"].create(
        {
            "id": int,
            "version": int,
            "path": str,
            "parent_version": int,
            "sleep_run_id": int,
            "created": str,
            "status": str,
            "scores": str,
        },
        pk="id",
        foreign_keys=[("sleep_run_id", "sleep_runs", "id")],
        not_null={"version", "path", "created", "status"},
    )
    db["adapters"].create_index(["version"], unique=True)
    db["adapter_sessions"].create(
        {"adapter_id": int, "session_id": int, "last_message_id": int},
        pk=("adapter_id", "session_id"),
        foreign_keys=[("adapter_id", "adapters", "id"), ("session_id", "sessions", "id")],
        not_null={"last_message_id"},
    )
    db["evaluations"].create(
        {"id": int, "adapter_id": int, "sleep_run_id": int, "metric": str, "value": float, "created": str},
        pk="id",
        foreign_keys=[("adapter_id", "adapters", "id"), ("sleep_run_id", "sleep_runs", "id")],
        not_null={"metric", "value", "created"},
    )


@migration
def m004_dream_journal(db: Database) -> None:
    db["dreams"].create(
        {
            "id": int,
            "sleep_run_id": int,
            "question": str,
            "source": str,
            "reference": str,
            "confidence": float,
            "score": float,
            "kept": int,
            "reward": float,
            "scales": str,
        },
        pk="id",
        foreign_keys=[("sleep_run_id", "sleep_runs", "id")],
        not_null={"sleep_run_id", "question", "source", "kept"},
    )
    db["dreams"].create_index(["sleep_run_id"])


@migration
def m005_dream_sessions(db: Database) -> None:
    db["dreams"].add_column("session_id", int)


@migration
def m006_forgets(db: Database) -> None:
    db["forgets"].create(
        {"id": int, "session_id": int, "created": str, "finished": str, "status": str, "plan": str},
        pk="id",
        not_null={"session_id", "created", "status", "plan"},
    )


@migration
def m007_settled_sessions(db: Database) -> None:
    db["settled"].create({"session_id": int, "last_message_id": int}, pk="session_id",
                         foreign_keys=[("session_id", "sessions", "id")], not_null={"last_message_id"})
