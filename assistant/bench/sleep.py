"""``somnus bench sleep``: does sleep move what the user said into the weights? One table, one JSON.

A seeded multi-night scenario on the configured model, in a throw-away data folder with a real store:
each night's sessions are recorded, then the real ``sleep_cycle`` runs (gate included: recall is
that of the adapter the user would chat with). Every probe is asked WITHOUT context on a held-out
phrasing the user never used (the world's ``heldout_questions``; for bAbI "Where is X?", which the
told story never asks) and judged against its gold value by ``evaluate.answered``.

Methods, each from the bare model, on night 1's sessions:
``in_context`` (upper bound: the probe asked after its session), ``floor`` (no context, no sleep),
``sleep`` (the full cycle), ``finetune`` (next-token loss on the raw transcripts, same LoRA spec and
learning rate, for the wall-clock time the sleep took) and ``distill_only`` (the cycle without its
LTI term). ``cr`` = (recall - floor) / (in_context - floor), None when in_context == floor; every
method also reports its absolute ``recall`` with its 95% Wilson ``recall_interval`` over ``probes``,
and ``reading``, the in-context recall its CR divides by (a model that reads one fact in nine can
show CR 1.0 while recalling one fact in nine). More
cycle variants (issue 6's ablations) are one entry in ``CYCLE_VARIANTS``.

Each method runs in its own child process, forked from a server that has imported the libraries
and loaded no model, so ``peak_rss_mb`` is that method's peak resident memory (Python and torch
included), measured for ``sleep`` after night 1. ``seconds`` is the wall-clock time of the method's
work (for a cycle, the whole ``sleep_cycle`` call) and ``cpu_seconds`` the processor time of the
same span: on a busy machine the fairer cost (the fine-tune still gets the sleep's wall-clock time,
as the issue asks, so compare its ``cpu_seconds`` to see whether the two got the same processor).

The ``sleep`` method goes on night after night. Per data set: ``retention`` = recall after the last
night of night 1's probes whose topic no later night told again, over the same probes' recall after
night 1 (None when that was 0 or no such probe is left; bAbI reuses its four names, so it rarely
has any); ``latest_recall`` = recall of every topic's latest value after the last night (a newer
fact must win); ``in_context_drop`` = in-context accuracy on fresh generated sessions before the
first night minus after the last, in points; ``seconds_per_night`` = the median night;
``each_night`` = every night's probes asked of the live adapter right after that night, pooled, and
their CR against the bare model reading the same probes in context and alone: one night's
consolidation measured on all the nights, where night 1 alone asks too few (3 or 4 on bAbI);
``forget`` (not in a quick run: it costs a night) = after the last night, its first session
forgotten as `somnus forget` does: recall of its probes (against the bare model's floor on them)
and of the night's other probes, before and after, and the files under the data folder still
holding a sentence of it (none, if it works).
"""

from __future__ import annotations

import json
import multiprocessing
import random
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from assistant.config import Config, SomnusError, open_paths
from assistant.nano import evaluate
from assistant.nano.world import ACKS, World
from assistant.sleep.gate import kept_training
from assistant.sleep.night import SleepSettings, frame
from backends.base import BackendError, Sampling

Say = Callable[[str], None]
GREEDY = Sampling(max_tokens=48, temperature=0.0)
CYCLE_VARIANTS: dict[str, Callable[[SleepSettings], SleepSettings]] = {  # measured on night 1
    "with_lti": lambda settings: replace(settings, imitation=True),
}
DREAM_ABLATIONS: dict[str, Callable[[SleepSettings], SleepSettings]] = {  # measured on night 2
    "with_dream": lambda settings: replace(settings, dream=True),
}
ABLATION_NIGHT = 2  # block noise needs an earlier night's block to act on
NIGHT_KEYS = ("recall", "seconds", "cpu_seconds", "peak_rss_mb", "status", "kept")  # a night's record, as a method's
_MOVE = re.compile(r"^(?P<who>\w+) .*\bto the (?P<where>\w+)\.?$")


