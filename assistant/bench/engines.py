"""``somnus bench engines``: how fast torch and llama.cpp serve the same model on this machine.

Both engines get the same prompts and greedy decoding, one after the other (never competing for the
cores), each after one warm-up run. Per engine: the median, over the prompts, of the first-token
latency (prompt processing included, which is what a user waits for) and of the end-to-end
generation rate. Tokens are counted by re-tokenizing the reply (the Protocol yields text), which
gives both engines the same count since their greedy replies are identical (tests/test_parity.py);
the count is capped at ``max_tokens`` because invalid UTF-8 from an untrained model re-tokenizes
into more tokens than were generated.

JSON keys: ``model``, ``max_tokens``, ``prompts`` (how many), ``cpu_count``, ``engines`` = {name:
{``tokens_per_second``, ``first_token_seconds``, ``tokens``} or {``error``}}, and ``speedup``
(llama.cpp tokens/s over torch tokens/s, None unless both ran).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from backends.base import Backend, BackendError, Sampling

DEFAULT_PROMPTS = (
    "Hello! How can I help you today?",
    "My sister is called Alice and she lives in Porto. Where does Alice live?",
    "John travelled to the hallway. Mary journeyed to the bathroom. Where is John?",
    "Thanks a lot, that was helpful. What can you do?",
)
ENGINES = ("torch", "llamacpp")


def run(
    hf_dir: Path,
    json_path: Path | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_tokens: int = 64,
    *,
    gguf_path: Path | None = None,
    console: Console | None = None,
) -> dict:
    """Time torch and llama.cpp on ``hf_dir`` (llama.cpp on ``gguf_path``, else a temporary export)."""
    from backends.gguf_export import export_model
    from backends.select import open_backend

    hf_dir = Path(hf_dir)
    console = console or Console(stderr=True)
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0)
    result: dict = {
        "model": str(hf_dir),
        "max_tokens": max_tokens,
        "prompts": len(prompts),
        "cpu_count": os.cpu_count(),
        "engines": {},
    }
    with tempfile.TemporaryDirectory(prefix="somnus-bench-") as scratch:
        for engine in ENGINES:
            try:
                if engine == "llamacpp":
                    gguf_path = gguf_path or export_model(hf_dir, Path(scratch) / "model.gguf")
                    backend = open_backend(engine, gguf_path=gguf_path)
                else:
                    backend = open_backend(engine, hf_dir=hf_dir)
            except BackendError as error:
                result["engines"][engine] = {"error": str(error)}
                continue
            try:
                result["engines"][engine] = _measure(backend, prompts, sampling)
            finally:
                backend.close()
    rates = [result["engines"][name].get("tokens_per_second") for name in ("llamacpp", "torch")]
    result["speedup"] = rates[0] / rates[1] if all(rates) else None
    _print(result, console)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _measure(backend: Backend, prompts: Sequence[str], sampling: Sampling) -> dict:
    """Median first-token latency and generation rate of ``backend`` over ``prompts``."""
    rendered = [backend.render_chat([{"role": "user", "content": prompt}]) for prompt in prompts]
    "".join(backend.stream(rendered[0], sampling))  # warm-up: lazy initialisation, caches, allocator
    latencies, rates, counts = [], [], []
    for prompt in rendered:
        started = time.perf_counter()
        first_piece_at = None
        pieces = []
        for piece in backend.stream(prompt, sampling):
            first_piece_at = first_piece_at or time.perf_counter()
            pieces.append(piece)
        elapsed = time.perf_counter() - started
        tokens = min(backend.count_tokens("".join(pieces)), sampling.max_tokens)
        counts.append(tokens)
        if tokens:  # a reply that ends at once says nothing about speed
            latencies.append(first_piece_at - started)
            rates.append(tokens / elapsed)
    return {
        "tokens_per_second": statistics.median(rates) if rates else None,
        "first_token_seconds": statistics.median(latencies) if latencies else None,
        "tokens": counts,
    }


def _print(result: dict, console: Console) -> None:
    table = Table(title=f"Engine speed, greedy, up to {result['max_tokens']} tokens ({result['model']})")
    table.add_column("engine")
    table.add_column("tokens/s", justify="right")
    table.add_column("first token", justify="right")
    table.add_column("tokens per reply", justify="right")
    for name, measured in result["engines"].items():
        if "error" in measured:
            table.add_row(name, "n/a", "n/a", measured["error"])
            continue
        rate, latency = measured["tokens_per_second"], measured["first_token_seconds"]
        table.add_row(
            name,
            "n/a" if rate is None else f"{rate:.1f}",
            "n/a" if latency is None else f"{latency * 1000:.0f} ms",
            " ".join(map(str, measured["tokens"])),
        )
    if result["speedup"]:
        table.caption = f"llama.cpp is {result['speedup']:.2f}x torch in tokens/s"
    console.print(table)
