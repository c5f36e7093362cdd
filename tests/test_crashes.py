"""A reply an engine crash cut short is told at the next start: real processes, killed for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from assistant.crashes import ReplyJournal

# A process that marks a reply in flight and then dies the way a segfaulting engine does.
DIES_MID_REPLY = """
import os, signal, sys
from pathlib import Path
from assistant.crashes import ReplyJournal
with ReplyJournal(Path(sys.argv[1])).replying(7, "smollm2"):
    os.kill(os.getpid(), signal.SIGSEGV)
"""


def test_a_reply_whose_process_died_is_told_once(tmp_path):
    folder = tmp_path / "replying"
    died = subprocess.run([sys.executable, "-c", DIES_MID_REPLY, str(folder)], capture_output=True)
    assert died.returncode == -signal.SIGSEGV
    journal = ReplyJournal(folder)
    assert journal.crashed() == [
        "the last reply in session 7 never finished: the smollm2 engine stopped (it crashed or was killed); "
        "your message is kept"]
    assert journal.crashed() == []


def test_a_reply_still_running_elsewhere_is_not_a_crash(tmp_path):
    journal = ReplyJournal(tmp_path / "replying")
    with journal.replying(3, "nano"):
        assert journal.crashed() == []
        assert len(list(journal.folder.iterdir())) == 1
    assert journal.crashed() == []


def test_a_reused_pid_or_a_torn_mark_is_not_mistaken_for_a_live_reply(tmp_path):
    folder = tmp_path / "replying"
    folder.mkdir()
    (folder / f"{os.getpid()}.json").write_text(
        f'{{"pid": {os.getpid()}, "process_started": 1.0, "session": null, "model": "nano"}}')
    (folder / "12.json").write_text('{"pid": 12, "process_st')
    assert ReplyJournal(folder).crashed() == [
        "the last reply never finished: the nano engine stopped (it crashed or was killed); your message is kept"]
    assert list(folder.iterdir()) == []