class BenchError(SomnusError):
    """A method's process failed."""


@dataclass(frozen=True)
class BenchSettings:
    seed: int = 1234
    nights: int = 5  # generated data set
    babi_nights: int = 10
    sessions: int = 10  # generated sessions per night
    facts: int = 3  # facts told per generated session
    steps: int = SleepSettings().max_steps  # sleep steps per night, at most
    budget_minutes: float = SleepSettings().budget_minutes  # each night's time budget
    in_context_sessions: int = 40  # fresh generated sessions for the in-context drop
    quick: bool = False  # one night, the four methods a user weighs (in context, floor, sleep, fine-tune)

    @property
    def fresh_sessions(self) -> int:
        """Fresh sessions read for the in-context drop (a third of them in a quick run)."""
        return self.in_context_sessions // 3 if self.quick else self.in_context_sessions

    def sleep_settings(self) -> SleepSettings:
        return SleepSettings(seed=self.seed, max_steps=self.steps, budget_minutes=self.budget_minutes)


@dataclass(frozen=True)
class Question:
    """A held-out probe: its text, the gold value, the topic a later statement overwrites, and the
    index of the night's session that told it (its context for the in-context reading)."""

    text: str
    value: str
    slot: str
    session: int


@dataclass(frozen=True)
class Night:
    sessions: list[list[dict]]
    questions: list[Question] = field(default_factory=list)


# -- the two data sets -------------------------------------------------------------------------


def generated_nights(seed: int, nights: int, sessions: int, facts: int) -> list[Night]:
    """Held-out personal facts told in sessions; no topic is told twice in one night, so each
    probe's session holds its answer; later nights may tell a topic again (a newer value)."""
    world = World(seed, heldout=True)
    result = []
    for _ in range(nights):
        told: set[str] = set()
        chats, questions = [], []
        for index in range(sessions):
            chosen = []
            for _ in range(100 * facts):
                if len(chosen) == facts:
                    break
                fact = world.fact()
                if fact.slot not in told:
                    told.add(fact.slot)
                    chosen.append(fact)
            chats.append(_telling(world.rng, [fact.statement for fact in chosen]))
            questions += [Question(world.rng.choice(f.heldout_questions), f.value, f.slot, index) for f in chosen]
        result.append(Night(chats, questions))
    return result


def _telling(rng: random.Random, statements: Sequence[str]) -> list[dict]:
    """A session that only tells: all in one message, or one statement a turn, each acknowledged."""
    turns = [" ".join(statements)] if rng.random() < 0.5 else list(statements)
    chat = []
    for turn in turns:
        chat += [{"role": "user", "content": turn}, {"role": "assistant", "content": rng.choice(ACKS)}]
    return chat


def babi_nights(path: Path, nights: int, seed: int) -> list[Night]:
    """Consecutive qa1 stories from a seeded start, one a night, told without their questions.

    Each turn holds the lines bAbI puts between two questions. The probes are "Where is X?" for
    everyone the story moves, gold = X's last location in it; the names recur from night to night,
    so a night's story overwrites where the earlier ones left them.
    """
    stories = [story for story in evaluate.read_babi(path) if story]
    if not stories:
        raise SomnusError(f"{path}: no bAbI story in it")
    start = random.Random(seed).randrange(len(stories))
    result = []
    for night in range(nights):
        chat, where = [], {}
        for item in stories[(start + night) % len(stories)]:
            if item.lines:
                chat += [{"role": "user", "content": "\n".join(item.lines)}, {"role": "assistant", "content": ACKS[1]}]
            for line in item.lines:
                if move := _MOVE.match(line):
                    where[move["who"]] = move["where"]
        result.append(Night([chat], [Question(f"Where is {who}?", room, f"{who}.location", 0)
                                     for who, room in where.items()]))
    return result


# -- measures (pure) ---------------------------------------------------------------------------


