"""The SQLite store on real files: schema, records, search, privacy, and every way a file can be bad."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
import time

import pytest

from assistant.store import Store, StoreError
from assistant.store.migrations import MIGRATIONS


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "data" / "somnus.db", busy_timeout=0.3) as opened:
        yield opened


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def conversation(store: Store, *turns: str, model: str = "tiny") -> int:
    """A session whose turns alternate user, assistant, starting with the user."""
    session_id = store.create_session(model=model)
    for index, text in enumerate(turns):
        store.add_message(session_id, "user" if index % 2 == 0 else "assistant", text)
    return session_id


def test_schema_is_built_by_recorded_migrations_once(tmp_path):
    path = tmp_path / "somnus.db"
    Store(path).close()
    with Store(path) as store:
        applied = [row["name"] for row in store.db.query("SELECT name FROM migrations ORDER BY rowid")]
        tables = set(store.db.table_names())
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert applied == [function.__name__ for function in MIGRATIONS]
    assert applied == sorted(applied)
    assert {"sessions", "messages", "messages_fts", "sleep_runs", "adapters", "adapter_sessions",
            "evaluations", "dreams"} <= tables


def test_database_folder_and_files_are_private(tmp_path):
    path = tmp_path / "private" / "somnus.db"
    with Store(path) as store:
        conversation(store, "hello")
        assert mode(path.parent) == 0o700
        for name in ("somnus.db", "somnus.db-wal", "somnus.db-shm"):
            assert mode(path.parent / name) == 0o600, name


def test_sessions_and_messages_round_trip(store):
    session_id = conversation(store, "  \nMy sister Alice lives in Porto.\nShe is a nurse.", "How nice!")
    store.add_message(session_id, "assistant", "Tell me more", status="cancelled", model="tiny",
                      prompt_tokens=12, completion_tokens=3)
    session = store.session(session_id)
    assert session["title"] == "My sister Alice lives in Porto."
    assert session["message_count"] == 3 and session["last_reply"] == "Tell me more"
    assert session["updated"] >= session["created"]
    messages = store.messages(session_id)
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"]
    assert messages[2]["status"] == "cancelled" and messages[2]["completion_tokens"] == 3
    assert all(m["completed"] >= m["created"] for m in messages)


def test_long_first_lines_make_short_titles(store):
    session_id = conversation(store, "word " * 100)
    assert len(store.session(session_id)["title"]) == 60


def test_sessions_are_listed_most_recently_active_first(store):
    older = conversation(store, "first")
    newer = conversation(store, "second")
    store.add_message(older, "user", "back to the first")
    assert [row["id"] for row in store.sessions()] == [older, newer]
    assert [row["id"] for row in store.sessions(limit=1)] == [older]


def test_unknown_sessions_are_clear_errors(store):
    with pytest.raises(StoreError, match="no session 42"):
        store.session(42)
    with pytest.raises(StoreError, match="no session 42"):
        store.add_message(42, "user", "hello")
    assert store.counts() == {"sessions": 0, "messages": 0}


def test_unknown_roles_and_statuses_are_refused(store):
    session_id = store.create_session()
    with pytest.raises(StoreError, match="role"):
        store.add_message(session_id, "robot", "beep")
    with pytest.raises(StoreError, match="status"):
        store.add_message(session_id, "user", "hello", status="done")


def test_search_finds_words_and_ignores_query_syntax(store):
    porto = conversation(store, "My sister Alice lives in Porto.", "Porto is lovely.")
    conversation(store, "My dog Rex likes the park.")
    results = store.search("porto")
    assert {row["session_id"] for row in results} == {porto} and len(results) == 2
    assert "[Porto]" in results[0]["snippet"]
    assert [row["session_id"] for row in store.search("rex park")] == [porto + 1]
    for awkward in ['"unbalanced', "AND (", "NEAR(", "*", "a:b", "-"]:
        assert store.search(awkward) == []
    assert store.search("   ") == []


def test_search_for_any_word_finds_a_question_asked_in_other_words(store):
    porto = conversation(store, "My sister Alice lives in Porto.")
    rex = conversation(store, "My dog Rex likes the park.")
    assert store.search("Which city does Alice live in?") == []  # every word: none says them all
    assert [row["session_id"] for row in store.search("Which city does Alice live in?", any_word=True)] == [porto]
    assert {row["session_id"] for row in store.search("Alice or Rex?", any_word=True)} == {porto, rex}
    for awkward in ['"unbalanced', "AND (", "*", "?!"]:
        assert store.search(awkward, any_word=True) == []


def test_a_megabyte_message_is_stored_whole_and_searchable(store):
    huge = ("lorem ipsum " * 90_000)[:1_000_000] + " needle"
    session_id = conversation(store, huge)
    assert store.messages(session_id)[0]["content"] == huge
    assert store.search("needle")[0]["session_id"] == session_id


def test_binary_looking_text_round_trips_exactly(store):
    text = "nul\x00 bell\x07 escape\x1b[31m del\x7f replacement\ufffd emoji\U0001f600 rtl\u202e"
    session_id = conversation(store, text)
    assert store.messages(session_id)[0]["content"] == text


def test_invalid_utf8_text_is_refused_and_nothing_is_stored(store):
    session_id = store.create_session()
    undecodable = b"caf\xe9 \xff".decode("utf-8", errors="surrogateescape")
    with pytest.raises(StoreError, match="not valid UTF-8"):
        store.add_message(session_id, "user", undecodable)
    with pytest.raises(StoreError, match="must be text"):
        store.add_message(session_id, "user", b"raw bytes")
    assert store.messages(session_id) == []


def hold_write_lock(path) -> sqlite3.Connection:
    """Another process's writer, as SQLite sees it: a second connection inside BEGIN IMMEDIATE."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO sessions (title, created, updated) VALUES ('theirs', 'now', 'now')")
    return other


