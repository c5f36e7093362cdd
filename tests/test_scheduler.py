"""The idle scheduler and ``somnus daemon``: a real store, the real sleep process, a clock the test moves."""

from __future__ import annotations

import asyncio
import os
import plistlib
import signal
import stat
import subprocess
import sys
from datetime import datetime, timedelta

import pytest

from assistant.config import Config, SomnusError, load_config, open_paths, update_config
from assistant.scheduler import (
    SleepOutcome,
    SleepScheduler,
    SleepWindow,
    describe_outcome,
)
from assistant.sleep.cycle import SleepReport
from assistant.store import open_store
from cli.daemon import install_service


class Clock:
    """The scheduler's ``now``: stands still until the test moves it."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment


def local(*fields: int) -> datetime:
    return datetime(*fields).astimezone()


def window_around(moment: datetime, start_hours: float, end_hours: float) -> str:
    """A sleep window from ``start_hours`` to ``end_hours`` around ``moment`` (it may wrap midnight)."""
    start, end = (moment + timedelta(hours=start_hours)), (moment + timedelta(hours=end_hours))
    return f"{start.astimezone():%H:%M}-{end.astimezone():%H:%M}"


@pytest.fixture
def paths(somnus_home, tiny_model_dir):
    paths = open_paths()
    update_config(paths, model=str(tiny_model_dir), backend="torch")
    return paths


def say(paths, config: Config, *turns: str) -> int:
    """A session recorded now, turns alternating user and assistant."""
    with open_store(paths, config) as store:
        session_id = store.create_session(model="tiny")
        for index, text in enumerate(turns):
            store.add_message(session_id, "user" if index % 2 == 0 else "assistant", text)
    return session_id


def last_said(paths, config: Config) -> datetime:
    with open_store(paths, config) as store:
        return datetime.fromisoformat(store.last_message_time())


def test_the_window_holds_its_hours_and_can_wrap_midnight():
    night = SleepWindow.parse("01:00-06:00")
    assert [night.contains(local(2026, 3, 10, hour, minute)) for hour, minute in
            ((0, 59), (1, 0), (5, 59), (6, 0), (13, 0))] == [False, True, True, False, False]
    assert night.next_opening(local(2026, 3, 10, 0, 30)) == local(2026, 3, 10, 1, 0)
    assert night.next_opening(local(2026, 3, 10, 7, 15)) == local(2026, 3, 11, 1, 0)
    assert night.next_opening(local(2026, 3, 10, 2, 0)) == local(2026, 3, 10, 2, 0)
    late = SleepWindow.parse("22:00-06:00")
    assert [late.contains(local(2026, 3, 10, hour)) for hour in (21, 22, 23, 0, 5, 6, 12)] == [
        False, True, True, True, True, False, False]
    assert late.next_opening(local(2026, 3, 10, 12, 0)) == local(2026, 3, 10, 22, 0)


def test_idle_inside_the_window_is_due_and_the_user_postpones_it(paths):
    config = load_config(paths)
    say(paths, config, "My sister is called Zara.", "Noted.")
    said = last_said(paths, config)
    clock = Clock(said + timedelta(minutes=29))
    config = config.with_overrides(sleep_window=window_around(clock(), -1, 2))
    with open_store(paths, config) as store:
        scheduler = SleepScheduler(paths, config, store, now=clock)
        assert scheduler.due() is None
        assert scheduler.next_sleep() == said + timedelta(minutes=30)

        clock.moment = said + timedelta(minutes=31)
        assert scheduler.due() == "idle for 30 min in the sleep window"

        scheduler.touch()  # a keypress in the app
        assert scheduler.due() is None
        assert scheduler.next_sleep() == clock.moment + timedelta(minutes=30)
        clock.moment += timedelta(minutes=30)
        assert scheduler.due() == "idle for 30 min in the sleep window"


def test_outside_the_window_only_a_backlog_of_sessions_is_due(paths):
    config = load_config(paths)
    say(paths, config, "My sister is called Zara.", "Noted.")
    clock = Clock(last_said(paths, config) + timedelta(minutes=45))
    config = config.with_overrides(sleep_window=window_around(clock(), 2, 4), sleep_after_sessions=2)
    with open_store(paths, config) as store:
        scheduler = SleepScheduler(paths, config, store, now=clock)
        assert scheduler.due() is None
        opening = (clock() + timedelta(hours=2)).replace(second=0, microsecond=0)
        assert scheduler.next_sleep() == opening

        say(paths, config, "Rex likes the park.", "Good dog.")
        clock.moment = last_said(paths, config) + timedelta(minutes=10)
        assert scheduler.due() is None  # two sessions wait, but the user was here 10 minutes ago
        clock.moment += timedelta(minutes=20)
        assert scheduler.due() == "2 sessions waiting to be slept on"
        assert scheduler.next_sleep() == clock.moment


def test_a_night_already_tried_on_the_same_sessions_is_not_retried(paths):
    config = load_config(paths)
    say(paths, config, "My sister is called Zara.", "Noted.")
    clock = Clock(last_said(paths, config) + timedelta(hours=1))
    config = config.with_overrides(sleep_window=window_around(clock(), -1, 1))
    with open_store(paths, config) as store:
        scheduler = SleepScheduler(paths, config, store, now=clock)
        assert scheduler.due() is not None
        run = store.sleep.start_run()
        store.sleep.finish_run(run, "complete", report=SleepReport("rejected", reason="recall did not rise").record())
        assert scheduler.due() is None and scheduler.next_sleep() is None

        say(paths, config, "I moved to Lisbon.", "Noted.")
        clock.moment = last_said(paths, config) + timedelta(minutes=31)
        assert scheduler.due() is not None


@pytest.mark.slow
async def test_the_idle_check_starts_one_real_sleep_however_many_triggers_arrive(paths):
    config = load_config(paths)
    say(paths, config, "My sister is called Zara.", "Noted.")
    clock = Clock(last_said(paths, config) + timedelta(minutes=31))
    config = config.with_overrides(sleep_window=window_around(clock(), -1, 1))
    started, events, finished = [], [], []
    with open_store(paths, config) as store:
        scheduler = SleepScheduler(paths, config, store, now=clock, check_every=0.05,
                                   on_start=started.append, on_event=events.append, on_finish=finished.append)
        other_process = SleepScheduler(paths, config, store, now=clock)  # e.g. the daemon, next to the app
        scheduler.start()  # APScheduler fires the idle check every 50 ms from now on
        try:
            while not events:
                await asyncio.sleep(0.02)
            asked, checked = await asyncio.wait_for(asyncio.gather(scheduler.sleep("asked"), scheduler.check()), 5)
            assert asked is None and checked is None  # turned away: a sleep is running
            assert await other_process.check() is None  # its idle check leaves the running night alone
            refused = await asyncio.wait_for(other_process.sleep("asked"), 30)
            assert refused.error == "a sleep is already running; wait for it to finish"
            while not finished:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # several more idle checks: nothing new was said since the run
        finally:
            scheduler.stop()
        runs = store.sleep.last_run()
        assert not scheduler.sleeping and scheduler.due() is None
    assert started == ["idle for 30 min in the sleep window"]
    (outcome,) = finished
    assert outcome.error is None and outcome.report.status in ("nothing", "promoted", "rejected")
    assert runs["id"] == 1 and runs["status"] == "complete"
    assert events[0].stage == "select" and events[-1].stage == "done" and events[-1].progress == 1.0
    assert stat.S_IMODE((paths.home / "sleep.log").stat().st_mode) == 0o600  # its warnings, off the screen


def test_outcomes_read_as_one_line():
    promoted = SleepReport("promoted", adapter=3, sessions=[4, 5], recall_before=0.25, recall_after=0.75)
    assert describe_outcome(SleepOutcome("asked", promoted)) == (
        "sleep promoted adapter v3: 2 sessions, recall 0.25 -> 0.75")
    assert describe_outcome(SleepOutcome("asked", SleepReport("rejected", reason="recall did not rise"))) == (
        "sleep rejected: recall did not rise")
    assert describe_outcome(SleepOutcome("asked", error="a sleep is already running")) == (
        "sleep: a sleep is already running")


def test_install_writes_a_systemd_user_unit(somnus_home, tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    paths = open_paths(tmp_path / "my data")
    unit, enable = install_service(paths, platform="linux", user_home=tmp_path / "home")
    assert unit == tmp_path / "home" / ".config" / "systemd" / "user" / "somnus.service"
    text = unit.read_text()
    assert f'ExecStart={sys.executable} -m cli --home "{paths.home}" daemon\n' in text
    assert "[Install]\nWantedBy=default.target" in text and "Restart=on-failure" in text
    assert stat.S_IMODE(unit.stat().st_mode) == 0o600
    assert enable == "systemctl --user daemon-reload && systemctl --user enable --now somnus.service"

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    unit, _ = install_service(paths, platform="linux", user_home=tmp_path / "home")
    assert unit == tmp_path / "xdg" / "systemd" / "user" / "somnus.service"


def test_install_writes_a_launchd_agent(somnus_home, tmp_path):
    paths = open_paths()
    agent, enable = install_service(paths, platform="darwin", user_home=tmp_path)
    assert agent == tmp_path / "Library" / "LaunchAgents" / "org.somnus.daemon.plist"
    plist = plistlib.loads(agent.read_bytes())
    assert plist["Label"] == "org.somnus.daemon" and plist["RunAtLoad"] is True
    assert plist["ProgramArguments"] == [sys.executable, "-m", "cli", "--home", str(paths.home), "daemon"]
    assert plist["StandardOutPath"] == str(paths.home / "daemon.log")
    assert enable == f"launchctl load -w {agent}"


def test_install_elsewhere_is_one_clear_line(somnus_home, tmp_path):
    with pytest.raises(SomnusError, match="knows systemd .* and launchd .*, not win32"):
        install_service(open_paths(), platform="win32", user_home=tmp_path / "user")
    assert not (tmp_path / "user").exists()


def cli(home, *args) -> list[str]:
    return [sys.executable, "-m", "cli", "--home", str(home), *args]


def test_somnus_daemon_install_from_the_command_line(tmp_path):
    environment = {**os.environ, "HOME": str(tmp_path / "user")}
    environment.pop("XDG_CONFIG_HOME", None)
    result = subprocess.run(cli(tmp_path / "data", "daemon", "--install"), capture_output=True, text=True,
                            env=environment, timeout=60)
    unit = tmp_path / "user" / ".config" / "systemd" / "user" / "somnus.service"
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {unit}; turn it on with: systemctl --user")
    assert f"--home {tmp_path / 'data'} daemon" in unit.read_text()


def test_somnus_daemon_watches_until_it_is_stopped(tmp_path):
    daemon = subprocess.Popen(cli(tmp_path / "data", "daemon"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        first = daemon.stdout.readline()
        assert first.startswith(f"somnus daemon: watching {tmp_path / 'data'} (sleep window 01:00-06:00")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read()
    finally:
        daemon.kill()
        daemon.wait()