def share(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def consolidation_ratio(recall: float | None, floor: float | None, in_context: float | None) -> float | None:
    """(recall - floor) / (in_context - floor): 1 when sleep recalls as well as reading does."""
    if recall is None or floor is None or in_context is None or in_context == floor:
        return None
    return (recall - floor) / (in_context - floor)


def wilson(share: float | None, probes: int, z: float = 1.96) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a recall ``share`` over ``probes`` questions: honest at the
    bench's few probes and at 0% or 100%, where the normal approximation's interval collapses."""
    if share is None or not probes:
        return None
    centre = (share + z * z / (2 * probes)) / (1 + z * z / probes)
    half = z * ((share * (1 - share) / probes + z * z / (4 * probes * probes)) ** 0.5) / (1 + z * z / probes)
    return max(0.0, centre - half), min(1.0, centre + half)


def each_night(recalls: Sequence[float | None], in_context: Sequence[float | None], floor: Sequence[float | None],
               probes: Sequence[int]) -> dict:
    """Every night's probes asked right after that night, pooled over the nights (each weighted by
    its probes), with the bare model's reading of the same probes in context and alone: "after one
    night" measured on every night, not on the first alone (a bAbI night asks 3 or 4 probes)."""
    def pool(values: Sequence[float | None]) -> float | None:
        weighted = [(value, count) for value, count in zip(values, probes) if value is not None and count]
        return sum(v * c for v, c in weighted) / sum(c for _, c in weighted) if weighted else None

    recall, ceiling, bottom = pool(recalls), pool(in_context), pool(floor)
    return {"recall": recall, "recall_interval": wilson(recall, sum(probes)), "in_context": ceiling,
            "floor": bottom, "cr": consolidation_ratio(recall, bottom, ceiling), "probes": sum(probes)}


def unsuperseded(nights: Sequence[Night]) -> list[int]:
    """Indexes of night 1's questions whose topic no later night tells again."""
    later = {q.slot for night in nights[1:] for q in night.questions}
    return [i for i, q in enumerate(nights[0].questions) if q.slot not in later]


def latest_questions(nights: Sequence[Night]) -> list[Question]:
    """Each topic's question from the last night that told it."""
    latest: dict[str, Question] = {}
    for night in nights:
        latest.update({q.slot: q for q in night.questions})
    return list(latest.values())


def retention(after_first: Sequence[bool], after_last: Sequence[bool], kept: Sequence[int]) -> float | None:
    """Recall of the ``kept`` probes after the last night over theirs after the first (None from 0)."""
    first = share([after_first[i] for i in kept])
    last = share([after_last[i] for i in kept])
    return None if not first else last / first


# -- the methods, each run in its own process --------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


class Span:
    """Wall-clock and processor time since creation, for a method's ``seconds`` and ``cpu_seconds``."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        return time.perf_counter() - self.wall

    def record(self) -> dict:
        return {"seconds": round(self.seconds(), 1), "cpu_seconds": round(time.process_time() - self.cpu, 1)}


def _ask(trainer, chats: Sequence[list[dict]], values: Sequence[str], *, new_block: bool = False) -> list[bool]:
    """Greedy answers to ``chats``, each judged by whether it states its gold value (the trainer
    decodes them in batches of its own size)."""
    prompts = [trainer.render_chat(chat) for chat in chats]
    answers = trainer.generate(prompts, GREEDY, new_block=new_block)
    return [evaluate.answered(answer, value) for answer, value in zip(answers, values)]


def probe(trainer, questions: Sequence[Question], *, new_block: bool = False) -> list[bool]:
    """The questions alone, in a fresh chat: what the weights know."""
    return _ask(trainer, [[{"role": "user", "content": q.text}] for q in questions], [q.value for q in questions],
                new_block=new_block)


def fresh_in_context(trainer, sessions: int, seed: int) -> float | None:
    """In-context accuracy on fresh generated held-out sessions, each probe after its context
    (those whose context leaves no room for an answer are left out, as the gate does)."""
    chats, values = [], []
    for session in evaluate.heldout_sessions(seed, sessions):
        for item in session.probes:
            if len(trainer.encode(trainer.render_chat(session.chat()[: item.at]))) + GREEDY.max_tokens <= trainer.context_length:
                chats.append(session.chat()[: item.at])
                values.append(item.value)
    return share(_ask(trainer, chats, values))


def _open(config: Config, adapters=(), settings: SleepSettings = SleepSettings()):
    """The training engine's trainer (also the fastest batched reader) wearing ``adapters``."""
    from assistant.models import hidden_size, system_prompt_for
    from backends.select import choose_engines, open_trainer

    engine = choose_engines(config.backend)[1]
    trainer = open_trainer(engine, Path(config.model), blocks=adapters, spec=settings.spec,
                           lr=settings.rate(hidden_size(Path(config.model))),
                           seed=settings.seed)
    frame(trainer, system_prompt_for(Path(config.model), config))  # every method reads as the chat does
    return closing(trainer)


