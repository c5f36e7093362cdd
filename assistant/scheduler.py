"""When Somnus sleeps by itself, and the one gate every sleep goes through.

An idle check runs every minute (APScheduler, inside the caller's asyncio loop). It starts a sleep
once the user has been away for ``idle_minutes`` and either
- the local time is inside ``sleep_window`` (which may wrap midnight, e.g. ``22:00-06:00``), or
- ``sleep_after_sessions`` sessions are waiting to be slept on, whatever the hour;
and only when something was said since the last run started, so a night the gate rejected (or
that failed) is not retried every minute on the same sessions: ``/sleep`` retries at once.

"Away" is measured from the latest of the user's last keypress in this process (``touch``) and
the latest message in the store, so the headless daemon and the app agree, and a chat in another
terminal counts as presence. The clock is injected (``now``) so tests move time, never wait.

``SleepScheduler.sleep`` is the gate: scheduled and requested sleeps both pass through it, and a
second one while a sleep runs is turned away; a sleep in another process (the daemon, or
``somnus sleep --now``) is refused by the runner itself. Every run is recorded by the runner in
the store's sleep ledger.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from assistant.config import Config, Paths, SomnusError

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from assistant.store import Store

CHECK_EVERY_SECONDS = 60.0
SLEEP_LOG = "sleep.log"  # the sleep process's warnings, kept off the app's screen

Clock = Callable[[], datetime]


def local_now() -> datetime:
    """The wall clock as an aware datetime in the user's zone (the sleep window is local time)."""
    return datetime.now().astimezone()


@dataclass(frozen=True)
class SleepWindow:
    """The hours of the night, ``start`` included and ``end`` excluded; may wrap midnight."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> SleepWindow:
        """``"01:00-06:00"`` (config.py has already checked the shape)."""
        start, end = text.split("-")
        return cls(time.fromisoformat(start), time.fromisoformat(end))

    def contains(self, moment: datetime) -> bool:
        of_day = moment.astimezone().time().replace(tzinfo=None)
        if self.start <= self.end:
            return self.start <= of_day < self.end
        return of_day >= self.start or of_day < self.end

    def next_opening(self, moment: datetime) -> datetime:
        """``moment`` itself when inside the window, else the window's next start."""
        if self.contains(moment):
            return moment
        local = moment.astimezone()
        opening = local.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        return opening if opening > local else opening + timedelta(days=1)


@dataclass(frozen=True)
class SleepOutcome:
    """How one pass through the gate ended: the runner's report, or why there is none."""

    reason: str
    report: Any = None
    error: str | None = None


def describe_outcome(outcome: SleepOutcome) -> str:
    """One line on how a sleep ended, for the daemon's log and the app's notifications."""
    if outcome.error is not None:
        return f"sleep: {outcome.error}"
    report = outcome.report
    if report.status == "promoted":
        return (f"sleep promoted adapter v{report.adapter}: {len(report.sessions)} sessions, "
                f"recall {report.recall_before:.2f} -> {report.recall_after:.2f}")
    if report.status == "nothing":
        return "sleep: nothing new to consolidate"
    return f"sleep {report.status}: {report.reason or 'no reason given'}"


