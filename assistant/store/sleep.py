"""The sleep cycle's records: its runs, the adapters they made, and which sessions each adapter learnt.

Provenance is per message, not per session: a session that goes on after a sleep has new
messages to consolidate, so ``adapter_sessions`` records the last message each adapter saw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from assistant.store.connection import StoreError
from assistant.store.timestamps import now

if TYPE_CHECKING:
    from assistant.store.store import Store

RUN_STATUSES = ("running", "complete", "failed", "cancelled")
ADAPTER_STATUSES = ("candidate", "live", "rejected", "retired", "forgotten")
FORGET_STATUSES = ("deleting", "relearning", "done")

# The live adapters and their ancestors (through parent_version): what the model now knows.
_LIVE_LINEAGE = """
    WITH RECURSIVE lineage(id, parent_version) AS (
        SELECT id, parent_version FROM adapters WHERE status = 'live'
        UNION
        SELECT adapters.id, adapters.parent_version FROM adapters
        JOIN lineage ON adapters.version = lineage.parent_version
    ),
    consolidated AS (
        SELECT session_id, max(last_message_id) AS last_message_id FROM (
            SELECT session_id, last_message_id FROM adapter_sessions WHERE adapter_id IN (SELECT id FROM lineage)
            UNION ALL SELECT session_id, last_message_id FROM settled
        ) GROUP BY session_id
    )