def _read(trainer, night: Night, *, in_context: bool) -> list[bool]:
    """A night's probes, each after its session (in_context) or alone (the floor)."""
    if not in_context:
        return probe(trainer, night.questions)
    return _ask(trainer, [night.sessions[q.session] + [{"role": "user", "content": q.text}] for q in night.questions],
                [q.value for q in night.questions])


def reading(config: Config, night: Night, *, in_context: bool, say: Say) -> dict:
    """The bare model on night 1's probes, each after its session (in_context) or alone (floor)."""
    span = Span()
    say("reading with the session in context" if in_context else "the bare model without context")
    with _open(config) as trainer:
        hits = _read(trainer, night, in_context=in_context)
    return {"recall": share(hits), **span.record()}


def nightly_readings(config: Config, nights: Sequence[Night], say: Say) -> dict:
    """The bare model on every night's probes, in context and alone: each night's ceiling and floor."""
    say("reading every night's probes, in context and alone")
    with _open(config) as trainer:
        return {"in_context": [share(_read(trainer, night, in_context=True)) for night in nights],
                "floor": [share(_read(trainer, night, in_context=False)) for night in nights]}


def retrieval(config: Config, night: Night, say: Say) -> dict:
    """The bare model on night 1's probes, each after the session full-text search finds for it
    (any of its words, best first): what a user could pick instead of sleep, a search beside the chat."""
    from assistant.store import open_store

    span = Span()
    say("reading the session full-text search finds for each probe")
    with tempfile.TemporaryDirectory(prefix="somnus-bench-") as folder:
        paths = open_paths(Path(folder) / "home")
        with open_store(paths, config) as store:
            _record(store, night, config.model)
            found = [_found(store, question.text) for question in night.questions]
            chats = [(store_chat(store, sid) if sid is not None else []) + [{"role": "user", "content": q.text}]
                     for sid, q in zip(found, night.questions)]
    with _open(config) as trainer:
        hits = _ask(trainer, chats, [q.value for q in night.questions])
    return {"recall": share(hits), "found": share([s is not None and night.questions[i].session + 1 == s
                                                   for i, s in enumerate(found)]), **span.record()}


def _found(store, question: str) -> int | None:
    found = store.search(question, limit=1, any_word=True)
    return found[0]["session_id"] if found else None


def store_chat(store, session_id: int) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in store.messages(session_id)]


def bare_in_context(config: Config, fresh: tuple[int, int], say: Say) -> dict:
    """The bare model reading ``fresh`` = (sessions, seed) generated sessions: the drop's "before"."""
    say("reading fresh sessions before any sleep")
    with _open(config) as trainer:
        return {"in_context": fresh_in_context(trainer, *fresh)}


