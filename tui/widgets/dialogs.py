"""Modal screens: a yes/no question, a one-line answer, and a page of Markdown to read."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown


class ConfirmScreen(ModalScreen[bool]):
    """Asks before something that cannot be undone; Escape or "Keep" answers no."""

    BINDINGS = [Binding("escape", "dismiss(False)", "Keep")]

    def __init__(self, question: str, confirm: str) -> None:
        super().__init__(classes="dialog")
        self.question = question
        self.confirm = confirm

    def compose(self) -> ComposeResult:
        with Vertical(classes="box"):
            yield Label(self.question, markup=False)
            with Horizontal(classes="buttons"):
                yield Button(self.confirm, variant="error", id="confirm")
                yield Button("Keep", id="keep")

    def on_mount(self) -> None:
        self.query_one("#keep", Button).focus()

    @on(Button.Pressed)
    def _answered(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm")


class AskScreen(ModalScreen[str | None]):
    """Asks for one line (a new title); Enter answers, Escape answers nothing."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__(classes="dialog")
        self.question = question
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical(classes="box"):
            yield Label(self.question, markup=False)
            yield Input(self.value, id="answer")

    @on(Input.Submitted)
    def _answered(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)


class PageScreen(ModalScreen[None]):
    """A page to read (help, status, a sleep report); Escape or q closes it."""

    BINDINGS = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, markdown: str, *, name: str) -> None:
        super().__init__(name=name, classes="dialog")
        self.markdown = markdown

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="box page") as page:
            page.border_subtitle = "Escape closes this page"
            yield from self.body()

    def body(self) -> ComposeResult:
        """What the page shows under its border (a page with more than Markdown adds it here)."""
        yield Markdown(self.markdown)
