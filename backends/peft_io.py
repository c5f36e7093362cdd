"""Reading model and PEFT LoRA folders from disk, with one-line errors that name the bad file.

Every engine loads the same two kinds of folder (a Hugging Face model, PEFT adapters), so the
checks live here once: a truncated download or an adapter made for another model must stop with
a sentence the user can act on, not a traceback from deep inside a library. The LoRA reader also
gives engines that cannot use PEFT itself (mlx, GGUF export) the adapter as plain matrices.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backends.base import BackendError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# PEFT options that change the maths beyond "output += scale * B @ A @ x"; engines other than
# PEFT itself cannot reproduce them, so every engine refuses them alike.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "alpha_pattern": "per-module lora_alpha",
    "modules_to_save": "fully trained modules",
    "lora_bias": "LoRA biases",
    "fan_in_fan_out": "fan-in-fan-out weights",
}
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class LoraBlock:
    """One adapted linear layer: ``output += scale * up @ (down @ input)``."""

    module: str  # the layer's name in the Hugging Face model, e.g. "model.layers.0.self_attn.q_proj"
    down: np.ndarray  # PEFT's lora_A, shape (rank, in_features), float32
    up: np.ndarray  # PEFT's lora_B, shape (out_features, rank), float32
    scale: float  # lora_alpha / rank (lora_alpha / sqrt(rank) with rsLoRA)


def check_safetensors(path: Path) -> None:
    """Raise BackendError unless ``path`` is a complete safetensors file (reads the header only)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise BackendError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as error:
        raise BackendError(f"{path}: corrupt or incomplete weights ({error})") from error


def read_model_config(hf_dir: Path) -> dict:
    """The ``config.json`` of a model folder, after checking its safetensors weights are complete."""
    if not hf_dir.is_dir():
        raise BackendError(f"{hf_dir}: model folder not found")
    config = _read_json(hf_dir / "config.json")
    weight_files = sorted(hf_dir.glob("*.safetensors"))
    if not weight_files:
        raise BackendError(f"{hf_dir}: no .safetensors weights in the model folder")
    for path in weight_files:
        check_safetensors(path)
    return config


def mlx_model_settings(config: dict, hf_dir: Path) -> dict:
    """mlx-lm's names for settings transformers 5 writes in its own shape.

    transformers 5 nests the rotary settings in ``rope_parameters`` (per layer type for Gemma 3)
    and lists Gemma 3's layer kinds in ``layer_types``, where mlx-lm reads top-level ``rope_theta``,
    ``rope_scaling``, ``rope_local_base_freq`` and ``sliding_window_pattern``. Without this mlx-lm
    would silently use its defaults and drift from the torch engine.
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    settings = {}
    if config.get("model_type") == "gemma3_text":
        settings.update(_gemma3_layer_pattern(config, hf_dir))
        local = params.get("sliding_attention") or {}
        if "rope_local_base_freq" not in config and "rope_theta" in local:
            settings["rope_local_base_freq"] = local["rope_theta"]
        params = params.get("full_attention") or {}
    if "rope_theta" not in config and "rope_theta" in params:
        settings["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", "default") != "default":
            settings["rope_scaling"] = params
    return settings


def _gemma3_layer_pattern(config: dict, hf_dir: Path) -> dict:
    """``sliding_window_pattern`` for mlx-lm, which only knows "every n-th layer is global"."""
    layer_types = config.get("layer_types")
    if not layer_types or "sliding_window_pattern" in config:
        return {}
    pattern = layer_types.index("full_attention") + 1 if "full_attention" in layer_types else 0
    if not pattern or layer_types != [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(len(layer_types))
    ]:
        raise BackendError(f"{hf_dir}: mlx-lm runs Gemma 3 only with every n-th layer global, not these layer_types")
    return {"sliding_window_pattern": pattern}


def read_lora(folder: Path) -> list[LoraBlock]:
    """The LoRA blocks of a PEFT adapter folder, checked for completeness and supported options."""
    folder = Path(folder)
    config = _read_json(folder / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise BackendError(f"{folder}: a {config.get('peft_type')} adapter, only LoRA is supported")
    for option, meaning in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise BackendError(f"{folder}: adapters with {meaning} ({option}) are not supported")
    pairs = _read_pairs(folder / ADAPTER_WEIGHTS)
    alpha = float(config.get("lora_alpha", 8))
    blocks = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise BackendError(f"{folder / ADAPTER_WEIGHTS}: {module} lacks lora_A or lora_B")
        down, up = pair["A"], pair["B"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise BackendError(
                f"{folder / ADAPTER_WEIGHTS}: {module} has mismatched shapes {down.shape} and {up.shape}"
            )
        rank = down.shape[0]
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        blocks.append(LoraBlock(module, down, up, scale))
    if not blocks:
        raise BackendError(f"{folder / ADAPTER_WEIGHTS}: no LoRA weights inside")
    return blocks


def check_lora_fits(folder: Path, blocks: list[LoraBlock], linear_shapes: Mapping[str, tuple[int, int]]) -> None:
    """Raise BackendError unless every block targets a linear layer of the model with its shape.

    ``linear_shapes`` maps each linear layer's name to its (out_features, in_features).
    """
    for block in blocks:
        shape = linear_shapes.get(block.module)
        if shape is None:
            raise BackendError(f"{folder}: adapter targets {block.module}, which this model lacks")
        if (block.up.shape[0], block.down.shape[1]) != tuple(shape):
            raise BackendError(
                f"{folder}: adapter made for another model ({block.module} is "
                f"{block.down.shape[1]}->{block.up.shape[0]}, the model's is {shape[1]}->{shape[0]})"
            )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise BackendError(f"{path}: file not found") from error
    except (OSError, ValueError) as error:
        raise BackendError(f"{path}: unreadable ({error})") from error


def _read_pairs(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The adapter's tensors as float32 arrays, grouped by layer name and part ("A" or "B")."""
    from safetensors.torch import load_file

    check_safetensors(path)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in load_file(str(path)).items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise BackendError(f"{path}: unsupported tensor {key}")
        pairs.setdefault(match["module"], {})[match["part"]] = tensor.float().numpy()
    return pairs
