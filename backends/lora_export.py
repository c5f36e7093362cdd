"""Several LoRA blocks as ONE LoRA, written for other tools: a PEFT folder, mlx-lm's adapter folder,
or a Hugging Face model folder with the LoRA merged into its weights.

The sum of LoRA blocks is itself a LoRA, exactly: ``sum_i s_i B_i A_i = [s_1 B_1 | s_2 B_2 | ...] @
[A_1; A_2; ...]``, so the A matrices are stacked, the B matrices put side by side with each block's
scale (its own ``lora_alpha / r`` times the scale it is worn at) folded in, and the result has scale
1 and rank the sum of the blocks' ranks. A layer that some block does not adapt gets zero rows and
columns for it, so every layer has the same rank (mlx-lm and llama.cpp want one rank per adapter).
Nothing here knows about nights or sessions; the writers fill a folder the caller made.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backends.base import BackendError
from backends.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraBlock

MLX_CONFIG = "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"
_LAYER = re.compile(r"^(?P<prefix>.*\.layers\.\d+)\.(?P<key>.+)$")


def sum_loras(parts: Sequence[tuple[Sequence[LoraBlock], float]]) -> list[LoraBlock]:
    """One LoRA computing what ``parts`` (each a block's layers and the scale it is worn at) add up to."""
    per_module: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for layers, scale in parts:
        for layer in layers:
            per_module.setdefault(layer.module, []).append((layer.down, layer.up * np.float32(layer.scale * scale)))
    if not per_module:
        raise BackendError("no LoRA layers to export")
    rank = max(sum(down.shape[0] for down, _ in pairs) for pairs in per_module.values())
    summed = []
    for module, pairs in sorted(per_module.items()):
        down = np.concatenate([d for d, _ in pairs], axis=0).astype(np.float32)
        up = np.concatenate([u for _, u in pairs], axis=1).astype(np.float32)
        missing = rank - down.shape[0]  # zero rows of A and columns of B add nothing
        down = np.pad(down, ((0, missing), (0, 0)))
        up = np.pad(up, ((0, 0), (0, missing)))
        summed.append(LoraBlock(module, down, up, 1.0))
    return summed


def write_peft(folder: Path, layers: Sequence[LoraBlock], base_model: str) -> None:
    """A PEFT LoRA folder (scale 1: ``lora_alpha == r``) that ``PeftModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    rank = _one_rank(layers)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted({layer.module.rsplit(".", 1)[-1] for layer in layers}),
        "bias": "none",
        "inference_mode": True,
    }
    tensors = {}
    for layer in layers:
        tensors[f"base_model.model.{layer.module}.lora_A.weight"] = np.ascontiguousarray(layer.down * np.float32(layer.scale))
        tensors[f"base_model.model.{layer.module}.lora_B.weight"] = np.ascontiguousarray(layer.up)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def write_mlx(folder: Path, layers: Sequence[LoraBlock], num_layers: int) -> None:
    """mlx-lm's adapter folder (``adapters.safetensors``, ``adapter_config.json``) for
    ``mlx_lm.load(base, adapter_path=folder)``: mlx names layers as Hugging Face does, and stores
    ``lora_a`` as (in, rank), ``lora_b`` as (rank, out)."""
    from safetensors.numpy import save_file

    rank = _one_rank(layers)
    keys = set()
    tensors = {}
    for layer in layers:
        match = _LAYER.match(layer.module)
        if match is None:
            raise BackendError(f"LoRA on {layer.module}, outside the transformer layers, is not supported by mlx-lm")
        keys.add(match["key"])
        tensors[f"{layer.module}.lora_a"] = np.ascontiguousarray((layer.down * np.float32(layer.scale)).T)
        tensors[f"{layer.module}.lora_b"] = np.ascontiguousarray(layer.up.T)
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": 1.0, "dropout": 0.0, "keys": sorted(keys)},
    }
    (folder / MLX_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / MLX_WEIGHTS), metadata={"format": "mlx"})


def write_merged(hf_dir: Path, layers: Sequence[LoraBlock], folder: Path, skip: Sequence[str] = ()) -> None:
    """The model of ``hf_dir`` with ``layers`` folded into its weights (W + scale * B @ A, computed in
    float32 and stored in each weight's own dtype), with its config and tokenizer files, in ``folder``."""
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    deltas = {f"{layer.module}.weight": layer for layer in layers}
    weight_files = sorted(hf_dir.glob("*.safetensors"))
    for path in weight_files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {}
                for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    tensor = handle.get_tensor(key)
                    layer = deltas.pop(key, None)
                    if layer is not None:
                        delta = np.float32(layer.scale) * (layer.up @ layer.down)
                        if tuple(delta.shape) != tuple(tensor.shape):
                            raise BackendError(f"{path}: {key} is {tuple(tensor.shape)}, the LoRA's {delta.shape}")
                        tensor = (tensor.float() + torch.from_numpy(delta)).to(tensor.dtype)
                    tensors[key] = tensor.contiguous()
        except (SafetensorError, OSError) as error:
            raise BackendError(f"{path}: corrupt safetensors file ({error})") from None
        save_file(tensors, str(folder / path.name), metadata=metadata or {"format": "pt"})
    if deltas:
        raise BackendError(f"{hf_dir}: the model has no weight {min(deltas)} for the LoRA")
    for path in hf_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and not path.name.startswith(".") and path.name not in skip:
            shutil.copyfile(path, folder / path.name)


def _one_rank(layers: Sequence[LoraBlock]) -> int:
    ranks = {layer.down.shape[0] for layer in layers}
    if len(ranks) != 1:
        raise BackendError(f"a LoRA to export needs one rank for every layer, not {sorted(ranks)}")
    return ranks.pop()