def sleeping(config: Config, nights: Sequence[Night], settings: SleepSettings, fresh: tuple[int, int] | None,
             say: Say, forgetting: bool = False) -> dict:
    """Record and sleep night after night in a temporary data folder, asking the live adapter.

    After the last night it also answers night 1's probes and every topic's latest value, and
    reads the ``fresh`` sessions as ``bare_in_context`` did (when given); ``forgetting``: then it
    forgets the last night's first session (``forgotten``).
    """
    from assistant import adapters
    from assistant.sleep.cycle import sleep_cycle
    from assistant.store import open_store

    result: dict = {"per_night": [], "in_context_after": None}
    with tempfile.TemporaryDirectory(prefix="somnus-bench-") as folder:
        paths = open_paths(Path(folder) / "home")
        with open_store(paths, config) as store:
            for number, night in enumerate(nights, 1):
                def progress(stage: str, _: float, message: str, number=number) -> None:
                    say(f"night {number}/{len(nights)}: {stage}, {message}")

                recorded = _record(store, night, config.model)
                span = Span()
                report = sleep_cycle(paths, config, store, settings=settings, progress=progress)
                record = {"night": number, "status": report.status, "reason": report.reason, **span.record(),
                          "kept": kept_training(report.training), "training": report.training,
                          "chosen": report.dreaming.get("chosen"), "dreaming": report.dreaming}
                if report.status == "rejected":  # what the night's adapter knew, though the gate kept it out
                    stack = adapters.load_stack(adapters.manifest_path(paths.home, report.adapter))
                    with _open(config, stack.adapters(), settings) as trainer:
                        record["candidate_recall"] = share(probe(trainer, night.questions))
                with _open(config, adapters.live_stack(store).adapters(), settings) as trainer:
                    hits = probe(trainer, night.questions)
                    record.update(recall=share(hits), peak_rss_mb=peak_rss_mb())
                    result.setdefault("night1_after_first", hits)
                    if number == len(nights):
                        result["night1_after_last"] = probe(trainer, nights[0].questions)
                        result["latest_recall"] = share(probe(trainer, latest_questions(nights)))
                        result["in_context_after"] = fresh_in_context(trainer, *fresh) if fresh else None
                result["per_night"].append(record)
            if forgetting:
                result["forgotten"] = forgotten(config, paths, store, nights[-1], recorded, hits, settings, say)
    return result


def forgotten(config: Config, paths, store, night: Night, recorded: Sequence[int], hits: Sequence[bool],
              settings: SleepSettings, say: Say) -> dict:
    """Forget ``night``'s first session as `somnus forget` does (its blocks dropped, the other sessions
    relearnt) and ask the night's probes again: the forgotten session's should fall to the floor
    (the bare model asked the same probes), the others' keep what they had (``hits``, before)."""
    from assistant import adapters, forget
    from assistant.sleep.cycle import sleep_cycle

    mine = [q.session == 0 for q in night.questions]
    split = lambda answers: ([a for a, m in zip(answers, mine) if m], [a for a, m in zip(answers, mine) if not m])
    told = [m["content"] for m in night.sessions[0] if m["role"] == "user"]
    span = Span()
    done = forget.forget(paths, store, recorded[0])
    for number, sessions in enumerate(done.nights, 1):
        sleep_cycle(paths, config, store, settings=settings, sessions=sessions, progress=lambda stage, _, message:
                    say(f"forget: relearning night {number}/{len(done.nights)}: {stage}, {message}"))
    forget.finished(store, done)
    spent = span.record()
    with _open(config, adapters.live_stack(store).adapters(), settings) as trainer:
        gone, kept = split(probe(trainer, night.questions))
    with _open(config, (), settings) as trainer:
        floor = share(probe(trainer, [q for q, m in zip(night.questions, mine) if m]))
    before_gone, before_kept = split(hits)
    holding = [str(path.relative_to(paths.home)) for path in paths.home.rglob("*") if path.is_file()
               and any(text.encode() in path.read_bytes() for text in told)]
    return {"recall": share(gone), "recall_before": share(before_gone), "floor": floor, "probes": len(gone),
            "kept_recall": share(kept), "kept_before": share(before_kept), "kept_probes": len(kept),
            "relearnt_nights": len(done.nights), "files_holding_it": holding, **spent}


def _record(store, night: Night, model: str) -> list[int]:
    """The night's sessions, stored; their ids."""
    ids = []
    for chat in night.sessions:
        ids.append(session := store.create_session(model=model))
        for message in chat:
            store.add_message(session, message["role"], message["content"])
    return ids


