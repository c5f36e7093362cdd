"""The ``somnus`` command line.

Every mistake a user can make (an unknown model, a busy or damaged database, a bad config file,
a missing engine) ends as ONE line on stderr and exit status 2; only bugs show a traceback.
Heavy libraries (torch, transformers, llama.cpp, and even sqlite-utils, which pulls in numpy)
load inside the commands that need them, so ``--help`` starts at once. ``--json`` output is
for scripts: its keys are kept stable.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from assistant.config import (
    BackendName,
    Config,
    Paths,
    SomnusError,
    load_config,
    open_paths,
    update_config,
    write_private_file,
)

if TYPE_CHECKING:
    from assistant.chat import Chat
    from assistant.store import Store

app = typer.Typer(help="Somnus: a local assistant that learns while you sleep.", add_completion=False,
                  pretty_exceptions_enable=False)
model_app = typer.Typer(help="List, download and choose models.", no_args_is_help=True)
bench_app = typer.Typer(help="Measure models and engines on this machine.", no_args_is_help=True)
app.add_typer(model_app, name="model")
adapters_app = typer.Typer(
    help="Adapter versions (sessions, scores, which is live); `export` writes the live one for other tools.")
app.add_typer(bench_app, name="bench")
app.add_typer(adapters_app, name="adapters")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
SessionOption = Annotated[Optional[int], typer.Option("--session", help="Continue this session instead of a new one.")]
PrivateFlag = Annotated[bool, typer.Option("--private", help="Record nothing.")]


@dataclass(frozen=True)
class GlobalOptions:
    home: Optional[Path]
    model: Optional[str]
    backend: Optional[str]


@dataclass(frozen=True)
class Workspace:
    """The data folder and the effective config (config.toml with the command line's overrides)."""

    paths: Paths
    config: Config


def workspace(ctx: typer.Context) -> Workspace:
    """What every command (sub-apps' too) works with; the data folder is created on first use."""
    options: GlobalOptions = ctx.find_root().obj
    paths = open_paths(options.home)
    config = load_config(paths).with_overrides(model=options.model, backend=options.backend)
    return Workspace(paths, config)


@app.callback(invoke_without_command=True)
def global_options(
    ctx: typer.Context,
    home: Annotated[Optional[Path], typer.Option(help="Data folder (default: $SOMNUS_HOME, else the user data folder).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model: nano, a model folder, a .gguf file or org/name.")] = None,
    backend: Annotated[Optional[BackendName], typer.Option(help="Chat engine (default: from config.toml).")] = None,
) -> None:
    ctx.obj = GlobalOptions(home, model, backend)
    if ctx.invoked_subcommand is None:
        _run_app(workspace(ctx))


@app.command()
def ask(
    ctx: typer.Context,
    message: Annotated[str, typer.Argument(help='The message, or "-" to read all of stdin.')],
    session: SessionOption = None,
    private: PrivateFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Ask one question and print the answer as it streams."""
    ws = workspace(ctx)
    text = _read_stdin_message() if message == "-" else message
    with _chat_store(ws, session, private) as store:
        with _open_chat(ws, store, session, private) as conversation:
            reply = conversation.reply(text, on_piece=None if json_output else _write_piece)
    if json_output:
        _print_json({"session_id": reply.session_id, "message_id": reply.message_id, "reply": reply.text,
                     "status": reply.status, "model": conversation.model, "prompt_tokens": reply.prompt_tokens,
                     "completion_tokens": reply.completion_tokens})
    else:
        print()


@app.command()
def chat(
    ctx: typer.Context,
    plain: Annotated[bool, typer.Option("--plain", help="Line-based chat on stdin/stdout, for scripts and pipes.")] = False,
    session: SessionOption = None,
    private: PrivateFlag = False,
) -> None:
    """Chat in the app, or with --plain turn by turn: each line of stdin one message, each answer one block.

    A plain turn that fails is reported on stderr and the chat goes on; the exit status is then 2.
    """
    if not plain:
        _run_app(workspace(ctx), session_id=session, private=private)
        return
    from backends.base import BackendError

    ws = workspace(ctx)
    interactive = sys.stdin.isatty()
    failed = False
    with _chat_store(ws, session, private) as store, _open_chat(ws, store, session, private) as conversation:
        for line in _stdin_lines(prompt="> " if interactive else None):
            if not line.strip():
                continue
            try:
                conversation.reply(line, on_piece=_write_piece)
            except (SomnusError, BackendError) as error:
                _print_error(error)
                failed = True
            except KeyboardInterrupt:  # Ctrl-C stops the reply (recorded as cancelled), not the chat
                if not interactive:
                    raise
                print("\n[cancelled]", end="")
            print(flush=True)
    if failed:
        raise typer.Exit(2)


@app.command()
def sessions(
    ctx: typer.Context,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the most recent N.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """List the recorded sessions, the most recent first."""
    with _open_store(workspace(ctx)) as store:
        rows = store.sessions(limit)
    if json_output:
        _print_json(rows)
        return
    _print_table(["id", "updated", "messages", "model", "title"],
                 [[row["id"], _short_time(row["updated"]), row["message_count"], row["model"], row["title"]]
                  for row in rows])


@app.command()
def show(
    ctx: typer.Context,
    session_id: Annotated[int, typer.Argument(metavar="ID")],
    json_output: JsonFlag = False,
) -> None:
    """Print one session's messages."""
    with _open_store(workspace(ctx)) as store:
        session, messages = store.session(session_id), store.messages(session_id)
    if json_output:
        _print_json({"session": session, "messages": messages})
        return
    print(_visible(f"session {session['id']}: {session['title']}  ({session['model']}, "
                   f"{_short_time(session['created'])})"))
    for message in messages:
        status = "" if message["status"] == "complete" else f" [{message['status']}]"
        print(f"\n--- {message['role']}{status} · {_short_time(message['created'])}")
        print(_visible(message["content"]))


@app.command()
def search(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="Words to find (all of them, in any order).")],
    limit: Annotated[int, typer.Option(min=1)] = 20,
    json_output: JsonFlag = False,
) -> None:
    """Find messages by their words (full-text search)."""
    with _open_store(workspace(ctx)) as store:
        rows = store.search(query, limit)
    if json_output:
        _print_json(rows)
        return
    _print_table(["session", "message", "role", "when", "match"],
                 [[row["session_id"], row["message_id"], row["role"], _short_time(row["created"]), row["snippet"]]
                  for row in rows])


