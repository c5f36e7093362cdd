"""The ``somnus`` command as a user runs it: real subprocesses, a temporary data folder, the tiny model."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import assistant.models as models
from assistant.store import Store
from backends.select import is_installed

ENGINE = "llamacpp" if is_installed("llamacpp") else "torch"  # the quicker engine to start, when present


def somnus(home: Path, *args: str, stdin: bytes | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process with ``home`` as SOMNUS_HOME; output stays bytes (it may be anything)."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env={**os.environ, "SOMNUS_HOME": str(home), **env},
        timeout=300,
    )


def out(result: subprocess.CompletedProcess) -> str:
    return result.stdout.decode()


def error_line(result: subprocess.CompletedProcess) -> str:
    """The single line a user error prints (and it must be single)."""
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, result.stderr.decode()
    assert len(lines) == 1 and lines[0].startswith("somnus: "), lines
    return lines[0]


def as_json(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def chat_home(home, tiny_model_dir) -> Path:
    """A data folder whose config.toml picks the tiny model and short replies, as a user would set it."""
    home.mkdir()
    (home / "config.toml").write_text(f'model = "{tiny_model_dir}"\nbackend = "{ENGINE}"\nmax_tokens = 12\n')
    return home


@pytest.fixture
def recorded_home(home) -> Path:
    """A data folder with two recorded sessions (written through the store, no model needed)."""
    with Store(home / "somnus.db") as store:
        porto = store.create_session(model="tiny")
        store.add_message(porto, "user", "My sister Alice lives in Porto.")
        store.add_message(porto, "assistant", "Porto is lovely.", model="tiny")
        park = store.create_session(model="tiny")
        store.add_message(park, "user", "My dog Rex likes the park.")
        store.add_message(park, "assistant", "Rex is a good", model="tiny", status="cancelled")
    return home


def test_the_app_without_a_terminal_points_to_the_plain_chat(home):
    for args in ([], ["chat"]):
        assert "somnus chat --plain" in error_line(somnus(home, *args))


def test_help_lists_the_commands_and_the_bench_group(home):
    result = somnus(home, "--help")
    assert result.returncode == 0
    for command in ("ask", "chat", "sessions", "show", "search", "export", "model", "status", "bench"):
        assert command in out(result)
    assert somnus(home, "bench", "--help").returncode == 0


def test_the_cli_starts_without_loading_engines(home):
    probe = ("import sys, cli.main; "
             "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'mlx', 'sqlite_utils') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.slow
def test_ask_answers_with_the_torch_engine_and_the_answer_is_recorded(home, tiny_model_dir):
    result = somnus(home, "--model", str(tiny_model_dir), "--backend", "torch", "ask", "hello")
    assert result.returncode == 0, result.stderr.decode()
    answer = out(result)
    assert answer.endswith("\n") and answer.strip()
    listed = as_json(somnus(home, "sessions", "--json"))
    assert len(listed) == 1 and listed[0]["title"] == "hello"
    assert listed[0]["last_reply"] == answer[:-1] and listed[0]["message_count"] == 2
    assert listed[0]["model"] == str(tiny_model_dir)
    assert mode(home) == 0o700 and mode(home / "somnus.db") == 0o600


def test_ask_json_gives_the_reply_and_where_it_was_recorded(chat_home, tiny_model_dir):
    reply = as_json(somnus(chat_home, "ask", "Where is John?", "--json"))
    assert set(reply) == {"session_id", "message_id", "reply", "status", "model", "prompt_tokens", "completion_tokens"}
    assert reply["status"] == "complete" and reply["model"] == str(tiny_model_dir) and reply["prompt_tokens"] > 0
    shown = as_json(somnus(chat_home, "show", str(reply["session_id"]), "--json"))
    assert [m["content"] for m in shown["messages"]] == ["Where is John?", reply["reply"]]
    assert shown["messages"][1]["id"] == reply["message_id"]


def test_ask_continues_a_session_and_refuses_an_unknown_one(chat_home):
    first = as_json(somnus(chat_home, "ask", "My sister is Alice.", "--json"))
    second = as_json(somnus(chat_home, "ask", "Who is my sister?", "--session", str(first["session_id"]), "--json"))
    assert second["session_id"] == first["session_id"] and second["prompt_tokens"] > first["prompt_tokens"]
    assert "no session 99" in error_line(somnus(chat_home, "ask", "hi", "--session", "99"))


def test_ask_dash_reads_the_whole_message_from_stdin(chat_home):
    reply = as_json(somnus(chat_home, "ask", "-", "--json", stdin=b"first line\nsecond line\n\n"))
    shown = as_json(somnus(chat_home, "show", str(reply["session_id"]), "--json"))
    assert shown["messages"][0]["content"] == "first line\nsecond line"


def test_undecodable_stdin_is_kept_with_replacement_characters(chat_home):
    reply = as_json(somnus(chat_home, "ask", "-", "--json", stdin=b"caf\xe9 \xff\xfe ok"))
    shown = as_json(somnus(chat_home, "show", str(reply["session_id"]), "--json"))
    assert shown["messages"][0]["content"] == "caf\ufffd \ufffd\ufffd ok"


def test_a_megabyte_message_is_recorded_then_refused_in_one_line(chat_home):
    huge = ("Sandra moved to the garden. " * 40_000)[:1_000_000]
    result = somnus(chat_home, "ask", "-", stdin=huge.encode())
    assert "too long for the model" in error_line(result)
    (session,) = as_json(somnus(chat_home, "sessions", "--json"))
    shown = as_json(somnus(chat_home, "show", str(session["id"]), "--json"))
    assert [m["content"] for m in shown["messages"]] == [huge.rstrip()]


def test_a_private_question_leaves_no_trace(chat_home):
    result = somnus(chat_home, "ask", "--private", "my PIN is 1234")
    assert result.returncode == 0 and out(result).strip()
    assert not (chat_home / "somnus.db").exists()
    assert as_json(somnus(chat_home, "sessions", "--json")) == []


def test_plain_chat_is_one_recorded_session(chat_home):
    result = somnus(chat_home, "chat", "--plain", stdin=b"Hello!\n\nWhere is Mary?\n")
    assert result.returncode == 0, result.stderr.decode()
    (session,) = as_json(somnus(chat_home, "sessions", "--json"))
    shown = as_json(somnus(chat_home, "show", str(session["id"]), "--json"))
    contents = [m["content"] for m in shown["messages"]]
    assert contents[0::2] == ["Hello!", "Where is Mary?"]
    assert out(result) == contents[1] + "\n" + contents[3] + "\n"


def test_plain_chat_reports_a_failed_turn_and_goes_on(chat_home):
    too_long = b"Daniel went back to the kitchen. " * 300
    result = somnus(chat_home, "chat", "--plain", stdin=too_long + b"\nThanks!\n")
    assert "too long for the model" in error_line(result)
    (session,) = as_json(somnus(chat_home, "sessions", "--json"))
    shown = as_json(somnus(chat_home, "show", str(session["id"]), "--json"))
    assert [m["role"] for m in shown["messages"]] == ["user", "user", "assistant"]


def test_sessions_show_and_search(recorded_home):
    listed = out(somnus(recorded_home, "sessions"))
    assert "My sister Alice lives in Porto." in listed and "My dog Rex likes the park." in listed
    assert [row["id"] for row in as_json(somnus(recorded_home, "sessions", "--json", "--limit", "1"))] == [2]
    shown = out(somnus(recorded_home, "show", "2"))
    assert "My dog Rex likes the park." in shown and "assistant [cancelled]" in shown
    found = as_json(somnus(recorded_home, "search", "porto", "--json"))
    assert sorted((row["session_id"], row["role"]) for row in found) == [(1, "assistant"), (1, "user")]
    assert "[Porto]" in out(somnus(recorded_home, "search", "Porto"))
    assert as_json(somnus(recorded_home, "search", '"AND (', "--json")) == []
    assert "no session 5" in error_line(somnus(recorded_home, "show", "5"))


def test_forget_asks_first_then_leaves_no_file_holding_the_session(recorded_home):
    assert "add --yes" in error_line(somnus(recorded_home, "forget", "1"))  # stdin is no terminal: nothing asked
    assert "no session 7" in error_line(somnus(recorded_home, "forget", "7", "--yes"))
    forgot = somnus(recorded_home, "forget", "1", "--yes")
    assert forgot.returncode == 0, forgot.stderr.decode()
    assert out(forgot).splitlines()[0] == ("forgot session 1: 2 message(s) gone from the store and its search; "
                                           "no adapter had learnt it")
    assert [row["id"] for row in as_json(somnus(recorded_home, "sessions", "--json"))] == [2]
    assert as_json(somnus(recorded_home, "search", "porto", "--json")) == []
    assert not [path for path in recorded_home.rglob("*") if path.is_file() and b"Porto" in path.read_bytes()]


def test_export_as_markdown_and_json(recorded_home, tmp_path):
    markdown = out(somnus(recorded_home, "export"))
    assert markdown.index("# My sister Alice") < markdown.index("# My dog Rex")
    assert "## assistant (" in markdown and ", cancelled)" in markdown
    exported = as_json(somnus(recorded_home, "export", "1", "--format", "json"))
    assert [s["id"] for s in exported] == [1] and [m["role"] for m in exported[0]["messages"]] == ["user", "assistant"]
    target = tmp_path / "all.json"
    assert somnus(recorded_home, "export", "--format", "json", "--output", str(target)).returncode == 0
    assert [s["id"] for s in json.loads(target.read_text())] == [1, 2] and mode(target) == 0o600


def test_model_use_writes_the_config_and_model_ls_marks_it(home, tiny_model_dir):
    assert somnus(home, "model", "use", str(tiny_model_dir)).returncode == 0
    assert f'model = "{tiny_model_dir}"' in (home / "config.toml").read_text()
    assert mode(home / "config.toml") == 0o600
    listed = {row["ref"]: row for row in as_json(somnus(home, "model", "ls", "--json"))}
    assert listed[str(tiny_model_dir)]["current"] and listed[str(tiny_model_dir)]["ready"]
    assert not listed["nano"]["current"]
    before = (home / "config.toml").read_text()
    assert "unknown model" in error_line(somnus(home, "model", "use", "not a model!"))
    assert (home / "config.toml").read_text() == before


def test_status_reports_the_folder_the_model_and_the_records(recorded_home, tiny_model_dir):
    report = as_json(somnus(recorded_home, "--model", str(tiny_model_dir), "--backend", "torch", "status", "--json"))
    assert report["home"] == str(recorded_home) and report["database"] == str(recorded_home / "somnus.db")
    assert (report["model"], report["model_problem"]) == (str(tiny_model_dir), None)
    assert (report["chat_engine"], report["training_engine"]) == ("torch", "torch")
    assert (report["sessions"], report["messages"], report["unconsolidated_sessions"]) == (2, 4, 2)
    assert report["live_adapters"] == [] and report["last_sleep_run"] is None
    assert "sessions: 2" in out(somnus(recorded_home, "status"))


def test_status_names_the_stage_of_a_night_that_is_running(recorded_home, tiny_model_dir):
    from assistant.config import open_paths
    from assistant.sleep import runner

    paths = open_paths(recorded_home)
    with Store(paths.database) as store:
        run = store.sleep.start_run()
        store.sleep.set_stage(run, "consolidate")
    args = ("--model", str(tiny_model_dir), "--backend", "torch", "status", "--json")
    assert "sleeping_now" not in as_json(somnus(recorded_home, *args))  # a run left by a killed sleep is not one
    with runner.sleep_lock(paths):  # as the sleep process holds it
        report = as_json(somnus(recorded_home, *args))
    assert report["sleeping_now"].startswith(f"stage consolidate (run {run},")


def test_the_home_flag_replaces_the_environment(tmp_path):
    flagged = tmp_path / "flagged"
    result = somnus(tmp_path / "ignored", "--home", str(flagged), "sessions", "--json")
    assert as_json(result) == [] and (flagged / "somnus.db").exists() and not (tmp_path / "ignored").exists()
    assert mode(flagged) == 0o700 and mode(flagged / "somnus.db") == 0o600


def test_a_bad_config_file_is_one_line_naming_it(home):
    home.mkdir()
    (home / "config.toml").write_text("max_tokens = \n")
    assert str(home / "config.toml") in error_line(somnus(home, "sessions"))


def test_a_damaged_database_is_one_line_and_stays_as_it_was(home):
    home.mkdir()
    database = home / "somnus.db"
    database.write_bytes(os.urandom(10_000))
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    for args in (["sessions"], ["ask", "hello"], ["status"]):
        assert str(database) in error_line(somnus(home, *args))
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before


def test_a_locked_database_is_one_line_and_loses_nothing(recorded_home, tiny_model_dir):
    (recorded_home / "config.toml").write_text(
        f'model = "{tiny_model_dir}"\nbackend = "{ENGINE}"\nmax_tokens = 12\nbusy_timeout_seconds = 0.3\n')
    other = sqlite3.connect(recorded_home / "somnus.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        assert "busy" in error_line(somnus(recorded_home, "ask", "--session", "1", "written while locked"))
        assert len(as_json(somnus(recorded_home, "sessions", "--json"))) == 2  # reading still works
    finally:
        other.execute("ROLLBACK")
        other.close()
    shown = as_json(somnus(recorded_home, "show", "1", "--json"))
    assert [m["content"] for m in shown["messages"]] == ["My sister Alice lives in Porto.", "Porto is lovely."]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("not a model!", "unknown model"), ("/nowhere/model.gguf", "model file /nowhere/model.gguf not found"),
     ("someone/tiny", "somnus model pull someone/tiny")],
)
def test_unusable_models_are_one_line(home, model, expected):
    assert expected in error_line(somnus(home, "--model", model, "ask", "hello"))


@pytest.mark.skipif((models.NANO_DIR / "config.json").exists(), reason="the nano model is built")
def test_the_default_model_says_how_to_build_it_until_it_ships(home):
    assert "python -m assistant.nano.train" in error_line(somnus(home, "--model", "nano", "ask", "hello"))


def test_control_sequences_in_what_was_said_reach_the_terminal_as_visible_text(home):
    hostile = "retitle \x1b]0;pwned\x07 and clear \x1b[2J and a lone CSI \x9b31m done"
    with Store(home / "somnus.db") as store:
        session = store.create_session(model="tiny\x1b[31m")
        store.add_message(session, "user", hostile)
    for args in (["sessions"], ["show", "1"], ["search", "pwned"], ["export", "1"],
                 ["show", "1", "--json"], ["sessions", "--json"]):
        shown = out(somnus(home, *args))
        assert not any(ch in shown for ch in "\x1b\x07\x9b"), args
        assert "pwned" in shown, args
    assert "retitle \\x1b]0;pwned\\x07 and clear \\x1b[2J and a lone CSI \\x9b31m done" in out(somnus(home, "show", "1"))
    assert json.loads(out(somnus(home, "show", "1", "--json")))["messages"][0]["content"] == hostile
    with Store(home / "somnus.db") as store:
        assert store.messages(session)[0]["content"] == hostile  # stored unchanged
