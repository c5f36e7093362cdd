"""The real `somnus` in a real terminal: tmux runs it, the test types (send-keys) and reads (capture-pane).

Skipped where tmux is not installed. Its own tmux server (-L) keeps it away from the user's sessions.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assistant.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


class Terminal:
    """A 120x32 tmux window running one command."""

    def __init__(self, command: str, environment: dict[str, str]) -> None:
        self.server = f"somnus-test-{os.getpid()}"
        exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in environment.items())
        self.tmux("new-session", "-d", "-s", "app", "-x", "120", "-y", "32",  # COLUMNS would override the size
                  f"env -u COLUMNS -u LINES {exports} {command}; echo EXITED:$?; sleep 600")
        self.socket = Path(self.tmux("display-message", "-p", "#{socket_path}").strip())

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.server, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "app")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "app", *keys)

    def wait_for(self, text: str, timeout: float = 120.0, gone: bool = False) -> None:
        """Until ``text`` is on screen (or, with ``gone``, no longer is)."""
        started = time.monotonic()
        while (text in self.screen()) is gone:
            state = "stayed" if gone else "never appeared"
            assert time.monotonic() - started < timeout, f"{text!r} {state}:\n{self.screen()}"
            time.sleep(0.01)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True, timeout=30)
        self.socket.unlink(missing_ok=True)  # tmux leaves it behind


@pytest.fixture
def terminal(tmp_path, tiny_model_dir):
    yield from _terminal(tmp_path, str(tiny_model_dir))


@pytest.fixture
def nano_terminal(tmp_path):
    """The app on the bundled nano model: its nights train (the tiny random model grounds nothing)."""
    from assistant.models import NANO_DIR

    if not (NANO_DIR / "model.safetensors").is_file():
        pytest.skip("nano model not built")
    yield from _terminal(tmp_path, "nano")


def _terminal(tmp_path, model: str):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'model = "{model}"\nbackend = "torch"\nmax_tokens = 24\n')
    started = time.monotonic()
    window = Terminal(f"{shlex.quote(sys.executable)} -m cli",
                      {"SOMNUS_HOME": str(home), "TERM": "xterm-256color", "PATH": os.environ["PATH"]})
    window.started, window.home = started, home
    yield window
    window.close()


def test_somnus_in_a_terminal_chats_records_and_quits(terminal):
    terminal.wait_for("Message Somnus", timeout=60)
    prompt_seconds = time.monotonic() - terminal.started
    terminal.wait_for(" · torch · ", timeout=120)
    print(f"start-up: interactive prompt after {prompt_seconds:.2f} s, "
          f"model loaded after {time.monotonic() - terminal.started:.2f} s")

    terminal.keys("/he")
    terminal.wait_for("/help              Commands and keys")
    terminal.keys("Tab", "Enter")
    terminal.wait_for("Escape closes this page")
    terminal.keys("Escape")  # alone: a key sent right after it would read as Alt+key
    terminal.wait_for("Escape closes this page", gone=True)

    echo = []
    for letter in "Hello there":
        sent = time.monotonic()
        terminal.keys("-l", letter)
        terminal.wait_for("▊  Hello there"[: 3 + len(echo) + 1])
        echo.append(time.monotonic() - sent)
    print(f"keypress echo through tmux: median {sorted(echo)[len(echo) // 2] * 1000:.0f} ms")
    terminal.keys("Enter")
    terminal.wait_for("╭─ Hello there ─")
    database = terminal.home / "somnus.db"
    deadline = time.monotonic() + 120
    while True:
        with Store(database) as store:
            messages = [(m["role"], m["status"]) for m in store.messages(1)] if store.sessions() else []
        if len(messages) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert messages == [("user", "complete"), ("assistant", "complete")]

    terminal.keys("/private", "Enter")
    terminal.wait_for("PRIVATE SESSION: nothing here is recorded")
    terminal.keys("C-q")
    terminal.wait_for("EXITED:0", timeout=30)


def test_keys_echo_at_once_in_a_terminal_while_a_real_sleep_trains(nano_terminal):
    terminal = nano_terminal
    with Store(terminal.home / "somnus.db") as store:
        session = store.create_session(model="tiny")
        for index, text in enumerate(["My sister is called Zara. I live in Porto.", "Noted.",
                                      "Where do I live? And what is my sister's name?", "You live in Porto."]):
            store.add_message(session, "user" if index % 2 == 0 else "assistant", text)
    terminal.wait_for(" · torch · ", timeout=120)
    terminal.keys("/sleep", "Enter")
    terminal.wait_for("sleeping · consolidate: step", timeout=300)
    typed, echo = "", []
    for letter in "abcdefghijklmnopqrst":
        typed += letter
        sent = time.monotonic()
        terminal.keys("-l", letter)
        terminal.wait_for("▊  " + typed)
        echo.append(time.monotonic() - sent)
    assert "sleeping · consolidate" in terminal.screen()  # the night was still training throughout
    median = sorted(echo)[len(echo) // 2]
    print(f"keypress echo through tmux while sleeping: median {median * 1000:.0f} ms, max {max(echo) * 1000:.0f} ms "
          "(send-keys and capture-pane included)")
    assert median < 0.1