"""


class SleepLedger:
    """Reads and writes the sleep-cycle tables through a Store's connection."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def start_run(self) -> int:
        with self._store.transaction() as db:
            return db["sleep_runs"].insert({"started": now(), "status": "running", "stage": "starting"}).last_pk

    def set_stage(self, run_id: int, stage: str) -> None:
        self._update("sleep_runs", run_id, {"stage": stage})

    def finish_run(self, run_id: int, status: str, *, report: Mapping | None = None, error: str | None = None) -> None:
        _check_choice("run status", status, RUN_STATUSES[1:])
        changes = {"finished": now(), "status": status, "error": error}
        if report is not None:
            changes["report"] = json.dumps(report)
        self._update("sleep_runs", run_id, changes)

    def run(self, run_id: int) -> dict:
        return self._get("sleep_runs", run_id, json_columns=("report",))

    def last_run(self) -> dict | None:
        with self._store.reading() as db:
            row = db.execute("SELECT max(id) FROM sleep_runs").fetchone()[0]
        return None if row is None else self.run(row)

    def runs(self) -> list[dict]:
        """Every run, oldest first, each with its report (``somnus report``: one row a night)."""
        with self._store.reading() as db:
            ids = [row[0] for row in db.execute("SELECT id FROM sleep_runs ORDER BY id")]
        return [self.run(run_id) for run_id in ids]

    def add_adapter(
        self,
        version: int,
        path: str,
        *,
        parent_version: int | None = None,
        sleep_run_id: int | None = None,
        status: str = "candidate",
        scores: Mapping | None = None,
    ) -> int:
        _check_choice("adapter status", status, ADAPTER_STATUSES)
        record = {
            "version": version,
            "path": path,
            "parent_version": parent_version,
            "sleep_run_id": sleep_run_id,
            "created": now(),
            "status": status,
            "scores": None if scores is None else json.dumps(scores),
        }
        with self._store.transaction() as db:
            if db.execute("SELECT 1 FROM adapters WHERE version = ?", [version]).fetchone():
                raise StoreError(f"adapter version {version} already exists")
            return db["adapters"].insert(record).last_pk

    def set_adapter_status(self, adapter_id: int, status: str, *, scores: Mapping | None = None) -> None:
        _check_choice("adapter status", status, ADAPTER_STATUSES)
        changes: dict = {"status": status}
        if scores is not None:
            changes["scores"] = json.dumps(scores)
        self._update("adapters", adapter_id, changes)

    def adapter(self, adapter_id: int) -> dict:
        return self._get("adapters", adapter_id, json_columns=("scores",))

    def live_adapters(self) -> list[dict]:
        with self._store.reading() as db:
            ids = [row[0] for row in db.execute("SELECT id FROM adapters WHERE status = 'live' ORDER BY version")]
        return [self.adapter(adapter_id) for adapter_id in ids]

    def live_adapter(self) -> dict | None:
        """The one live adapter version, or None while the bare model is live."""
        live = self.live_adapters()
        return live[-1] if live else None

    def next_version(self) -> int:
        with self._store.reading() as db:
            return (db.execute("SELECT max(version) FROM adapters").fetchone()[0] or 0) + 1

    def promote(self, adapter_id: int, last_message_ids: Mapping[int, int]) -> None:
        """Make ``adapter_id`` the live version and record what it consolidated, in ONE transaction:
        the live adapter is always a complete old one or a complete new one, whatever kills us."""
        rows = [{"adapter_id": adapter_id, "session_id": session_id, "last_message_id": message_id}
                for session_id, message_id in last_message_ids.items()]
        with self._store.transaction() as db:
            db.execute("UPDATE adapters SET status = 'retired' WHERE status = 'live'")
            db.execute("UPDATE adapters SET status = 'live' WHERE id = ?", [adapter_id])
            db["adapter_sessions"].insert_all(rows, replace=True)

    def rollback(self) -> dict | None:
        """Retire the live version and make its parent live again (None: back to the bare model).

        The retired version's sessions become unconsolidated again, so the next sleep relearns them:
        nothing the user said is lost."""
        with self._store.transaction() as db:
            live = db.execute("SELECT id, parent_version FROM adapters WHERE status = 'live'").fetchone()
            if live is None:
                raise StoreError("nothing to roll back: the bare model is live")
            db.execute("UPDATE adapters SET status = 'retired' WHERE id = ?", [live[0]])
            if live[1] is not None:
                db.execute("UPDATE adapters SET status = 'live' WHERE version = ?", [live[1]])
        return self.live_adapter()

    def adapters(self) -> list[dict]:
        """Every version, newest first, with the sessions each one consolidated."""
        with self._store.reading() as db:
            ids = [row[0] for row in db.execute("SELECT id FROM adapters ORDER BY version DESC")]
            sessions = {}
            for adapter_id, session_id in db.execute("SELECT adapter_id, session_id FROM adapter_sessions"):
                sessions.setdefault(adapter_id, []).append(session_id)
        return [{**self.adapter(i), "sessions": sorted(sessions.get(i, []))} for i in ids]

    def fail_interrupted_runs(self) -> int:
        """Runs still marked running when no sleep holds the lock were killed: say so."""
        with self._store.transaction() as db:
            cursor = db.execute("UPDATE sleep_runs SET status = 'failed', error = 'interrupted', finished = ? "
                                "WHERE status = 'running'", [now()])
            return cursor.rowcount

    def record_consolidation(self, adapter_id: int, last_message_ids: Mapping[int, int]) -> None:
        """Record that ``adapter_id`` learnt each session up to and including its given message id."""
        rows = [{"adapter_id": adapter_id, "session_id": session_id, "last_message_id": message_id}
                for session_id, message_id in last_message_ids.items()]
        with self._store.transaction() as db:
            db["adapter_sessions"].insert_all(rows, replace=True)

    def settle(self, last_message_ids: Mapping[int, int]) -> None:
        """Record that the bare model already answers what each session said, up to its given message:
        with no live adapter to hold them, nights would read these sessions again and again."""
        rows = [{"session_id": session_id, "last_message_id": message_id}
                for session_id, message_id in last_message_ids.items()]
        with self._store.transaction() as db:
            db["settled"].insert_all(rows, replace=True)

    def unconsolidated_sessions(self) -> list[dict]:
        """Sessions with complete messages that the live adapters (and their ancestors) have not learnt.

        Each row: ``session_id``, ``title``, ``consolidated_through`` (last message id already learnt,
        0 if none), ``last_message_id`` and ``new_messages`` (how many complete messages are new).
        """
        sql = _LIVE_LINEAGE + """
            SELECT sessions.id AS session_id, sessions.title,
                   coalesce(consolidated.last_message_id, 0) AS consolidated_through,
                   max(messages.id) AS last_message_id, count(*) AS new_messages
            FROM sessions
            JOIN messages ON messages.session_id = sessions.id
            LEFT JOIN consolidated ON consolidated.session_id = sessions.id
            WHERE messages.status = 'complete' AND messages.id > coalesce(consolidated.last_message_id, 0)
            GROUP BY sessions.id ORDER BY sessions.id
        """
        with self._store.reading() as db:
            return list(db.query(sql))

    def add_evaluation(
        self, metric: str, value: float, *, adapter_id: int | None = None, sleep_run_id: int | None = None
    ) -> int:
        record = {"adapter_id": adapter_id, "sleep_run_id": sleep_run_id, "metric": metric,
                  "value": float(value), "created": now()}
        with self._store.transaction() as db:
            return db["evaluations"].insert(record).last_pk

    def evaluations(self, *, adapter_id: int | None = None, sleep_run_id: int | None = None) -> list[dict]:
        with self._store.reading() as db:
            return list(db.query(
                "SELECT * FROM evaluations WHERE (:adapter IS NULL OR adapter_id = :adapter) "
                "AND (:run IS NULL OR sleep_run_id = :run) ORDER BY id",
                {"adapter": adapter_id, "run": sleep_run_id},
            ))

    def add_dreams(self, run_id: int, dreams: Sequence[Mapping]) -> None:
        """The night's dream journal: each dream, its reference, score, whether it was kept, its reward."""
        rows = [{**dream, "sleep_run_id": run_id, "kept": int(bool(dream["kept"])),
                 "scales": json.dumps(list(dream.get("scales") or []))} for dream in dreams]
        with self._store.transaction() as db:
            db["dreams"].insert_all(rows, alter=False)

    def dreams(self, run_id: int) -> list[dict]:
        with self._store.reading() as db:
            rows = list(db.query("SELECT * FROM dreams WHERE sleep_run_id = ? ORDER BY id", [run_id]))
        for row in rows:
            row["kept"], row["scales"] = bool(row["kept"]), json.loads(row["scales"] or "[]")
        return rows

    def last_dreaming_run(self) -> int | None:
        with self._store.reading() as db:
            return db.execute("SELECT max(sleep_run_id) FROM dreams").fetchone()[0]

    def forget(self, session_id: int, *, forgotten: Sequence[int], live: int | None, plan: Mapping) -> int:
        """A forget's first step, in ONE transaction: the session's rows leave (messages and their
        search index, provenance, its lines of the dream journal), the adapter versions in
        ``forgotten`` (ids) are marked so and can never be live again, ``live`` (an id; None: the
        bare model) becomes the live version if the live one was among them, and ``plan`` (the
        files left to delete) is recorded.
        Returns the forget's id; a kill before the commit leaves everything as it was."""
        forgotten = list(forgotten)
        marks = ",".join("?" * len(forgotten))
        with self._store.transaction() as db:
            if db.execute("SELECT 1 FROM sessions WHERE id = ?", [session_id]).fetchone() is None:
                raise StoreError(f"no session {session_id}")
            # Journals written before dreams named their session lose every line of a night that learnt it.
            db.execute("DELETE FROM dreams WHERE session_id = ? OR (session_id IS NULL AND sleep_run_id IN "
                       "(SELECT sleep_run_id FROM adapters JOIN adapter_sessions ON adapter_id = adapters.id "
                       "WHERE adapter_sessions.session_id = ?))", [session_id, session_id])
            db.execute("DELETE FROM messages WHERE session_id = ?", [session_id])
            db.execute("DELETE FROM adapter_sessions WHERE session_id = ?", [session_id])
            db.execute("DELETE FROM settled WHERE session_id = ?", [session_id])
            db.execute("DELETE FROM sessions WHERE id = ?", [session_id])
            if forgotten:
                db.execute(f"UPDATE adapters SET status = 'forgotten' WHERE id IN ({marks})", forgotten)
            if db.execute("SELECT 1 FROM adapters WHERE status = 'live'").fetchone() is None and live is not None:
                db.execute("UPDATE adapters SET status = 'live' WHERE id = ?", [live])
            return db["forgets"].insert({"session_id": session_id, "created": now(), "status": "deleting",
                                         "plan": json.dumps(plan)}).last_pk

    def forgets(self, status: str | None = None) -> list[dict]:
        """Forgets, oldest first (only those in ``status``, if given), each with its plan."""
        with self._store.reading() as db:
            rows = list(db.query("SELECT * FROM forgets WHERE (:status IS NULL OR status = :status) ORDER BY id",
                                 {"status": status}))
        return [{**row, "plan": json.loads(row["plan"])} for row in rows]

    def set_forget_status(self, forget_id: int, status: str) -> None:
        _check_choice("forget status", status, FORGET_STATUSES)
        self._update("forgets", forget_id, {"status": status, **({"finished": now()} if status == "done" else {})})

    def _update(self, table: str, row_id: int, changes: Mapping) -> None:
        with self._store.transaction() as db:
            if db.execute(f"SELECT 1 FROM {table} WHERE id = ?", [row_id]).fetchone() is None:
                raise StoreError(f"no {table} row {row_id}")
            db[table].update(row_id, dict(changes))

    def _get(self, table: str, row_id: int, json_columns: tuple[str, ...]) -> dict:
        with self._store.reading() as db:
            rows = list(db.query(f"SELECT * FROM {table} WHERE id = ?", [row_id]))
        if not rows:
            raise StoreError(f"no {table} row {row_id}")
        row = rows[0]
        for column in json_columns:
            row[column] = None if row[column] is None else json.loads(row[column])
        return row


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise StoreError(f"unknown {what} {value!r} (one of {', '.join(allowed)})")