def finetuning(config: Config, night: Night, budget: float, settings: SleepSettings, say: Say) -> dict:
    """Next-token loss on night 1's raw transcripts, the sleep's LoRA spec, for ``budget`` seconds
    counted, like the sleep's, from before the model loads."""
    from assistant.sleep import losses

    span = Span()
    with _open(config, (), settings) as trainer:
        ops = trainer.ops
        rows = []
        for chat in night.sessions:
            ids = trainer.encode(trainer.render_chat(chat, add_generation_prompt=False))
            rows += [ids[i : i + trainer.context_length] for i in range(0, len(ids), trainer.context_length)]
        rows = [row for row in rows if len(row) > 1]

        def next_token_loss(logits, targets, mask):
            logprobs = losses.completion_logprobs(ops, logits, targets)
            return -ops.sum(logprobs * mask) / ops.clip(ops.sum(mask), low=1.0)

        rng, steps = random.Random(settings.seed), 0
        while steps == 0 or span.seconds() < budget:
            batch = rng.sample(rows, min(settings.batch_size, len(rows)))
            trainer.train_step([row[:1] for row in batch], [row[1:] for row in batch], next_token_loss)
            steps += 1
            say(f"fine-tune step {steps} ({span.seconds():.0f} of {budget:.0f} s)")
        spent = span.record()
        hits = probe(trainer, night.questions, new_block=True)
    return {"recall": share(hits), **spent, "steps": steps}


def _child(sender, function, args, kwargs) -> None:
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()  # the parent shows one status line: loading bars and library
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notes would break it
        result = function(*args, **kwargs, say=lambda message: sender.send(("progress", message)))
        sender.send(("result", {"peak_rss_mb": peak_rss_mb(), **result}))
    except BaseException as error:  # the parent re-raises it: a child must never die silently
        expected = error if isinstance(error, (SomnusError, BackendError)) else None
        sender.send(("error", (expected, traceback.format_exc())))


