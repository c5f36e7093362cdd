"""The MLX engine: mlx-lm for the model and generation, PEFT adapters converted in memory.

On Apple Silicon this is the fast path for both chatting and wearing adapters. Several PEFT
adapters on one layer are folded into a single mlx-lm ``LoRALinear`` of concatenated rank,
because sum_i s_i B_i A_i = [s_1 B_1 | s_2 B_2 ...] [A_1; A_2 ...]: one extra matmul pair per
layer however many adapters are stacked.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from backends.base import Adapter, BackendError, Sampling, end_token_ids
from backends.incremental_text import IncrementalText
from backends.peft_io import LoraBlock, check_lora_fits, mlx_model_settings, read_lora, read_model_config


class MlxBackend:
    """A Hugging Face causal LM folder loaded with mlx-lm (float32 when MLX runs on the CPU)."""

    name = "mlx"

    def __init__(self, hf_dir: Path) -> None:
        from mlx_lm import load

        self.hf_dir = hf_dir = Path(hf_dir)
        config = read_model_config(hf_dir)
        try:
            self.model, self.tokenizer = load(str(hf_dir), model_config=mlx_model_settings(config, hf_dir))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise BackendError(f"{hf_dir}: cannot load the model with mlx-lm ({error})") from error
        if mx.default_device() == mx.cpu:
            self.model.set_dtype(mx.float32)
        if config.get("model_type") == "gemma3_text" and type(self.model.model.embed_tokens) is nn.Embedding:
            self.model.model.embed_tokens = _ExactScaleEmbedding(self.model.model.embed_tokens, config["hidden_size"])
        self.context_length = int(config.get("max_position_embeddings", self.tokenizer.model_max_length))
        self.end_token_ids = end_token_ids(self.tokenizer.eos_token_id, self.tokenizer.get_added_vocab())
        self.linears = {  # the model's own layers, put back when adapters change
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, (nn.Linear, nn.QuantizedLinear))
        }
        self.adapted: list[str] = []  # names of layers currently wrapped in a LoRALinear

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.has_chat_template:
            raise BackendError(f"{self.hf_dir}: the model has no chat template")
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) become their ids."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def stream(
        self, prompt: str, sampling: Sampling = Sampling(), cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """mlx-lm's token generator, decoded here: its own streaming detokenizer drops a leading space."""
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        prompt_ids = self.encode(prompt)
        budget = min(sampling.max_tokens, self.context_length - len(prompt_ids))
        if budget <= 0:
            if sampling.max_tokens > 0:
                raise BackendError(
                    f"prompt of {len(prompt_ids)} tokens fills the {self.context_length}-token context"
                )
            return
        if sampling.seed is not None:
            mx.random.seed(sampling.seed)
        sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p if sampling.top_p < 1.0 else 0.0)
        text = IncrementalText(self.tokenizer.decode)
        for token, _ in generate_step(mx.array(prompt_ids), self.model, max_tokens=budget, sampler=sampler):
            if cancel is not None and cancel.is_set():
                return
            if token in self.end_token_ids:
                break
            piece = text.add(token)
            if piece:
                yield piece
        rest = text.finish()
        if rest:
            yield rest

    def token_logprobs(self, prompt: str, completion: str) -> list[float]:
        prompt_ids, completion_ids = self.encode(prompt), self.encode(completion)
        if not prompt_ids:
            raise BackendError("token_logprobs needs a non-empty prompt to condition on")
        logits = self.model(mx.array([prompt_ids + completion_ids]))[0, len(prompt_ids) - 1 : -1]
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.array(completion_ids)[:, None]
        return mx.take_along_axis(logprobs, targets, axis=-1)[:, 0].tolist()

    def set_adapters(self, adapters: Sequence[Adapter]) -> None:
        """Convert PEFT folders to mlx arrays and wrap each adapted layer in one LoRALinear."""
        linear_shapes = {name: _shape(module) for name, module in self.linears.items()}
        per_layer: dict[str, list[tuple[LoraBlock, float]]] = {}
        for adapter in adapters:  # every folder is checked before the model is touched
            blocks = read_lora(adapter.path)
            check_lora_fits(adapter.path, blocks, linear_shapes)
            for block in blocks:
                per_layer.setdefault(block.module, []).append((block, adapter.scale))
        wrapped = [(name, _stacked_lora(self.linears[name], parts)) for name, parts in per_layer.items()]
        restored = [(name, self.linears[name]) for name in self.adapted if name not in per_layer]
        self.model.update_modules(tree_unflatten(restored + wrapped))
        self.adapted = list(per_layer)

    def close(self) -> None:
        self.model = None
        self.linears = {}
        mx.clear_cache()


class _ExactScaleEmbedding(nn.Embedding):
    """Gemma 3's embedding, whose float32 rows come out scaled by exactly sqrt(hidden) as in transformers.

    mlx-lm multiplies the embedding rows by sqrt(hidden) rounded to bfloat16 (25.25 for 25.30 at
    width 640), which in float32 moves log-probs ~2e-3 from torch's; float32 rows leave here
    multiplied by the rounding's inverse. In bfloat16 transformers rounds the scale too, so those
    rows pass unchanged. The weight (and so the tied output head) is the original one.
    """

    def __init__(self, embedding: nn.Embedding, hidden_size: int) -> None:
        super().__init__(*embedding.weight.shape)
        self.weight = embedding.weight
        exact = hidden_size**0.5
        self.correction = exact / mx.array(exact, mx.bfloat16).astype(mx.float32).item()

    def __call__(self, x: mx.array) -> mx.array:
        rows = super().__call__(x)
        return rows * self.correction if rows.dtype == mx.float32 else rows


def _stacked_lora(linear: nn.Module, parts: list[tuple[LoraBlock, float]]) -> nn.Module:
    """One LoRALinear whose rank concatenates every block, each block's scales folded into B."""
    from mlx_lm.tuner.lora import LoRALinear

    down = np.concatenate([block.down for block, _ in parts], axis=0)  # (total rank, in)
    up = np.concatenate([block.up * (block.scale * scale) for block, scale in parts], axis=1)  # (out, total rank)
    lora = LoRALinear.from_base(linear, r=down.shape[0], scale=1.0)
    lora.lora_a = mx.array(down.T)
    lora.lora_b = mx.array(up.T)
    return lora


def _shape(linear: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer, unpacking quantized weights."""
    out_features, in_features = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_features = in_features * 32 // linear.bits
    return out_features, in_features