def test_a_locked_database_waits_then_fails_clearly_and_loses_nothing(store):
    session_id = conversation(store, "kept before the lock")
    other = hold_write_lock(store.path)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        store.add_message(session_id, "user", "written while locked")
    waited = time.monotonic() - started
    message = str(caught.value)
    assert "busy" in message and str(store.path) in message and "\n" not in message
    assert waited >= 0.25
    assert [m["content"] for m in store.messages(session_id)] == ["kept before the lock"]  # reads still work
    other.execute("COMMIT")
    other.close()
    store.add_message(session_id, "user", "written after the lock")
    assert [m["content"] for m in store.messages(session_id)] == ["kept before the lock", "written after the lock"]
    assert [row["title"] for row in store.sessions()].count("theirs") == 1


def test_a_writer_that_finishes_within_the_timeout_is_simply_waited_for(tmp_path):
    path = tmp_path / "somnus.db"
    with Store(path, busy_timeout=10) as store:
        session_id = conversation(store, "first")
        other = hold_write_lock(path)
        releaser = threading.Timer(0.3, lambda: (other.execute("COMMIT"), other.close()))
        releaser.start()
        store.add_message(session_id, "user", "second")
        releaser.join()
        assert len(store.messages(session_id)) == 2


def test_random_bytes_are_refused_by_name_and_never_touched(tmp_path):
    path = tmp_path / "somnus.db"
    path.write_bytes(os.urandom(8192))
    before = digest(path)
    with pytest.raises(StoreError) as caught:
        Store(path)
    assert str(path) in str(caught.value) and "not a SQLite database" in str(caught.value)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somnus.db"]


def test_a_damaged_database_is_refused_by_name_and_never_overwritten(tmp_path):
    path = tmp_path / "somnus.db"
    with Store(path) as store:
        for index in range(200):
            conversation(store, f"message number {index} " * 20)
    with path.open("r+b") as file:  # keep page 1 (header and schema), scramble the rest
        file.seek(4096)
        file.write(os.urandom(path.stat().st_size - 4096))
    before = digest(path)
    with pytest.raises(StoreError) as caught:
        with Store(path) as store:
            store.messages(1)
            store.search("message")
            store.add_message(1, "user", "more")
    assert "damaged" in str(caught.value) and str(path) in str(caught.value)
    assert digest(path) == before


def test_another_programs_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    other.commit()
    other.close()
    before = digest(path)
    with pytest.raises(StoreError, match="another program"):
        Store(path)
    assert digest(path) == before


def test_a_database_from_a_newer_somnus_is_refused(tmp_path):
    path = tmp_path / "somnus.db"
    with Store(path) as store:
        store.db["migrations"].insert({"name": "m999_from_the_future", "applied": "later"})
    with pytest.raises(StoreError, match="newer Somnus"):
        Store(path)