def isolated(function: Callable[..., dict], *args, say: Say, **kwargs) -> dict:
    """``function(*args, **kwargs, say=...)`` in a fresh child process, its peak RSS added.

    The child forks from a server that has imported the libraries and loaded no model, so each
    method starts from the same memory and costs no import time. A script that calls this needs
    the ``if __name__ == "__main__":`` guard, as with any multiprocessing start method but fork.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", __name__])
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, function, args, kwargs), daemon=True)
    process.start()
    sender.close()
    result = None
    try:
        while True:
            try:
                kind, payload = receiver.recv()
            except EOFError:
                break
            if kind == "progress":
                say(payload)
            elif kind == "result":
                result = payload
            else:
                error, trace = payload
                raise error or BenchError(f"{function.__name__} failed in its process:\n{trace}")
    finally:
        process.join()
    if result is None:
        raise BenchError(f"{function.__name__}: its process exited with status {process.exitcode}")
    return result


# -- one data set, the whole run ---------------------------------------------------------------


def measure(config: Config, nights: Sequence[Night], bench: BenchSettings, say: Say) -> dict:
    """Every method on night 1, and the sleep continued over all ``nights``."""
    settings = bench.sleep_settings()
    methods = {
        "in_context": isolated(reading, config, nights[0], in_context=True, say=say),
        "floor": isolated(reading, config, nights[0], in_context=False, say=say),
    }
    methods["retrieval"] = isolated(retrieval, config, nights[0], say=say)
    fresh = (bench.fresh_sessions, bench.seed + 1)
    before = isolated(bare_in_context, config, fresh, say=say)["in_context"]
    bare = isolated(nightly_readings, config, nights, say=say)
    slept = isolated(sleeping, config, nights, settings, fresh, say=say, forgetting=not bench.quick)
    first = slept["per_night"][0]
    methods["sleep"] = {key: first[key] for key in NIGHT_KEYS}
    methods["finetune"] = isolated(finetuning, config, nights[0], first["seconds"], settings, say=say)
    for name, variant in ({} if bench.quick else CYCLE_VARIANTS).items():
        night = isolated(sleeping, config, nights[:1], variant(settings), None, say=say)["per_night"][0]
        methods[name] = {key: night[key] for key in NIGHT_KEYS}
    floor, ceiling = methods["floor"]["recall"], methods["in_context"]["recall"]
    for method in methods.values():
        method["cr"] = consolidation_ratio(method["recall"], floor, ceiling)
        method["reading"] = ceiling  # what CR divides by: the same probes read with their session
        method["probes"] = len(nights[0].questions)
        method["recall_interval"] = wilson(method["recall"], method["probes"])
    ablations = ablate(config, nights, settings, slept, bare, say) if len(nights) >= ABLATION_NIGHT and not bench.quick else {}
    methods.update({name: row for name, row in ablations.items() if name != "sleep"})
    after = slept["in_context_after"]
    return {
        "methods": methods,
        "retention": retention(slept["night1_after_first"], slept["night1_after_last"], unsuperseded(nights)),
        "in_context_drop": None if before is None or after is None else round(100 * (before - after), 2),
        "in_context_before": before,
        "in_context_after": after,
        "latest_recall": slept["latest_recall"],
        "supersession": slept["latest_recall"] if len(nights) > 1 else None,
        "each_night": {**each_night([n["recall"] for n in slept["per_night"]], bare["in_context"], bare["floor"],
                                    [len(night.questions) for night in nights]),
                       "promoted": sum(n["status"] == "promoted" for n in slept["per_night"])},
        "nights": len(nights),
        "seconds_per_night": round(statistics.median(n["seconds"] for n in slept["per_night"]), 1),
        "per_night": slept["per_night"],
        "forget": slept.get("forgotten"),
        "ablations": ablations,
        "skipped": None,
    }


def ablate(config: Config, nights: Sequence[Night], settings: SleepSettings, slept: dict, bare: dict,
           say: Say) -> dict:
    """The dreaming ablations, each slept from scratch over the first ``ABLATION_NIGHT`` nights with
    the same seeds as the full sleep, compared on that night's paraphrased probes (CR against that
    night's own in-context and floor readings in ``bare``). The full sleep's row is its run's same night."""
    night = nights[ABLATION_NIGHT - 1]
    floor, ceiling = bare["floor"][ABLATION_NIGHT - 1], bare["in_context"][ABLATION_NIGHT - 1]
    rows = {"sleep": slept["per_night"][ABLATION_NIGHT - 1]}
    for name, variant in DREAM_ABLATIONS.items():
        rows[name] = isolated(sleeping, config, nights[:ABLATION_NIGHT], variant(settings), None,
                              say=say)["per_night"][-1]
    result = {}
    for name, row in rows.items():
        result[name] = {key: row[key] for key in NIGHT_KEYS}
        result[name].update(cr=consolidation_ratio(row["recall"], floor, ceiling), reading=ceiling,
                            night=ABLATION_NIGHT, probes=len(night.questions), chosen=row.get("chosen"),
                            recall_interval=wilson(row["recall"], len(night.questions)))
    return result


def skipped(reason: str) -> dict:
    return {"methods": {}, "ablations": {}, "forget": None, "retention": None, "in_context_drop": None, "latest_recall": None,
            "each_night": None, "nights": 0,
            "seconds_per_night": None, "per_night": [], "skipped": reason}


def run(
    config: Config,
    bench: BenchSettings = BenchSettings(),
    *,
    babi_dir: Path | None = None,
    json_path: Path | None = None,
    console: Console | None = None,
) -> dict:
    """The whole benchmark on ``config.model`` (a Hugging Face model folder) and its training engine."""
    console = console or Console(stderr=True)
    started = time.time()
    babi_file = evaluate.find_babi(babi_dir)
    result: dict = {"model": config.model, "seed": bench.seed, "settings": asdict(bench),
                    "babi_file": str(babi_file.resolve()) if babi_file else None}
    with console.status("sleep benchmark") as status:
        def say(name: str) -> Say:
            return lambda message: status.update(f"{name}: {message}")

        nights = generated_nights(bench.seed, bench.nights, bench.sessions, bench.facts)
        result["generated"] = measure(config, nights, bench, say("generated"))
        if bench.quick:
            result["babi"] = skipped("--quick: generated sessions only")
        elif babi_file:
            result["babi"] = measure(config, babi_nights(babi_file, bench.babi_nights, bench.seed), bench, say("bAbI"))
        else:
            where = babi_dir or "../shared/data/babi"
            result["babi"] = skipped(f"no bAbI file {evaluate.BABI_FILE} in {where} (use --babi DIR)")
    result["seconds"] = round(time.time() - started, 1)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(results_table(result))
    return result