class SleepScheduler:
    """The idle check and the sleep gate, for the app and the headless daemon alike.

    The callbacks run on the asyncio loop (never in the worker thread that follows the sleep
    process), so an interface can update its widgets from them directly.
    """

    def __init__(
        self,
        paths: Paths,
        config: Config,
        store: Store,
        *,
        now: Clock = local_now,
        on_start: Callable[[str], None] | None = None,
        on_event: Callable[[Any], None] | None = None,
        on_finish: Callable[[SleepOutcome], None] | None = None,
        check_every: float = CHECK_EVERY_SECONDS,
        all_cores: bool = False,
    ) -> None:
        """``all_cores``: the sleep may take every core (the daemon: no app is open to stay responsive)."""
        self.all_cores = all_cores
        self.paths = paths
        self.config = config
        self.store = store
        self.window = SleepWindow.parse(config.sleep_window)
        self.check_every = check_every
        self._now = now
        self._on_start = on_start
        self._on_event = on_event
        self._on_finish = on_finish
        self._last_touch: datetime | None = None
        self._sleeping = False
        self._apscheduler: AsyncIOScheduler | None = None
        self._handle: Any = None
        self._night: asyncio.Future | None = None

    @property
    def sleeping(self) -> bool:
        return self._sleeping

    def touch(self) -> None:
        """The user did something: the idle time starts again."""
        self._last_touch = self._now()

    def last_activity(self) -> datetime | None:
        moments = [self._last_touch] if self._last_touch else []
        said = self.store.last_message_time()
        if said is not None:
            moments.append(datetime.fromisoformat(said))
        return max(moments) if moments else None

    def due(self) -> str | None:
        """Why a sleep should start now, or None."""
        moment = self._now()
        waiting = self._waiting_sessions()
        if not waiting or moment < self._earliest(moment):
            return None
        if self.window.contains(moment):
            return f"idle for {self.config.idle_minutes} min in the sleep window"
        if waiting >= self.config.sleep_after_sessions:
            return f"{waiting} sessions waiting to be slept on"
        return None

    def next_sleep(self) -> datetime | None:
        """When the idle check would start the next sleep if the user stays away; None: nothing new."""
        moment = self._now()
        waiting = self._waiting_sessions()
        if not waiting:
            return None
        earliest = self._earliest(moment)
        return earliest if waiting >= self.config.sleep_after_sessions else self.window.next_opening(earliest)

    async def check(self) -> SleepOutcome | None:
        """The idle check: sleep to the end if it is time, and no sleep runs here or in another process
        (the daemon beside the app): that one is left alone, rather than refused every minute."""
        from assistant.sleep import is_sleeping

        if self._sleeping or is_sleeping(self.paths):
            return None
        reason = self.due()
        return None if reason is None else await self.sleep(reason)

    async def sleep(self, reason: str) -> SleepOutcome | None:
        """Run one sleep to its end; None when a sleep already runs in this process."""
        if self._sleeping:
            return None
        self._sleeping = True
        try:
            if self._on_start is not None:
                self._on_start(reason)
            outcome = await self._follow_sleep(reason)
        finally:
            self._sleeping = False
        if self._on_finish is not None:
            self._on_finish(outcome)
        return outcome

    def start(self) -> None:
        """Run the idle check every ``check_every`` seconds on the running asyncio loop."""
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        if self._apscheduler is not None:
            return
        self._apscheduler = AsyncIOScheduler()
        self._apscheduler.add_job(self._tick, "interval", seconds=self.check_every, id="idle-check", coalesce=True)
        self._apscheduler.start()

    async def _tick(self) -> None:
        """The job returns at once and the night goes on as a task: a job that lasted the whole sleep
        would have every later tick skipped (and logged as such) until morning."""
        if not self._sleeping and self._night is None:
            self._night = asyncio.ensure_future(self.check())
            self._night.add_done_callback(self._night_over)

    def _night_over(self, _task: asyncio.Future) -> None:
        self._night = None

    def stop(self) -> None:
        """Stop the idle check, and the sleep process if one runs (a killed sleep changes nothing live)."""
        if self._apscheduler is not None and self._apscheduler.running:
            self._apscheduler.shutdown(wait=False)
        self._apscheduler = None
        if self._sleeping and self._handle is not None:
            self._handle.kill()

    def _earliest(self, moment: datetime) -> datetime:
        last = self.last_activity()
        return moment if last is None else max(moment, last + timedelta(minutes=self.config.idle_minutes))

    def _waiting_sessions(self) -> int:
        """Sessions not slept on yet, counted only if something was said since the last run started."""
        last_run = self.store.sleep.last_run()
        said = self.store.last_message_time()
        if said is None or (last_run is not None and said <= last_run["started"]):
            return 0
        return len(self.store.sleep.unconsolidated_sessions())

    async def _follow_sleep(self, reason: str) -> SleepOutcome:
        """Start the sleep process and relay its events to the loop from a daemon thread.

        A daemon thread, not the loop's executor: quitting the app must not wait for the night to end.
        """
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[SleepOutcome] = loop.create_future()

        def follow() -> None:
            try:
                outcome = SleepOutcome(reason, report=self._drive(loop))
            except SomnusError as error:
                outcome = SleepOutcome(reason, error=str(error))
            except Exception as error:  # a sleep that crashed must not take the app down with it
                outcome = SleepOutcome(reason, error=f"the sleep failed: {type(error).__name__}: {error}")
            _call_on_loop(loop, _settle, finished, outcome)

        threading.Thread(target=follow, name="somnus-sleep", daemon=True).start()
        return await finished

    def _drive(self, loop: asyncio.AbstractEventLoop) -> Any:
        from assistant.sleep import start_sleep

        handle = self._handle = start_sleep(self.paths, self.config, log=self.paths.home / SLEEP_LOG,
                                            all_cores=self.all_cores)
        for event in handle.events():
            if self._on_event is not None:
                _call_on_loop(loop, self._on_event, event)
        return handle.result()


def _settle(future: asyncio.Future, outcome: SleepOutcome) -> None:
    if not future.done():
        future.set_result(outcome)


def _call_on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object) -> None:
    """Hand ``callback`` to the loop; once the app has quit there is no one left to tell."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass
