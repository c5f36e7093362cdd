"""The sleep as a separate process: one at a time, progress as JSON lines, safe to kill.

Chat must stay usable while the model sleeps, so the cycle runs in a child process
(``python -m assistant.sleep``) that holds an exclusive lock on ``sleep.lock`` in the data
folder: a second sleep is refused at once with a clear message. The child prints one JSON object per
line: ``{"event": "progress", "stage", "progress", "message"}`` while it works, then
``{"event": "report", ...}``. ``start_sleep`` wraps that for the CLI, the scheduler and the TUI.
A child killed with SIGKILL leaves its run marked ``running``; the next sleep, holding the lock,
marks it failed ("interrupted") and starts clean, since nothing it wrote was ever live.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from assistant.config import Config, Paths, SomnusError, load_config, open_paths
from assistant.sleep.cycle import SleepReport

LOCK_FILE = "sleep.lock"
BUSY_EXIT = 3


class SleepBusy(SomnusError):
    """Another sleep holds the lock."""


class SleepFailed(SomnusError):
    """The sleep process ended without a report."""


@dataclass(frozen=True)
class SleepEvent:
    stage: str
    progress: float
    message: str


def sleep_lock(paths: Paths):
    """The exclusive sleep lock (an open file), or SleepBusy."""
    handle = open(paths.home / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SleepBusy("a sleep is already running; wait for it to finish") from None
    return handle


def is_sleeping(paths: Paths) -> bool:
    try:
        sleep_lock(paths).close()
    except SleepBusy:
        return True
    return False


class SleepHandle:
    """A running sleep process: its progress events, then its report."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self._report: SleepReport | None = None
        self._error = ""

    def events(self) -> Iterator[SleepEvent]:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "progress":
                yield SleepEvent(event["stage"], float(event["progress"]), event["message"])
            elif event.get("event") == "report":
                known = {f.name for f in fields(SleepReport)}
                self._report = SleepReport(**{k: v for k, v in event.items() if k in known})
            elif event.get("event") == "error":
                self._error = event["message"]

    def result(self) -> SleepReport:
        """Wait for the end; the report, or SleepBusy / SleepFailed with the child's reason."""
        for _ in self.events():
            pass
        code = self.process.wait()
        if code == BUSY_EXIT:
            raise SleepBusy(self._error or "a sleep is already running; wait for it to finish")
        if self._report is None:
            raise SleepFailed(f"sleep failed: {self._error or f'the sleep process exited with status {code}'}")
        return self._report

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def start_sleep(paths: Paths, config: Config, *, steps: int | None = None, log: Path | None = None,
                all_cores: bool = False, sessions: Sequence[int] | None = None) -> SleepHandle:
    """Start a sleep in its own process (refused at once if one runs already).

    ``log``: append the process's stderr (library warnings) to this file instead of the terminal,
    where it would scribble over a full-screen app. ``all_cores``: train on every core (no chat to
    keep responsive); otherwise one core is left free. ``sessions``: learn only these (of those not
    yet learnt), as a forget relearns a dropped night's.
    """
    if is_sleeping(paths):
        raise SleepBusy("a sleep is already running; wait for it to finish")
    command = [sys.executable, "-m", "assistant.sleep", "--home", str(paths.home),
               "--model", config.model, "--backend", config.backend]
    if steps:
        command += ["--steps", str(steps)]
    if all_cores:
        command.append("--all-cores")
    if sessions:
        command += ["--sessions", ",".join(map(str, sessions))]
    stderr = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log is not None else None
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        if stderr is not None:
            os.close(stderr)  # the child has its own copy
    return SleepHandle(process)


def sleep_now(
    paths: Paths, config: Config, on_event: Callable[[SleepEvent], None] | None = None, *, steps: int | None = None,
    sessions: Sequence[int] | None = None,
) -> SleepReport:
    """The blocking library call behind ``somnus sleep --now``, the scheduler, ``/sleep`` and a forget."""
    handle = start_sleep(paths, config, steps=steps, sessions=sessions)
    for event in handle.events():
        if on_event:
            on_event(event)
    return handle.result()


def _use_cores(all_cores: bool) -> None:
    """Train on the cores this process may run on, all but one unless ``all_cores``, so a chat (and
    the user's other programs) stay responsive while the app is open."""
    try:
        import torch
    except ImportError:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    torch.set_num_threads(max(1, cores if all_cores else cores - 1))


def _emit(**payload) -> None:
    print(json.dumps(payload), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m assistant.sleep",
                                     description="Run one sleep (normally started by `somnus sleep`).")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--model")
    parser.add_argument("--backend")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--all-cores", action="store_true")
    parser.add_argument("--sessions", type=lambda text: [int(part) for part in text.split(",")])
    args = parser.parse_args(argv)
    os.umask(0o077)
    _use_cores(args.all_cores)
    from assistant.sleep.cycle import SleepSettings, sleep_cycle
    from assistant.store import open_store
    from backends.base import BackendError

    try:
        paths = open_paths(args.home)
        config = load_config(paths).with_overrides(model=args.model, backend=args.backend)
        lock = sleep_lock(paths)
    except SleepBusy as error:
        _emit(event="error", message=str(error))
        return BUSY_EXIT
    settings = SleepSettings(budget_minutes=config.sleep_minutes)
    if args.steps:
        settings = replace(settings, max_steps=args.steps)
    try:
        with lock, open_store(paths, config) as store:
            report = sleep_cycle(paths, config, store, settings=settings, sessions=args.sessions,
                                 progress=lambda stage, fraction, message: _emit(
                                     event="progress", stage=stage, progress=round(fraction, 4), message=message))
    except (SomnusError, BackendError, ValueError) as error:
        _emit(event="error", message=str(error))
        return 2
    _emit(event="report", **report.record())
    return 0


if __name__ == "__main__":
    sys.exit(main())