def results_table(result: dict) -> Table:
    """Methods (recall, CR, seconds, peak RSS) then the night-after-night measures, per data set."""
    table = Table(title=f"Somnus sleep benchmark ({Path(result['model']).name}, seed {result['seed']})")
    for column in ("data set", "method / measure", "recall", "95% interval", "CR", "reading", "seconds", "CPU s",
                   "peak RSS MB"):
        table.add_column(column, justify="left" if column in ("data set", "method / measure") else "right")
    skipped = []
    for name in ("generated", "babi"):
        data = result[name]
        if data["skipped"]:
            skipped.append(f"{name}: {data['skipped']}")
            continue
        ablations = data.get("ablations") or {}
        # Night 1's methods, then the ablations' night (whose ``sleep`` is the full sleep's same night).
        rows = [(m, r) for m, r in data["methods"].items() if m == "sleep" or m not in ablations]
        rows += list(ablations.items())
        for method, row in rows:
            done = [row[key] for key in ("status", "kept") if row.get(key)] + (
                [f"{row['steps']} steps"] if row.get("steps") else [])
            note = f" ({', '.join(done)})" if done else ""
            note += f", night {row['night']}" if "night" in row else ""
            table.add_row(name, method + note, _percent(row["recall"]), _interval(row.get("recall_interval")),
                          _number(row["cr"]), _percent(row.get("reading")), f"{row['seconds']:.1f}",
                          f"{row['cpu_seconds']:.1f}", f"{row['peak_rss_mb']:.0f}")
        nights, drop, each = data["nights"], data["in_context_drop"], data["each_night"]
        table.add_row(name, f"every night's probes after that night ({each['probes']}, "
                            f"{each['promoted']}/{nights} promoted)", _percent(each["recall"]),
                      _interval(each.get("recall_interval")), _number(each["cr"]), _percent(each["in_context"]))
        table.add_row(name, "  the same probes read in context", _percent(each["in_context"]))
        table.add_row(name, "  the same probes asked alone before sleep", _percent(each["floor"]))
        table.add_row(name, f"retention of night 1 after {nights} nights", _percent(data["retention"]))
        table.add_row(name, f"latest values after {nights} nights", _percent(data["latest_recall"]))
        table.add_row(name, "in-context drop, points", "n/a" if drop is None else f"{drop:.1f}")
        if forgot := data.get("forget"):
            table.add_row(name, f"forget one session of night {nights}: its facts ({forgot['probes']}; before "
                                f"{_percent(forgot['recall_before'])}, floor {_percent(forgot['floor'])})",
                          _percent(forgot["recall"]), "", "", "", f"{forgot['seconds']:.1f}", f"{forgot['cpu_seconds']:.1f}")
            table.add_row(name, f"  the night's other sessions ({forgot['kept_probes']}; before "
                                f"{_percent(forgot['kept_before'])}), files still holding it: "
                                f"{len(forgot['files_holding_it'])}", _percent(forgot["kept_recall"]))
        table.add_row(name, "median night", "", "", "", "", f"{data['seconds_per_night']:.1f}", end_section=True)
    table.caption = "; ".join(skipped + [f"total {result['seconds']:.0f} s"])
    return table


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _interval(bounds: Sequence[float] | None) -> str:
    return "n/a" if bounds is None else f"{bounds[0]:.0%}-{bounds[1]:.0%}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
