"""The Somnus app: chat with the model, browse past sessions, and watch it sleep.

The interface thread never waits on the model: the engine loads, and replies generate, in worker
threads, and the sleep runs in its own process followed by the scheduler. So the prompt answers
keys at once, even while the model loads or sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Input, Label
from textual.widgets.markdown import MarkdownStream

from assistant.chat import Chat
from assistant.config import Config, Paths, SomnusError
from assistant.crashes import ReplyJournal
from assistant.engine import ChatEngine
from assistant.forget import finish_interrupted, forget
from assistant.scheduler import (
    Clock,
    SleepOutcome,
    SleepScheduler,
    describe_outcome,
    local_now,
)
from assistant.store import Store, open_store
from tui.commands import SlashSuggester
from tui.conversation import Conversation
from tui.slash import SlashCommands
from tui.widgets.chat_view import AssistantTurn, ChatView
from tui.widgets.dialogs import AskScreen, ConfirmScreen
from tui.widgets.sidebar import UNTITLED, SessionSidebar
from tui.widgets.status_bar import StatusBar, StatusLine

PROMPT_PLACEHOLDER = "Message Somnus  (/ for commands, Ctrl+P for the palette)"
PRIVATE_BANNER = "PRIVATE SESSION: nothing here is recorded, and sleep never learns it"


class SomnusApp(SlashCommands, App[None]):
    """The terminal app behind bare ``somnus``."""

    CSS_PATH = "styles.tcss"
    TITLE = "Somnus"
    BINDINGS = [
        Binding("escape", "stop_reply", "Stop reply", show=False),
        Binding("ctrl+n", "new_session", "New session"),
        Binding("ctrl+f", "search", "Search"),
        Binding("f1", "slash('help')", "Help"),
        Binding("tab", "complete", "Complete", show=False, priority=True),
    ]

    def __init__(
        self,
        paths: Paths,
        config: Config,
        *,
        session_id: int | None = None,
        private: bool = False,
        now: Clock = local_now,
        check_every: float | None = None,
    ) -> None:
        super().__init__()
        self.paths = paths
        self.config = config
        self.store: Store = open_store(paths, config)
        if session_id is not None:
            self.store.session(session_id)  # an unknown id fails now, as one line
        self.engine = ChatEngine(paths, config, self.store, progress=self._model_progress)
        self._preparing: str | None = None  # what making the model ready is doing (a first import)
        self.conversation = Conversation(session_id, private)
        self.scheduler = SleepScheduler(
            paths, config, self.store, now=now,
            on_start=self.sleep_started, on_event=self.sleep_progress, on_finish=self._sleep_finished,
            **({} if check_every is None else {"check_every": check_every}),
        )
        self.last_sleep: SleepOutcome | None = None
        self.journal = ReplyJournal(paths.replying)
        self._cancel = threading.Event()
        self._replying = False

    @property
    def replying(self) -> bool:
        """A reply is being written (Escape stops it)."""
        return self._replying

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield SessionSidebar(self.store)
            with Vertical(id="conversation"):
                yield Label(PRIVATE_BANNER, id="private-banner")
                yield ChatView(id="chat")
                yield Label("", id="command-hints", markup=False)
                yield Input(placeholder=PROMPT_PLACEHOLDER, id="prompt", suggester=SlashSuggester())
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()
        await self._show_conversation()
        self.refresh_status()

    def on_ready(self) -> None:
        """After the first frame: loading the model (torch's import holds the GIL for seconds) would
        otherwise delay the prompt the user is waiting to type into."""
        # After the first frame: a notice sent before it is never shown.
        for line in self.journal.crashed() + finish_interrupted(self.paths, self.store):
            self.notify(line[0].upper() + line[1:], severity="warning", timeout=15)
        self._load_engine()
        self.scheduler.start()
        self.set_interval(30, self.refresh_status)

    async def on_unmount(self) -> None:
        self._cancel.set()
        self.scheduler.stop()

    async def on_event(self, event: events.Event) -> None:
        """Any key or click means the user is here: the idle clock starts again."""
        if isinstance(event, (events.Key, events.MouseDown)) and not event.is_forwarded:
            self.scheduler.touch()
        await super().on_event(event)

    # The conversation

    @on(Input.Submitted, "#prompt")
    async def _submitted(self, event: Input.Submitted) -> None:
        text = event.value
        if not text.strip():
            return
        if text.startswith("/"):
            event.input.clear()
            await self.run_slash(text)
            return
        if self._replying:
            self.notify("A reply is still being written: wait, or press Escape to stop it", severity="warning")
            return
        event.input.clear()
        await self.send(text)

    @on(Input.Changed, "#prompt")
    def _prompt_changed(self, event: Input.Changed) -> None:
        self.show_command_hints(event.value)

    async def send(self, text: str) -> None:
        """Show the user's turn and stream the reply under it."""
        self._replying = True
        self._cancel = threading.Event()
        turn = await self.query_one(ChatView).add_turn(text)
        self._generate(text, turn, turn.begin_stream(), self._cancel)

    @work(thread=True, group="reply")
    def _generate(self, text: str, turn: AssistantTurn, stream: MarkdownStream, cancel: threading.Event) -> None:
        """Generate in this worker thread, handing each piece to the screen as it comes."""
        reply = problem = None
        handed_over = False  # from here on, Chat has recorded the user's turn (or keeps it, in private)
        try:
            with self.engine.using() as (backend, model):
                chat = self._chat(backend, model)
                handed_over = True
                reply = chat.reply(text, cancel=cancel, on_piece=partial(self._show_piece, stream))
        except Exception as error:  # engines raise their own types; the user sees the line, keeps the text
            problem = " ".join(str(error).split()) or type(error).__name__
        self._queue(partial(self._reply_ended, text, turn, stream, reply, problem, kept=handed_over))

    def _show_piece(self, stream: MarkdownStream, piece: str) -> None:
        """Keep pace with the screen: a busy interface slows the reply down rather than falling behind
        it. The wait is bounded, so an app that quits mid-reply never holds this thread."""
        shown = threading.Event()
        self._queue(self._write_piece, stream, piece, shown)
        shown.wait(timeout=1.0)

    @staticmethod
    async def _write_piece(stream: MarkdownStream, piece: str, shown: threading.Event) -> None:
        await stream.write(piece)
        shown.set()

    def _queue(self, callback: Callable, *args: object) -> None:
        """Run ``callback(*args)`` on the interface, from a worker thread, without waiting for it."""
        try:
            self.call_later(callback, *args)
        except RuntimeError:  # the app has quit: nothing is left to show
            pass

    def _chat(self, backend: Any, model: Any) -> Chat:
        """The conversation's Chat, on the engine's current backend (it changes after a promotion)."""
        conversation = self.conversation
        conversation.chat = self.engine.bind(
            conversation.chat, backend, model, store=None if conversation.private else self.store,
            session_id=conversation.session_id, private=conversation.private, journal=self.journal)
        return conversation.chat

    async def _reply_ended(self, text: str, turn: AssistantTurn, stream: MarkdownStream, reply: Any,
                           problem: str | None, *, kept: bool) -> None:
        await stream.stop()
        self._replying = False
        if reply is not None:
            turn.mark(reply.status)
        if problem is not None:
            turn.mark("error")
            prompt = self.query_one("#prompt", Input)
            if not kept and not prompt.value:
                prompt.value = text  # never lose what the user wrote
            await self.query_one(ChatView).add_notice(problem, error=True)
        chat = self.conversation.chat
        if chat is not None and chat.session_id is not None and chat.session_id != self.conversation.session_id:
            self.conversation.session_id = chat.session_id
            self._show_title()
            await self._refresh_sidebar()
        self.refresh_status()

    def action_stop_reply(self) -> None:
        if self._replying:
            self._cancel.set()

    async def _show_conversation(self) -> None:
        """Show the current conversation: its messages, its title, and the private marking."""
        conversation = self.conversation
        view = self.query_one(ChatView)
        messages = self.store.messages(conversation.session_id) if conversation.session_id is not None else []
        await view.show_messages(messages)
        view.screen.set_class(conversation.private, "-private")
        self._show_title()
        await self._refresh_sidebar()

    def _show_title(self) -> None:
        conversation = self.conversation
        if conversation.private:
            title = "Private session"
        elif conversation.session_id is None:
            title = "New session"
        else:
            title = self.store.session(conversation.session_id)["title"] or UNTITLED
        self.query_one(ChatView).border_title = title

    async def _refresh_sidebar(self) -> None:
        sidebar = self.query_one(SessionSidebar)
        sidebar.current = self.conversation.session_id
        await sidebar.reload()

    async def open_conversation(self, conversation: Conversation) -> None:
        if self._replying:
            self.notify("Wait for the reply to end (or press Escape) before leaving this session", severity="warning")
            return
        self.conversation = conversation
        await self._show_conversation()
        self.query_one("#prompt", Input).focus()

    async def action_new_session(self) -> None:
        await self.open_conversation(Conversation())

    def action_search(self) -> None:
        self.query_one("#session-search", Input).focus()

    # The sidebar

    @on(SessionSidebar.Chosen)
    async def _session_chosen(self, event: SessionSidebar.Chosen) -> None:
        if event.session_id != self.conversation.session_id:
            await self.open_conversation(Conversation(event.session_id))

    @on(SessionSidebar.RenameAsked)
    def _rename_asked(self, event: SessionSidebar.RenameAsked) -> None:
        title = self.store.session(event.session_id)["title"]
        self.push_screen(AskScreen("New title for this session:", title), partial(self._rename, event.session_id))

    async def _rename(self, session_id: int, title: str | None) -> None:
        if title is None:
            return
        try:
            self.store.rename_session(session_id, title)
        except SomnusError as error:
            self.notify(str(error), severity="error")
            return
        if session_id == self.conversation.session_id:
            await self._show_conversation()
        else:
            await self._refresh_sidebar()

    @on(SessionSidebar.DeleteAsked)
    def _delete_asked(self, event: SessionSidebar.DeleteAsked) -> None:
        session = self.store.session(event.session_id)
        question = (f"Delete the session \"{session['title'] or UNTITLED}\" and its {session['message_count']} "
                    "messages, and forget what sleep learnt from it? This cannot be undone.")
        self.push_screen(ConfirmScreen(question, "Delete"), partial(self._delete, event.session_id))

    async def _delete(self, session_id: int, confirmed: bool | None) -> None:
        if not confirmed:
            return
        if session_id == self.conversation.session_id and self._replying:
            self.notify("Wait for the reply to end before deleting this session", severity="warning")
            return
        try:  # a forget: the text leaves every file, and the adapter versions that learnt it go too
            done = await asyncio.to_thread(forget, self.paths, self.store, session_id)
        except SomnusError as error:
            self.notify(f"Not deleted: {error}", severity="warning")
            return
        self.notify("Session deleted" + (f"; adapter version(s) {', '.join(map(str, done.versions))} that learnt it "
                                         "are gone, and the next sleep learns the other sessions again"
                                         if done.versions else ""))
        if session_id == self.conversation.session_id:
            self.conversation = Conversation()
            await self._show_conversation()
        else:
            await self._refresh_sidebar()

    # The engine

    @work(thread=True, group="engine")
    def _load_engine(self) -> None:
        self.engine.load()
        self._queue(self._engine_changed)

    @work(thread=True, group="engine")
    def reload_engine(self, config: Config | None = None) -> None:
        """Open the model again (after a promotion, a rollback or /model), once the reply in flight ends."""
        self.engine.reload(config)
        self._queue(self._engine_changed)

    def _model_progress(self, stage: str, fraction: float) -> None:
        """From the loading thread: a model's first use (an import, an export) shows in the status bar."""
        self._queue(self._show_preparing, f"preparing the model: {stage} ({fraction:.0%})")

    def _show_preparing(self, text: str) -> None:
        self._preparing = text
        self.refresh_status()

    async def _engine_changed(self) -> None:
        self._preparing = None
        if self.engine.problem is not None:
            await self.query_one(ChatView).add_notice(f"The model cannot be loaded: {self.engine.problem}", error=True)
        self.refresh_status()

    # Sleep and the status bar

    def sleep_started(self, reason: str) -> None:
        self.query_one(StatusBar).sleep_started(reason)

    def sleep_progress(self, event: Any) -> None:
        self.query_one(StatusBar).sleep_progress(event.stage, event.progress, event.message)

    def _sleep_finished(self, outcome: SleepOutcome) -> None:
        self.last_sleep = outcome
        self.query_one(StatusBar).sleep_finished()
        failed = outcome.error is not None or outcome.report.status == "failed"
        self.notify(describe_outcome(outcome) + ("" if outcome.report is None else "  (/report to read it)"),
                    severity="error" if failed else "information", timeout=10)
        self.refresh_status()

    def _status_facts(self) -> dict[str, object]:
        model = self.engine.model
        ref = model.ref if model is not None else self.engine.config.model
        live = self.store.sleep.live_adapter()
        last_run = self.store.sleep.last_run()
        upcoming = self.scheduler.next_sleep()
        backend = self.engine.backend  # read once: a reload on the engine's thread may close it meanwhile
        return {
            "model": Path(ref).name if Path(ref).is_absolute() else ref,
            "engine": (backend.name if self.engine.ready and backend is not None
                       else self._preparing or "loading" if self.engine.loading else "not loaded"),
            "adapter": f"v{live['version']}" if live else "none",
            "last sleep": _last_sleep_text(last_run, self.paths),
            "next sleep": "sleeping now" if self.scheduler.sleeping else _next_sleep_text(upcoming),
        }

    def refresh_status(self) -> None:
        """Show the current state; a changed live adapter (a promotion, a rollback, here or in the
        daemon) re-opens the engine, so the next reply wears what the model now knows."""
        if self.engine.outdated():
            self.reload_engine()
        facts = self._status_facts()
        self.query_one(StatusBar).show(StatusLine(str(facts["model"]), str(facts["engine"]), str(facts["adapter"]),
                                                  str(facts["last sleep"]), str(facts["next sleep"])))


def _last_sleep_text(run: dict | None, paths: Paths) -> str:
    from assistant.sleep import is_sleeping

    if run is None:
        return "never"
    outcome = (run.get("report") or {}).get("status") or run["status"]
    if outcome == "running" and not is_sleeping(paths):
        outcome = "interrupted"  # killed mid-night; the next sleep records it as failed
    when = datetime.fromisoformat(run["started"]).astimezone().strftime("%d %b %H:%M")
    return f"{when} {outcome}"


def _next_sleep_text(upcoming: datetime | None) -> str:
    return "nothing new yet" if upcoming is None else f"{upcoming.astimezone():%H:%M} if idle"