def test_processes_opening_a_new_database_together_migrate_it_once(tmp_path):
    path = tmp_path / "somnus.db"
    errors: list[BaseException] = []

    def open_and_write() -> None:
        try:
            with Store(path, busy_timeout=10) as store:
                conversation(store, "hello")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=open_and_write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Store(path) as store:
        names = [row["name"] for row in store.db.query("SELECT name FROM migrations")]
        assert names == [function.__name__ for function in MIGRATIONS]
        assert store.counts() == {"sessions": 4, "messages": 4}


def test_one_store_can_be_shared_by_threads(store):
    session_id = store.create_session()

    def write(worker: int) -> None:
        for index in range(20):
            store.add_message(session_id, "user", f"worker {worker} message {index}")

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.messages(session_id)) == 80


def test_sleep_runs_record_their_stages_and_reports(store):
    ledger = store.sleep
    assert ledger.last_run() is None
    run_id = ledger.start_run()
    ledger.set_stage(run_id, "training")
    assert ledger.run(run_id)["stage"] == "training" and ledger.run(run_id)["status"] == "running"
    ledger.finish_run(run_id, "complete", report={"sessions": 3, "loss": 1.25})
    run = ledger.last_run()
    assert run["id"] == run_id and run["status"] == "complete" and run["report"] == {"sessions": 3, "loss": 1.25}
    assert run["finished"] >= run["started"]
    failed = ledger.start_run()
    ledger.finish_run(failed, "failed", error="out of memory")
    assert ledger.last_run()["error"] == "out of memory"
    with pytest.raises(StoreError, match="run status"):
        ledger.finish_run(failed, "running")
    with pytest.raises(StoreError, match="no sleep_runs row 99"):
        ledger.set_stage(99, "x")


def test_the_dream_journal_keeps_each_nights_dreams(store):
    ledger = store.sleep
    assert ledger.last_dreaming_run() is None
    first, second = ledger.start_run(), ledger.start_run()
    ledger.add_dreams(first, [
        {"question": "Where is Mary?", "source": "tonight", "reference": "Mary is in the attic.",
         "confidence": 0.9, "score": 1.5, "kept": True, "reward": 0.75, "scales": [1.0, 0.0]},
        {"question": "Who am I?", "source": "recollection", "reference": "", "confidence": 0.1,
         "score": None, "kept": False, "reward": None, "scales": []},
    ])
    ledger.add_dreams(second, [])
    assert ledger.last_dreaming_run() == first
    journal = ledger.dreams(first)
    assert [d["question"] for d in journal] == ["Where is Mary?", "Who am I?"]
    assert journal[0]["kept"] is True and journal[0]["scales"] == [1.0, 0.0] and journal[0]["reward"] == 0.75
    assert journal[1]["kept"] is False and journal[1]["score"] is None
    assert ledger.dreams(second) == []


def test_adapters_and_evaluations(store):
    ledger = store.sleep
    run_id = ledger.start_run()
    first = ledger.add_adapter(1, "adapters/v1", sleep_run_id=run_id, scores={"recall": 0.5})
    assert ledger.adapter(first)["scores"] == {"recall": 0.5} and ledger.live_adapters() == []
    ledger.set_adapter_status(first, "live", scores={"recall": 0.75})
    assert [a["version"] for a in ledger.live_adapters()] == [1]
    assert ledger.adapter(first)["scores"] == {"recall": 0.75}
    with pytest.raises(StoreError, match="version 1 already exists"):
        ledger.add_adapter(1, "adapters/again")
    with pytest.raises(StoreError, match="adapter status"):
        ledger.set_adapter_status(first, "great")
    ledger.add_evaluation("recall", 0.75, adapter_id=first, sleep_run_id=run_id)
    ledger.add_evaluation("perplexity", 12.5, sleep_run_id=run_id)
    assert [e["metric"] for e in ledger.evaluations(adapter_id=first)] == ["recall"]
    assert [e["metric"] for e in ledger.evaluations(sleep_run_id=run_id)] == ["recall", "perplexity"]


def unconsolidated(store: Store) -> dict[int, tuple[int, int]]:
    return {row["session_id"]: (row["consolidated_through"], row["new_messages"])
            for row in store.sleep.unconsolidated_sessions()}