@app.command()
def export(
    ctx: typer.Context,
    session_id: Annotated[Optional[int], typer.Argument(metavar="[ID]", help="One session (default: all).")] = None,
    format_: Annotated[Literal["md", "json"], typer.Option("--format", help="Markdown, or JSON (a list of sessions).")] = "md",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file (mode 0600).")] = None,
) -> None:
    """Export sessions with their messages, oldest first."""
    from assistant.export import as_json, as_markdown, sessions_with_messages

    with _open_store(workspace(ctx)) as store:
        ids = [session_id] if session_id is not None else [row["id"] for row in reversed(store.sessions())]
        exported = sessions_with_messages(store, ids)
    document = as_json(exported) if format_ == "json" else as_markdown(exported)
    if output is None:
        sys.stdout.write(_visible(document) if format_ == "md" else document)
    else:
        write_private_file(output.expanduser().resolve(), document.encode("utf-8"))


@app.command()
def status(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Where the data lives, which model and engine would answer, and what has been recorded."""
    from assistant.models import ModelError, resolve_model
    from assistant.sleep import is_sleeping

    ws = workspace(ctx)
    try:
        model, model_problem = resolve_model(ws.config.model, ws.paths).ref, None
    except ModelError as error:
        model, model_problem = ws.config.model, str(error)
    engines, engine_problem = _engines(ws.config.backend)
    with _open_store(ws) as store:
        report = {
            "home": str(ws.paths.home),
            "config_file": str(ws.paths.config_file),
            "database": str(ws.paths.database),
            "model": model,
            "model_problem": model_problem,
            "backend": ws.config.backend,
            "chat_engine": engines[0] if engines else None,
            "training_engine": engines[1] if engines else None,
            "engine_problem": engine_problem,
            **store.counts(),
            "live_adapters": [adapter["version"] for adapter in store.sleep.live_adapters()],
            "unconsolidated_sessions": len(store.sleep.unconsolidated_sessions()),
            "last_sleep_run": store.sleep.last_run(),
        }
        running = report["last_sleep_run"]
        if running is not None and running["status"] == "running" and is_sleeping(ws.paths):
            report["sleeping_now"] = f"stage {running['stage']} (run {running['id']}, started {running['started']})"
    if json_output:
        _print_json(report)
        return
    for key, value in report.items():
        if value is not None:
            print(f"{key.replace('_', ' ')}: {value}")


@model_app.command("ls")
def model_ls(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """List the bundled, downloaded and configured models (* marks the one in use)."""
    from assistant.models import known_models

    ws = workspace(ctx)
    rows = known_models(ws.paths, ws.config.model)
    if json_output:
        _print_json(rows)
        return
    _print_table(["", "model", "kind", "state"],
                 [["*" if row["current"] else "", row["ref"], row["kind"], "ready" if row["ready"] else row["problem"]]
                  for row in rows])


@model_app.command("pull")
def model_pull(ctx: typer.Context, repo_id: Annotated[str, typer.Argument(metavar="ORG/NAME")]) -> None:
    """Download a model from the Hugging Face hub into the data folder."""
    from assistant.models import pull_model

    model = pull_model(repo_id, workspace(ctx).paths)
    print(f"downloaded {model.ref} to {model.path}; use it with `somnus model use {model.ref}`")


@model_app.command("use")
def model_use(ctx: typer.Context, ref: Annotated[str, typer.Argument(metavar="MODEL")]) -> None:
    """Make MODEL the default (written to config.toml); it must be available locally."""
    from assistant.models import resolve_model

    ws = workspace(ctx)
    model = resolve_model(ref, ws.paths)
    update_config(ws.paths, model=model.ref)
    print(f"model set to {model.ref}")


@model_app.command("import")
def model_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE.gguf", help="A GGUF of a Llama, Qwen2, Qwen3 or Gemma 3 model.")],
    name: Annotated[Optional[str], typer.Option(help="The model's name (default: from the file).")] = None,
) -> None:
    """Make a GGUF file a model that chats and sleeps: dequantized once into the data folder."""
    from assistant.models import import_model

    with _ModelProgress() as progress:
        model = import_model(file, workspace(ctx).paths, name=name, progress=progress)
    print(f"imported {file} as {model.ref}; use it with `somnus model use {model.ref}`")


@app.command("sleep")
def sleep_command(
    ctx: typer.Context,
    now: Annotated[bool, typer.Option("--now", help="Sleep now: consolidate the sessions not yet learnt.")] = False,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Training steps (default: the night's budget).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Consolidate recent sessions into a new adapter block, gated by recall and retention."""
    from assistant.sleep import sleep_now

    ws = workspace(ctx)
    if not now:
        from assistant.sleep import is_sleeping

        with _open_store(ws) as store:
            last = store.sleep.last_run()
            pending = store.sleep.unconsolidated_sessions()
        state = "sleeping now" if is_sleeping(ws.paths) else "awake"
        print(f"{state}; {len(pending)} session(s) to consolidate; last sleep: "
              f"{(last or {}).get('status', 'never')}. Run `somnus sleep --now` to sleep at once.")
        return
    from assistant.models import require_trainable, resolve_model

    require_trainable(resolve_model(ws.config.model, ws.paths), "sleep")  # at once, not in the sleep's log
    if json_output:
        report = sleep_now(ws.paths, ws.config, steps=steps)
        _print_json(report.record())
        return
    _print_sleep_report(_sleep_shown(ws, steps=steps))


def _sleep_shown(ws: Workspace, *, steps: int | None = None, sessions: list[int] | None = None):
    """A night, its stage and time left shown on stderr while it runs; its report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from assistant.sleep import sleep_now

    with Progress(TextColumn("{task.fields[stage]:<12}"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=1.0, stage="sleep")
        return sleep_now(ws.paths, ws.config, steps=steps, sessions=sessions, on_event=lambda event: bar.update(
            task, completed=event.progress, description=event.message, stage=event.stage))


def _print_sleep_report(report) -> None:
    from assistant.sleep import kept_training

    def percent(value):
        return "-" if value is None else f"{value:.0%}"

    console = Console()
    console.print(f"[bold]{report.status}[/bold]: {report.reason}")
    if report.status in ("promoted", "rejected"):
        _print_table(["", "value"], [
            ["adapter version", report.adapter],
            ["sessions", ", ".join(map(str, report.sessions))],
            ["recall before -> after", f"{percent(report.recall_before)} -> {percent(report.recall_after)}"],
            *([["judged on", judged]] if (judged := report.training.get("judged_on")) else []),
            ["retention of older nights", percent(report.retention)],
            ["in-context before -> after", f"{percent(report.in_context_before)} -> {percent(report.in_context_after)}"],
            *([["consolidation kept", kept]] if (kept := kept_training(report.training)) else []),
            *_dreaming_rows(report.dreaming, percent),
            ["seconds", report.seconds],
        ])


def _dreaming_rows(dreaming: dict, percent) -> list[list[object]]:
    """The sleep report's summary of the night's dreams (see `somnus dreams` for the journal)."""
    if not dreaming:
        return []
    reward = dreaming.get("reward_mean")
    rows = [["dreams written / judged / kept", f"{dreaming['written']} / {dreaming['judged']} / {dreaming['kept']}"],
            ["mean reward of kept dreams", "-" if reward is None else f"{reward:.2f}"]]
    if "chosen" in dreaming:
        rows.append(["recall consolidated / dreamt",
                     f"{percent(dreaming['recall_consolidated'])} / {percent(dreaming['recall_dreamt'])}"])
        rows.append(["went live", f"{dreaming['chosen']} block"])
    return rows


@app.command()
def dreams(
    ctx: typer.Context,
    run: Annotated[Optional[int], typer.Argument(help="Sleep run id (default: the last run that dreamt).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """The dream journal of a night: each dream, its teacher's reference, score, whether it was kept, its reward."""
    ws = workspace(ctx)
    with _open_store(ws) as store:
        run = run if run is not None else store.sleep.last_dreaming_run()
        rows = store.sleep.dreams(run) if run is not None else []
    if json_output:
        _print_json(rows)
        return
    if not rows:
        print("no dreams yet: no sleep has dreamt" if run is None else f"sleep run {run} has no dreams")
        return

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    print(f"sleep run {run}: {len(rows)} dream(s), {sum(r['kept'] for r in rows)} kept")
    _print_table(["kept", "source", "question", "reference", "confidence", "score", "reward"], [
        ["yes" if r["kept"] else "", r["source"], r["question"], r["reference"] or "(discarded)",
         number(r["confidence"]), number(r["score"]), number(r["reward"])]
        for r in rows
    ])


@adapters_app.callback(invoke_without_command=True)
def adapters(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Adapter versions: which sessions each consolidated, its scores, which one is live."""
    if ctx.invoked_subcommand is not None:
        return
    ws = workspace(ctx)
    with _open_store(ws) as store:
        rows = store.sleep.adapters()
    if json_output:
        _print_json(rows)
        return
    if not rows:
        print("no adapters yet: the model has not slept")
        return
    _print_table(["version", "status", "sessions", "recall", "retention", "created"], [
        [r["version"], r["status"], ",".join(map(str, r["sessions"])) or "-",
         _score(r, "recall_before", "recall_after"), _score(r, "retention"), _short_time(r["created"])]
        for r in rows
    ])


@adapters_app.command("export")
def adapters_export(
    ctx: typer.Context,
    format_: Annotated[Literal["peft", "gguf", "ollama", "mlx"], typer.Argument(
        metavar="FORMAT", help="peft, gguf (llama.cpp), ollama (a Modelfile) or mlx (mlx-lm).")],
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A new (or empty) folder to write.")],
    merged: Annotated[bool, typer.Option("--merged", help="The base model with the adapter folded in "
                                                          "(a model folder, or a GGUF for gguf and ollama).")] = False,
) -> None:
    """Export the live adapter stack as one exact LoRA (or, --merged, a model) for other tools."""
    from assistant.adapter_export import export_live

    ws = workspace(ctx)
    with _open_store(ws) as store:
        exported = export_live(store, ws.paths, ws.config, format_, directory, merged=merged)
    what = "the model with the adapter merged in" if merged else f"one LoRA of rank {exported.rank}"
    print(f"wrote {what} (adapter version {exported.version}, {exported.blocks} block(s)) as {exported.format} "
          f"to {exported.folder}: {', '.join(exported.files)}")
    for note in exported.notes:
        print(f"note: {note}")
    if exported.format == "ollama":
        print(f"use it with: ollama create NAME -f {exported.folder / 'Modelfile'}")


def _score(row: dict, *keys: str) -> str:
    scores = row.get("scores") or {}
    values = [scores.get(k) for k in keys]
    return " -> ".join("-" if v is None else f"{v:.0%}" for v in values)


@app.command()
def forget(
    ctx: typer.Context,
    session_id: Annotated[int, typer.Argument(metavar="SESSION", help="The session's number (see `somnus sessions`).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Forget without asking first.")] = False,
) -> None:
    """Forget a session: its text leaves the store and the adapter blocks that learnt it are deleted;
    the other sessions those blocks learnt are learnt again, night by night."""
    from assistant import forget as forgetting
    from assistant.sleep import is_sleeping

    ws = workspace(ctx)
    if is_sleeping(ws.paths):
        raise SomnusError("a sleep is running (it may be learning this very session); forget after it ends")
    with _open_store(ws) as store:
        if not yes:  # what it would drop, to ask; the forget plans again under the sleep lock
            _confirm_forget(store.session(session_id), forgetting.plan(ws.paths, store, session_id))
        done = forgetting.forget(ws.paths, store, session_id)
    reached = f"adapter version(s) {', '.join(map(str, done.versions))} deleted" if done.versions else "no adapter had learnt it"
    print(f"forgot session {session_id}: {done.messages} message(s) gone from the store and its search; {reached}")
    for sessions in done.nights:
        listed = ", ".join(map(str, sessions))
        print(f"learning again what session(s) {listed} said, without it")
        try:
            _print_sleep_report(_sleep_shown(ws, sessions=sessions))
        except SomnusError as error:
            print(f"somnus: {error}; the next sleep learns session(s) {listed} again", file=sys.stderr)
            break
    else:
        with _open_store(ws) as store:
            forgetting.finished(store, done)
    print("copies made earlier with `somnus adapters export` are outside Somnus's reach: delete them yourself")


def _confirm_forget(session: dict, chosen) -> None:
    if not sys.stdin.isatty():
        raise SomnusError("forget asks before it deletes anything: add --yes to forget without asking")
    what = f"session {session['id']} ({_visible(session['title'] or 'untitled')}, {session['message_count']} messages)"
    blocks = (f"; adapter version(s) {', '.join(map(str, chosen.versions))} learnt it and will be deleted, "
              f"and {sum(map(len, chosen.nights))} other session(s) learnt again" if chosen.versions else "")
    typer.confirm(f"Forget {what} for good{blocks}?", abort=True)


@app.command()
def rollback(ctx: typer.Context) -> None:
    """Return to the previous adapter version; its sessions will be learnt again at the next sleep."""
    from assistant.sleep import is_sleeping

    ws = workspace(ctx)
    if is_sleeping(ws.paths):
        raise SomnusError("a sleep is running; roll back after it ends")
    with _open_store(ws) as store:
        live = store.sleep.rollback()
    print(f"live adapter: version {live['version']}" if live else "live: the bare model (no adapter)")


@app.command()
def report(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Every night: its sessions, block, recall, retention, ability drop, time, outcome and why; then a plot."""
    from dataclasses import asdict

    from assistant.report import COLUMNS, NO_NIGHTS, cells, nights, plot

    with _open_store(workspace(ctx)) as store:
        rows = nights(store)
    if json_output:
        _print_json([asdict(row) for row in rows])
        return
    if not rows:
        print(NO_NIGHTS)
        return
    _print_table(list(COLUMNS), [cells(row) for row in rows])
    console = Console()
    console.print()
    console.print(Text.from_ansi(plot(rows, console.width, 16, color=True)), soft_wrap=True)


JsonPathOption = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.")]


@bench_app.command("model")
def bench_model(
    ctx: typer.Context,
    json_path: JsonPathOption = None,
    babi: Annotated[Optional[Path], typer.Option("--babi", help="Folder with the bAbI qa1 test file.")] = None,
    engine: Annotated[str, typer.Option(help="Engine that answers: torch, llamacpp or mlx.")] = "torch",
    sessions: Annotated[int, typer.Option(help="Held-out generated sessions to ask about.")] = 100,
    stories: Annotated[int, typer.Option(help="bAbI qa1 stories to read (at most).")] = 200,
    parity: Annotated[bool, typer.Option(help="Also compare greedy tokens of torch and llama.cpp.")] = True,
) -> None:
    """In-context and no-context recall of the model, on generated held-out data and on bAbI qa1."""
    from assistant.bench import model as model_bench
    from assistant.models import (
        gguf_for,
        local_model,
        require_trainable,
        system_prompt_for,
    )
    from backends.select import is_installed, open_backend

    ws = workspace(ctx)
    with _ModelProgress() as progress:
        model = local_model(ws.config.model, ws.paths, progress)
    require_trainable(model, "somnus bench model")  # the torch engine, the reference, reads model folders
    gguf = gguf_for(model, ws.paths) if (parity or engine == "llamacpp") and is_installed("llamacpp") else None
    backend = open_backend(engine, hf_dir=model.path, gguf_path=gguf)
    try:
        model_bench.run(backend, babi_dir=babi, sessions=sessions, babi_stories=stories, json_path=json_path,
                        parity=(model.path, gguf) if parity and gguf else None,
                        system=system_prompt_for(model, ws.config))
    finally:
        backend.close()


@bench_app.command("sleep")
def bench_sleep(
    ctx: typer.Context,
    json_path: JsonPathOption = None,
    babi: Annotated[Optional[Path], typer.Option("--babi", help="Folder with the bAbI qa1 test file.")] = None,
    nights: Annotated[int, typer.Option(min=1, help="Nights of generated sessions to sleep on.")] = 5,
    babi_nights: Annotated[int, typer.Option(min=1, help="Nights of bAbI stories (one story a night).")] = 10,
    sessions: Annotated[int, typer.Option(min=1, help="Generated sessions per night.")] = 10,
    facts: Annotated[int, typer.Option(min=1, help="Facts told per generated session.")] = 3,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Sleep steps per night (default: the sleep's own).")] = None,
    budget: Annotated[Optional[float], typer.Option(min=0.5, help="Minutes each night may take (default: the sleep's own).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="One night, in context, floor, retrieval, sleep and fine-tune: minutes.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the scenario.")] = 1234,
) -> None:
    """Does sleep work? Recall without context after sleep, against reading, fine-tuning and more, night after night."""
    from assistant.bench import sleep as sleep_bench
    from assistant.models import local_model, require_trainable

    ws = workspace(ctx)
    with _ModelProgress() as progress:
        model = local_model(ws.config.model, ws.paths, progress)
    require_trainable(model, "somnus bench sleep")
    bench = sleep_bench.BenchSettings(seed=seed, nights=1 if quick else nights, babi_nights=babi_nights,
                                      sessions=sessions, facts=facts, steps=steps or sleep_bench.BenchSettings.steps,
                                      budget_minutes=budget or (6.0 if quick else sleep_bench.BenchSettings.budget_minutes),
                                      quick=quick)
    sleep_bench.run(ws.config.with_overrides(model=str(model.path)), bench, babi_dir=babi, json_path=json_path)


@bench_app.command("engines")
def bench_engines(ctx: typer.Context, json_path: JsonPathOption = None) -> None:
    """Tokens per second and first-token latency of torch and llama.cpp on the same model."""
    from assistant.bench import engines
    from assistant.models import gguf_for, local_model, require_trainable
    from backends.select import is_installed

    ws = workspace(ctx)
    with _ModelProgress() as progress:
        model = local_model(ws.config.model, ws.paths, progress)
    require_trainable(model, "somnus bench engines")  # torch runs it too
    engines.run(model.path, json_path=json_path,
                gguf_path=gguf_for(model, ws.paths) if is_installed("llamacpp") else None)


@app.command()
def daemon(
    ctx: typer.Context,
    install: Annotated[bool, typer.Option("--install", help="Write a login service (systemd user unit or launchd agent) that runs it.")] = False,
) -> None:
    """Sleep while you are away, without the app: the app's idle check, headless (Ctrl-C stops it)."""
    from cli.daemon import install_service, run_daemon

    ws = workspace(ctx)
    if install:
        path, enable = install_service(ws.paths)
        print(f"wrote {path}; turn it on with: {enable}")
        return
    run_daemon(ws.paths, ws.config, say=lambda line: print(line, flush=True))


def main() -> None:
    """Console entry point: private files by default, and user errors as one line with exit 2."""
    os.umask(0o077)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
    from backends.base import BackendError

    try:
        app(prog_name="somnus")
    except (SomnusError, BackendError) as error:
        _print_error(error)
        sys.exit(2)


def _run_app(ws: Workspace, session_id: int | None = None, private: bool = False) -> None:
    """The Textual app (imported here: ``somnus --help`` and the plain commands need none of it)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise SomnusError("the app needs a terminal; for scripts and pipes use `somnus chat --plain`")
    from tui.app import SomnusApp

    SomnusApp(ws.paths, ws.config, session_id=session_id, private=private).run()


@contextmanager
def _open_store(ws: Workspace) -> Iterator[Store]:
    """The data folder's store, open for the block (imported here: sqlite-utils loads numpy)."""
    from assistant.store import open_store

    with open_store(ws.paths, ws.config) as store:
        if store.sleep.forgets("deleting"):  # a forget a kill cut short is finished before anything else
            from assistant.forget import finish_interrupted

            for line in finish_interrupted(ws.paths, store):
                print(f"somnus: {line}", file=sys.stderr)
        yield store


def _chat_store(ws: Workspace, session_id: int | None, private: bool) -> AbstractContextManager[Store | None]:
    """The store a chat needs: none for a private chat outside any session, which leaves no trace at all."""
    return nullcontext() if private and session_id is None else _open_store(ws)


@contextmanager
def _open_chat(ws: Workspace, store: Store | None, session_id: int | None, private: bool) -> Iterator[Chat]:
    """A Chat on a freshly loaded engine, which is closed again afterwards."""
    from assistant.crashes import ReplyJournal
    from assistant.engine import ChatEngine

    if store is not None and session_id is not None:
        store.session(session_id)  # fail on a wrong id before spending time loading a model
    journal = ReplyJournal(ws.paths.replying)
    for line in journal.crashed():
        print(f"somnus: {line}", file=sys.stderr)
    with _ModelProgress() as progress:
        if store is None and ws.paths.database.exists():  # a private chat still knows what sleep taught
            with _open_store(ws) as knowledge:
                engine = ChatEngine(ws.paths, ws.config, knowledge, progress)
                engine.load()
            engine.store = None
        else:
            engine = ChatEngine(ws.paths, ws.config, store, progress)
            engine.load()
    if engine.error is not None:
        raise engine.error
    try:
        with engine.using() as (backend, model):
            yield engine.bind(None, backend, model, store=store, session_id=session_id, private=private,
                              journal=journal)
    finally:
        engine.close()


class _ModelProgress:
    """A progress bar on stderr while a model is made ready (imported, exported for llama.cpp), for the
    block it wraps; none where stderr is not a terminal (scripts read one line only, on an error)."""

    def __init__(self) -> None:
        self._console = Console(stderr=True)
        self._bar = None
        self._task = None

    def __enter__(self) -> _ModelProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, stage: str, fraction: float) -> None:
        if not self._console.is_terminal:
            return
        from rich.progress import BarColumn, Progress, TextColumn

        if self._bar is None:
            self._bar = Progress(TextColumn("preparing the model: {task.description}"), BarColumn(),
                                 console=self._console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(stage, total=1.0)
        self._bar.update(self._task, description=stage, completed=fraction)


def _engines(requested: str) -> tuple[tuple[str, str] | None, str | None]:
    """The engines ``requested`` resolves to on this machine, or why it cannot (shown by ``status``)."""
    from backends.base import BackendError

    try:
        from backends.select import choose_engines

        return choose_engines(requested), None
    except (BackendError, ImportError) as error:
        return None, str(error)


def _read_stdin_message() -> str:
    """All of stdin as text; undecodable bytes become U+FFFD rather than an error or a lost message."""
    return sys.stdin.buffer.read().decode("utf-8", errors="replace").rstrip()


def _stdin_lines(prompt: str | None) -> Iterator[str]:
    lines = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    while True:
        if prompt:
            print(prompt, end="", flush=True)
        line = lines.readline()
        if not line:
            return
        yield line.rstrip("\n")


def _write_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _print_error(error: BaseException) -> None:
    print("somnus: " + " ".join(str(error).split()), file=sys.stderr)


def _print_json(value: object) -> None:
    # JSON escapes C0 controls itself; C1 ones (a lone CSI, 0x9b) would reach the terminal raw.
    text = json.dumps(value, ensure_ascii=False, indent=2)
    sys.stdout.write(_C1_CONTROLS.sub(lambda match: f"\\u{ord(match.group()):04x}", text) + "\n")


def _print_table(columns: list[str], rows: list[list[object]]) -> None:
    table = Table(*columns, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*(Text(_visible("" if cell is None else str(cell))) for cell in row))
    Console().print(table)


_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_C1_CONTROLS = re.compile(r"[\x80-\x9f]")


def _visible(text: str) -> str:
    """Stored text as the terminal should show it: control characters (an escape sequence pasted by
    mistake or on purpose could retitle, clear or reprogram the terminal) become visible escapes;
    line breaks and tabs stay."""
    return _CONTROLS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _short_time(stamp: str) -> str:
    """``2024-05-01T12:34:56.789+00:00`` as ``2024-05-01 12:34`` (UTC, as recorded)."""
    return stamp[:16].replace("T", " ")


if __name__ == "__main__":
    main()
