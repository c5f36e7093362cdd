"""The Somnus app: chat with the model, browse past sessions, and watch it sleep.

The interface thread never waits on the model: the engine loads, and replies generate, in worker
threads, and the sleep runs in its own process followed by the scheduler. So the prompt answers
keys at once, even while the model loads or sleeps.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from textual import events, on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input, Label

from assistant.chat import Chat, sampling_from
from assistant.config import Config, Paths, SomnusError, update_config, write_private_file
from assistant.export import as_markdown, sessions_with_messages
from assistant.scheduler import Clock, SleepOutcome, SleepScheduler, describe_outcome, local_now
from assistant.store import Store, open_store
from tui import pages
from tui.commands import SLASH_COMMANDS, SlashCommand, SlashSuggester, matching, parse
from tui.engine import ChatEngine
from tui.widgets.chat_view import AssistantTurn, ChatView
from tui.widgets.dialogs import AskScreen, ConfirmScreen, PageScreen
from tui.widgets.sidebar import UNTITLED, SessionSidebar
from tui.widgets.status_bar import StatusBar, StatusLine

PROMPT_PLACEHOLDER = "Message Somnus  (/ for commands, Ctrl+P for the palette)"
PRIVATE_BANNER = "PRIVATE SESSION: nothing here is recorded, and sleep never learns it"


@dataclass
class Conversation:
    """What the chat view shows: a recorded session (None until its first turn) or a private one."""

    session_id: int | None = None
    private: bool = False
    chat: Chat | None = None  # built once the model is loaded


class SomnusApp(App[None]):
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
        self.engine = ChatEngine(paths, config, self.store)
        self.conversation = Conversation(session_id, private)
        self.scheduler = SleepScheduler(
            paths, config, self.store, now=now,
            on_start=self._sleep_started, on_event=self._sleep_progress, on_finish=self._sleep_finished,
            **({} if check_every is None else {"check_every": check_every}),
        )
        self.last_sleep: SleepOutcome | None = None
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
        self._load_engine()
        self.scheduler.start()
        self.set_interval(30, self.refresh_status)
        self.refresh_status()

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

    async def send(self, text: str) -> None:
        """Show the user's turn and stream the reply under it."""
        self._replying = True
        self._cancel = threading.Event()
        turn = await self.query_one(ChatView).add_turn(text)
        self._generate(text, turn, self._cancel)

    @work(thread=True, group="reply")
    def _generate(self, text: str, turn: AssistantTurn, cancel: threading.Event) -> None:
        stream = self.call_from_thread(turn.begin_stream)
        reply = problem = None
        try:
            with self.engine.using() as (backend, model):
                chat = self._chat(backend, model)
                reply = chat.reply(text, cancel=cancel,
                                   on_piece=lambda piece: self.call_from_thread(stream.write, piece))
        except Exception as error:  # engines raise their own types; the user sees the line, keeps the text
            problem = " ".join(str(error).split()) or type(error).__name__
        finally:
            self.call_from_thread(stream.stop)
        self.call_from_thread(self._reply_ended, text, turn, reply, problem)

    def _chat(self, backend: Any, model: Any) -> Chat:
        """The conversation's Chat, on the engine's current backend (it changes after a promotion)."""
        conversation = self.conversation
        if conversation.chat is None:
            conversation.chat = Chat(backend, model=model.ref, store=None if conversation.private else self.store,
                                     session_id=conversation.session_id, sampling=sampling_from(self.engine.config),
                                     private=conversation.private)
        conversation.chat.backend, conversation.chat.model = backend, model.ref
        return conversation.chat

    async def _reply_ended(self, text: str, turn: AssistantTurn, reply: Any, problem: str | None) -> None:
        self._replying = False
        if reply is not None:
            turn.mark(reply.status)
        if problem is not None:
            turn.mark("error")
            await self.query_one(ChatView).add_notice(problem, error=True)
            recorded = self.conversation.chat is not None and self.conversation.chat.session_id is not None
            prompt = self.query_one("#prompt", Input)
            if not recorded and not prompt.value:
                prompt.value = text  # never lose what the user wrote
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
        self.screen.set_class(conversation.private, "-private")
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
                    "messages? This cannot be undone.")
        self.push_screen(ConfirmScreen(question, "Delete"), partial(self._delete, event.session_id))

    async def _delete(self, session_id: int, confirmed: bool | None) -> None:
        if not confirmed:
            return
        if session_id == self.conversation.session_id and self._replying:
            self.notify("Wait for the reply to end before deleting this session", severity="warning")
            return
        self.store.delete_session(session_id)
        self.notify("Session deleted")
        if session_id == self.conversation.session_id:
            self.conversation = Conversation()
            await self._show_conversation()
        else:
            await self._refresh_sidebar()

    # Slash commands, their completion and the palette

    @on(Input.Changed, "#prompt")
    def _hint(self, event: Input.Changed) -> None:
        hints = self.query_one("#command-hints", Label)
        candidates = matching(event.value)
        hints.update("\n".join(f"{command.usage:<18} {command.help}" for command in candidates))
        hints.display = bool(candidates)

    def action_complete(self) -> None:
        """Tab: accept the /command suggestion in the prompt; elsewhere, move focus as usual."""
        prompt = self.query_one("#prompt", Input)
        candidates = matching(prompt.value) if self.focused is prompt else []
        if candidates:
            prompt.value = f"/{candidates[0].name} "
            prompt.cursor_position = len(prompt.value)
        else:
            self.screen.focus_next()

    async def run_slash(self, text: str) -> None:
        try:
            command, argument = parse(text)
        except SomnusError as error:
            self.notify(str(error), severity="error")
            return
        await getattr(self, command.action)(argument)

    async def action_slash(self, name: str) -> None:
        await self.run_slash("/" + name)

    def get_system_commands(self, screen: Screen):
        yield from super().get_system_commands(screen)
        for command in SLASH_COMMANDS:
            yield SystemCommand(command.usage, command.help, partial(self._palette, command))

    async def _palette(self, command: SlashCommand) -> None:
        """From the palette a command runs without its (optional) argument."""
        await getattr(self, command.action)("")

    async def slash_new(self, _argument: str) -> None:
        await self.open_conversation(Conversation())

    async def slash_private(self, _argument: str) -> None:
        await self.open_conversation(Conversation(private=True))

    async def slash_help(self, _argument: str) -> None:
        self.push_screen(PageScreen(pages.help_page(), name="help"))

    async def slash_status(self, _argument: str) -> None:
        facts = {**self._status_facts(), "data folder": self.paths.home, "database": self.paths.database,
                 **self.store.counts(),
                 "sessions not slept on": len(self.store.sleep.unconsolidated_sessions()),
                 "this session": "private (not recorded)" if self.conversation.private
                 else self.conversation.session_id or "new (recorded from its first message)"}
        self.push_screen(PageScreen(pages.facts_page("Status", facts), name="status"))

    async def slash_model(self, argument: str) -> None:
        from assistant.models import known_models, resolve_model

        if not argument:
            self.push_screen(PageScreen(pages.models_page(known_models(self.paths, self.engine.config.model)),
                                        name="models"))
            return
        if self._replying:
            self.notify("Wait for the reply to end before switching models", severity="warning")
            return
        try:
            model = resolve_model(argument, self.paths)
            update_config(self.paths, model=model.ref)
        except SomnusError as error:
            self.notify(str(error), severity="error")
            return
        self.config = self.config.with_overrides(model=model.ref)
        self.notify(f"Switching to {model.ref} (now the default)")
        self.reload_engine(self.config)

    async def slash_adapters(self, _argument: str) -> None:
        self.push_screen(PageScreen(pages.adapters_page(self.store.sleep.adapters()), name="adapters"))

    async def slash_rollback(self, _argument: str) -> None:
        if self.scheduler.sleeping:
            self.notify("A sleep is running: roll back after it ends", severity="warning")
            return
        live = self.store.sleep.live_adapter()
        if live is None:
            self.notify("Nothing to roll back: no adapter is live", severity="warning")
            return
        question = (f"Roll back from adapter v{live['version']} to the one before? What v{live['version']} "
                    "learnt will be slept on again.")
        self.push_screen(ConfirmScreen(question, "Roll back"), self._rollback)

    def _rollback(self, confirmed: bool | None) -> None:
        if not confirmed:
            return
        live = self.store.sleep.rollback()
        self.notify(f"Live adapter: v{live['version']}" if live else "Live: the bare model, no adapter")
        self.refresh_status()

    async def slash_export(self, argument: str) -> None:
        session_id = self.conversation.session_id
        if session_id is None:
            self.notify("Nothing to export: this session is private or has no message yet", severity="warning")
            return
        target = Path(argument or f"somnus-session-{session_id}.md").expanduser().resolve()
        try:
            write_private_file(target, as_markdown(sessions_with_messages(self.store, [session_id])).encode())
        except (OSError, SomnusError) as error:
            self.notify(f"cannot write {target}: {getattr(error, 'strerror', None) or error}", severity="error")
            return
        self.notify(f"Exported to {target}")

    async def slash_sleep(self, _argument: str) -> None:
        if self.scheduler.sleeping:
            self.notify("Already sleeping: the status bar shows how far it is", severity="warning")
            return
        self.run_worker(self.scheduler.sleep("you asked with /sleep"), group="sleep")

    async def slash_report(self, _argument: str) -> None:
        if self.last_sleep is not None and self.last_sleep.report is not None:
            report, reason = asdict(self.last_sleep.report), self.last_sleep.reason
        else:
            last_run = self.store.sleep.last_run()
            if last_run is None or not last_run.get("report"):
                self.notify("No sleep report yet: /sleep starts one", severity="warning")
                return
            report, reason = last_run["report"], None
        titles = {row["id"]: row["title"] for row in self.store.sessions()}
        self.push_screen(PageScreen(pages.report_page(report, titles, reason), name="report"))

    # The engine

    @work(thread=True, group="engine")
    def _load_engine(self) -> None:
        self.engine.load()
        self.call_from_thread(self._engine_changed)

    @work(thread=True, group="engine")
    def reload_engine(self, config: Config | None = None) -> None:
        """Open the model again (after a promotion, a rollback or /model), once the reply in flight ends."""
        self.engine.reload(config)
        self.call_from_thread(self._engine_changed)

    async def _engine_changed(self) -> None:
        if self.engine.problem is not None:
            await self.query_one(ChatView).add_notice(f"The model cannot be loaded: {self.engine.problem}", error=True)
        self.refresh_status()

    # Sleep and the status bar

    def _sleep_started(self, reason: str) -> None:
        self.query_one(StatusBar).sleep_started(reason)

    def _sleep_progress(self, event: Any) -> None:
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
        return {
            "model": Path(ref).name if Path(ref).is_absolute() else ref,
            "engine": (self.engine.backend.name if self.engine.ready
                       else "loading" if self.engine.loading else "not loaded"),
            "adapter": f"v{live['version']}" if live else "none",
            "last sleep": _last_sleep_text(last_run),
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


def _last_sleep_text(run: dict | None) -> str:
    if run is None:
        return "never"
    outcome = (run.get("report") or {}).get("status") or run["status"]
    when = datetime.fromisoformat(run["started"]).astimezone().strftime("%d %b %H:%M")
    return f"{when} {outcome}"


def _next_sleep_text(upcoming: datetime | None) -> str:
    if upcoming is None:
        return "when there is something new"
    return f"{upcoming.astimezone().strftime('%H:%M')} if idle"
