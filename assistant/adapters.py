"""The live adapter is a stack of LoRA blocks: one block per night, each a PEFT folder.

Blocks are immutable once written; an adapter *version* is a manifest naming its blocks in order, so
version N+1 shares every block of version N and adds one. The same stack runs on every engine,
because each engine attaches several PEFT adapters at once and sums their outputs (llama.cpp and
mlx convert the same folders). A new block starts with B = 0, so the grown model computes exactly
what the old one did, and only the new block trains: older nights are slow memories, frozen.

Layout in the data folder::

    adapters/blocks/<block id>/   adapter_config.json, adapter_model.safetensors, block.json
    adapters/v0003.json           {"version": 3, "parent": 2, "blocks": [...]}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from assistant.config import ensure_private_dir
from assistant.models import Model
from backends.base import Adapter


@dataclass(frozen=True)
class Block:
    """One night's LoRA block and what it consolidated."""

    id: str
    path: Path
    sessions: tuple[int, ...] = ()
    sleep_run: int | None = None

    def record(self) -> dict:
        return {"id": self.id, "path": str(self.path), "sessions": list(self.sessions), "sleep_run": self.sleep_run}


@dataclass(frozen=True)
class Stack:
    """An adapter version: its blocks, oldest first."""

    version: int
    blocks: tuple[Block, ...] = ()
    parent: int | None = None
    extra: dict = field(default_factory=dict)

    def adapters(self, scales: Sequence[float] | None = None) -> list[Adapter]:
        """The blocks as engine adapters; ``scales`` rescale or drop (0) blocks, e.g. to dream."""
        scales = scales if scales is not None else [1.0] * len(self.blocks)
        return [Adapter(block.path, scale) for block, scale in zip(self.blocks, scales, strict=True) if scale]

    def grown(self, block: Block, version: int) -> Stack:
        """This stack and ``block``: version ``version``, whose parent is this one (None: the bare model)."""
        return Stack(version, self.blocks + (block,), parent=self.version or None)


def adapters_dir(home: Path) -> Path:
    return ensure_private_dir(home / "adapters")


def block_dir(home: Path, block_id: str) -> Path:
    return ensure_private_dir(adapters_dir(home) / "blocks") / block_id


def manifest_path(home: Path, version: int) -> Path:
    return adapters_dir(home) / f"v{version:04d}.json"


def save_stack(home: Path, stack: Stack) -> Path:
    """Write the version's manifest atomically (temp file, fsync, rename): complete or absent."""
    path = manifest_path(home, stack.version)
    payload = {"version": stack.version, "parent": stack.parent, "blocks": [b.record() for b in stack.blocks],
               **stack.extra}
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-")
    with os.fdopen(handle, "w") as out:
        json.dump(payload, out, indent=2)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)
    return path


def load_stack(path: Path) -> Stack:
    data = json.loads(Path(path).read_text())
    blocks = tuple(
        Block(b["id"], Path(b["path"]), tuple(b.get("sessions", ())), b.get("sleep_run")) for b in data["blocks"]
    )
    extra = {k: v for k, v in data.items() if k not in {"version", "parent", "blocks"}}
    return Stack(data["version"], blocks, data.get("parent"), extra)


def orphan_blocks(home: Path) -> list[Path]:
    """Block folders no manifest names: what a save killed half-way, or before its manifest was
    written, left behind. Only a caller holding the sleep lock may delete them (a night writes its
    block before its manifest)."""
    folder = adapters_dir(home) / "blocks"
    if not folder.is_dir():
        return []
    named = set()
    for manifest in adapters_dir(home).glob("v*.json"):
        try:
            named |= {Path(block.path).name for block in load_stack(manifest).blocks}
        except (OSError, ValueError, KeyError, TypeError):
            return []  # a manifest we cannot read may name any of them: delete none
    return sorted(path for path in folder.iterdir() if path.name not in named)


def live_stack(store) -> Stack:
    """The stack the model wears now (version 0, no blocks, before the first promotion)."""
    live = store.sleep.live_adapter()
    return load_stack(Path(live["path"])) if live else empty_stack()


def live_adapters(store, model: Model) -> list[Adapter]:
    """What the chat engine attaches: the live stack, if it was grown on this very model."""
    stack = live_stack(store)
    return stack.adapters() if stack.blocks and grown_on(stack, model) else []


def grown_on(stack: Stack, model: Model) -> bool:
    """Whether the stack's blocks were trained on these very weights (a block means nothing to others)."""
    return stack.extra.get("model") == model.ref and stack.extra.get("weights") == model.weights


def empty_stack() -> Stack:
    """Version 0: the bare model, before any sleep."""
    return Stack(0)


def scaled(state, scale: float):
    """A new block's state (``BlockTrainer.new_block_state``: its LoRA factors, as a list or a dict
    of pairs of any engine's arrays) with its change to the weights times ``scale``: each factor
    times sqrt(scale), so B @ A scales by ``scale``. Baked into the factors, the scale needs no
    support from the engines that later wear the block."""
    if scale < 0:
        raise ValueError(f"a block's scale cannot be negative, got {scale}")
    root = math.sqrt(scale)

    def times(value):
        if isinstance(value, dict):
            return {key: times(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(times(item) for item in value)
        return value * root

    return times(state)