def test_unconsolidated_sessions_follow_the_live_adapters_lineage(store):
    ledger = store.sleep
    alice = conversation(store, "Alice lives in Porto", "Noted")
    rex = conversation(store, "Rex likes the park", "Good dog")
    assert unconsolidated(store) == {alice: (0, 2), rex: (0, 2)}

    candidate = ledger.add_adapter(1, "adapters/v1")
    ledger.record_consolidation(candidate, {alice: store.messages(alice)[-1]["id"]})
    assert unconsolidated(store) == {alice: (0, 2), rex: (0, 2)}  # a candidate has learnt nothing yet

    ledger.set_adapter_status(candidate, "live")
    assert unconsolidated(store) == {rex: (0, 2)}

    store.add_message(alice, "user", "She moved to Lisbon")
    store.add_message(alice, "assistant", "cut off", status="cancelled")
    alice_learnt = store.messages(alice)[1]["id"]
    assert unconsolidated(store) == {alice: (alice_learnt, 1), rex: (0, 2)}

    second = ledger.add_adapter(2, "adapters/v2", parent_version=1)
    ledger.record_consolidation(second, {rex: store.messages(rex)[-1]["id"]})
    ledger.set_adapter_status(second, "live")
    ledger.set_adapter_status(candidate, "retired")
    assert unconsolidated(store) == {alice: (alice_learnt, 1)}  # v1's sessions still count through v2

    ledger.set_adapter_status(second, "rejected")
    assert unconsolidated(store) == {alice: (0, 3), rex: (0, 2)}  # nothing live: everything is new


def test_renaming_a_session_keeps_one_clean_line(store):
    session_id = conversation(store, "Alice lives in Porto", "Noted")
    assert store.rename_session(session_id, "  Family\nand more  ") == "Family"
    assert store.session(session_id)["title"] == "Family"
    assert store.rename_session(session_id, "x" * 100) == "x" * 57 + "..."
    with pytest.raises(StoreError, match="cannot be empty"):
        store.rename_session(session_id, " \n ")
    assert store.session(session_id)["title"] == "x" * 57 + "..."
    with pytest.raises(StoreError, match="no session 999"):
        store.rename_session(999, "Anything")


def test_forgetting_a_session_in_one_transaction_removes_its_rows_and_records_the_plan(store):
    alice = conversation(store, "Alice lives in Porto", "Noted")
    rex = conversation(store, "Rex likes the park", "Good dog")
    old = store.sleep.add_adapter(1, "adapters/v1", status="retired")
    adapter = store.sleep.add_adapter(2, "adapters/v2", parent_version=1, status="live")
    store.sleep.record_consolidation(adapter, {alice: store.messages(alice)[-1]["id"],
                                               rex: store.messages(rex)[-1]["id"]})
    run = store.sleep.start_run()
    store.sleep.add_dreams(run, [{"question": "Where does Alice live?", "source": "tonight", "session_id": alice,
                                  "kept": True}, {"question": "Who likes the park?", "source": "tonight",
                                                  "session_id": rex, "kept": False}])

    forget_id = store.sleep.forget(alice, forgotten=[adapter], live=old, plan={"files": ["adapters/v2"]})

    assert [row["id"] for row in store.sessions()] == [rex]
    assert store.messages(alice) == [] and store.search("Porto") == []
    assert [row["session_id"] for row in store.search("park")] == [rex]
    assert [d["question"] for d in store.sleep.dreams(run)] == ["Who likes the park?"]
    assert [(a["version"], a["status"], a["sessions"]) for a in store.sleep.adapters()] == [
        (2, "forgotten", [rex]), (1, "live", [])]
    assert [(f["id"], f["session_id"], f["status"], f["plan"]) for f in store.sleep.forgets()] == [
        (forget_id, alice, "deleting", {"files": ["adapters/v2"]})]
    with pytest.raises(StoreError, match=f"no session {alice}"):
        store.sleep.forget(alice, forgotten=[], live=None, plan={})
    store.scrub()  # the text leaves the database file and its log
    for path in (store.path, store.path.with_name(store.path.name + "-wal")):
        assert not path.exists() or b"Porto" not in path.read_bytes()


def test_last_message_time_is_the_latest_turn_of_any_session(store):
    assert store.last_message_time() is None
    first = conversation(store, "Alice lives in Porto")
    conversation(store, "Rex likes the park")
    store.add_message(first, "assistant", "Noted")
    assert store.last_message_time() == store.messages(first)[-1]["created"]
