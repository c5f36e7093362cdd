"""Which engine chats and which trains on this machine, and opening an engine by name.

Training always runs on torch: it writes the PEFT adapters every engine can wear. Chatting uses
the fastest engine installed for the hardware. Platform facts are parameters with live defaults,
so every branch can be tested on any machine.
"""

from __future__ import annotations

import importlib
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

from backends.base import Adapter, Backend, BackendError, BlockTrainer, LoraSpec

ENGINES = ("torch", "llamacpp", "mlx")
TRAINING_ENGINE = "torch"

# The modules each optional engine needs, and the install line that provides them.
_OPTIONAL_ENGINES = {
    "llamacpp": (("llama_cpp",), "pip install 'somnus[cpu]'"),
    "mlx": (("mlx.core", "mlx_lm"), "pip install 'somnus[mlx]'"),
}


def is_installed(engine: str) -> bool:
    """Whether ``engine``'s libraries import. A real import, because a native library can be
    present yet fail to load (mlx without its CPU or Metal part); the engine uses them next anyway."""
    modules, _ = _OPTIONAL_ENGINES.get(engine, ((), ""))
    try:
        for module in modules:
            importlib.import_module(module)
    except (ImportError, OSError):
        return False
    return True


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_engines(
    requested: str = "auto",
    *,
    system: str | None = None,
    machine: str | None = None,
    has_cuda: Callable[[], bool] = cuda_available,
    installed: Callable[[str], bool] = is_installed,
) -> tuple[str, str]:
    """(chat engine, training engine): the one requested, or the best one for this machine."""
    if requested != "auto":
        _require(requested, installed)
        return requested, TRAINING_ENGINE
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    if system == "Darwin" and machine == "arm64" and installed("mlx"):
        return "mlx", TRAINING_ENGINE
    if has_cuda():
        return "torch", TRAINING_ENGINE
    if installed("llamacpp"):
        return "llamacpp", TRAINING_ENGINE
    return "torch", TRAINING_ENGINE


def open_backend(engine: str, *, hf_dir: Path | None = None, gguf_path: Path | None = None) -> Backend:
    """Load a model on ``engine``: a Hugging Face folder for torch and mlx, a GGUF file for llama.cpp."""
    _require(engine, is_installed)
    if engine == "llamacpp":
        if gguf_path is None:
            raise ValueError("the llamacpp engine needs gguf_path")
        from backends.llamacpp_backend import LlamaCppBackend

        return LlamaCppBackend(Path(gguf_path))
    if hf_dir is None:
        raise ValueError(f"the {engine} engine needs hf_dir")
    if engine == "mlx":
        from backends.mlx_backend import MlxBackend

        return MlxBackend(Path(hf_dir))
    from backends.torch_backend import TorchBackend

    return TorchBackend(Path(hf_dir))


def open_trainer(
    engine: str,
    hf_dir: Path,
    *,
    blocks: Sequence[Adapter] = (),
    spec: LoraSpec = LoraSpec(),
    lr: float = 1e-3,
    seed: int = 0,
    init_block: Path | None = None,
) -> BlockTrainer:
    """The sleep's trainer on ``engine`` ("torch" or "mlx"): ``blocks`` frozen, one new block to train.

    ``init_block`` starts the new block from a saved PEFT folder instead of a fresh B = 0 block.
    """
    if engine not in ("torch", "mlx"):
        raise BackendError(f"the {engine!r} engine cannot train: choose torch or mlx")
    _require(engine, is_installed)
    if engine == "mlx":
        from backends.mlx_trainer import MlxBlockTrainer

        return MlxBlockTrainer(Path(hf_dir), blocks, spec, lr=lr, seed=seed, init_block=init_block)
    from backends.torch_trainer import TorchBlockTrainer

    return TorchBlockTrainer(Path(hf_dir), blocks, spec, lr=lr, seed=seed, init_block=init_block)


def _require(engine: str, installed: Callable[[str], bool]) -> None:
    if engine not in ENGINES:
        raise BackendError(f"unknown engine {engine!r}: choose one of auto, {', '.join(ENGINES)}")
    if not installed(engine):
        raise BackendError(f"the {engine} engine is not installed: {_OPTIONAL_ENGINES[engine][1]}")
