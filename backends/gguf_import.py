"""A GGUF file -> a Hugging Face model folder that the torch and mlx engines load and the sleep trains.

GGUF is how people keep local models, often quantized; training needs real-valued weights in a
Hugging Face folder. transformers reads a GGUF of the families below and dequantizes it, but the
result refuses ``save_pretrained`` (it stays marked as quantized), so its weights are copied into
a plain model of the same config and saved from there, in bf16: these models' own training dtype,
half the disk of fp32, and lossless for 4- and 5-bit quantized weights up to bf16's rounding.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from backends.base import BackendError, first_line

# general.architecture -> the family's name, for the families every engine and the sleep support.
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma 3"}

Progress = Callable[[str, float], None]


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of the GGUF at ``path``, or a BackendError for a file that is not one."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (KeyError, ValueError, IndexError, OSError, UnicodeDecodeError) as error:
        raise BackendError(f"{path}: not a readable GGUF model file ({error})") from None


def import_gguf(source: Path, out_dir: Path, progress: Progress | None = None) -> Path:
    """Write the model in the GGUF ``source`` to the new folder ``out_dir`` (config, bf16 safetensors,
    tokenizer with its chat template). ``out_dir`` appears whole or not at all.
    """
    source, out_dir = Path(source), Path(out_dir)
    report = progress or (lambda stage, fraction: None)
    architecture = gguf_architecture(source)
    if architecture not in FAMILIES:
        raise BackendError(f"{source}: the {architecture!r} architecture is not supported "
                           f"(supported: {', '.join(FAMILIES.values())})")
    if out_dir.exists():
        raise BackendError(f"{out_dir} exists already")
    staging = out_dir.with_name(f".{out_dir.name}.importing-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        report("reading and dequantizing the weights", 0.1)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            with _quiet():
                tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
                loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                              dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as error:
            raise BackendError(f"{source}: transformers cannot read it ({first_line(error)})") from None
        report("copying the weights into a plain model", 0.6)
        with _quiet():
            plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
            missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [name for name in missing if not _is_tied(plain, name)]
        if missing or unexpected:
            raise BackendError(f"{source}: the weights do not fit a {FAMILIES[architecture]} model "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        del loaded
        report("saving the model folder", 0.8)
        with _quiet():
            plain.to(torch.bfloat16).save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _is_tied(model, name: str) -> bool:
    """An output matrix tied to the embeddings needs no weights of its own."""
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' own progress bars and warnings stay off the user's terminal; the caller reports."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            yield
    finally:
        logging.disable(logging.NOTSET)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
