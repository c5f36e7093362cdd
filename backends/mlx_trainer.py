"""The sleep's student and teacher on MLX: the torch trainer's behaviour on mlx-lm, in float32.

Same stack, same maths, same files: every adapted linear layer computes
``base(x) + sum_i s_i * B_i(A_i(x))`` over the frozen blocks in order, then the new block, exactly
PEFT's order of additions; A is kept as (rank, in) and B as (out, rank), PEFT's layout, so blocks
load from and save to the PEFT folders every engine shares. Older blocks are frozen (slow memories,
see the torch trainer); gradients come from ``nn.value_and_grad`` over the model's trainable
parameters, which are the new block's A and B only. The engine-free parts (batch layout, token
budget, the PEFT folder writer) are the torch trainer's, so both engines lay out and save alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from backends.base import Adapter, BackendError, LoraSpec, Sampling
from backends.mlx_backend import MlxBackend, _shape
from backends.peft_io import check_lora_fits, read_lora
from backends.torch_trainer import (
    GRAD_CLIP,
    WEIGHT_DECAY,
    completion_batch,
    read_initial_block,
    token_budget,
    write_peft_block,
)


@dataclass
class _StackState:
    """What every adapted layer reads at call time: which blocks are on, and their scales."""

    scalings: dict[str, float] = field(default_factory=dict)  # frozen block name -> scale * alpha / rank
    new_block: bool = True
    new_scaling: float = 1.0  # the new block's alpha / rank


class _FrozenBlock(nn.Module):
    """One older block's A (rank, in) and B (out, rank) on one layer (a module, so mlx can freeze it)."""

    def __init__(self, down: mx.array, up: mx.array) -> None:
        super().__init__()
        self.down, self.up = down, up


class _BlockStackLinear(nn.Module):
    """A linear layer wearing some frozen blocks (in ``frozen``) and perhaps the new block."""

    def __init__(self, base: nn.Module, state: _StackState) -> None:
        super().__init__()
        self.base = base
        self.stack = state  # a plain object, so mlx does not take it for parameters
        self.frozen: dict[str, _FrozenBlock] = {}

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for name, block in self.frozen.items():  # insertion order: oldest block first
            scaling = self.stack.scalings[name]
            if scaling != 0:  # a dropped block is skipped, like an inactive PEFT adapter
                y = y + ((x @ block.down.T) @ block.up.T) * scaling
        if self.stack.new_block and "new_down" in self:
            y = y + ((x @ self.new_down.T) @ self.new_up.T) * self.stack.new_scaling
        return y


class MlxBlockTrainer:
    """A Hugging Face model loaded with mlx-lm, wearing frozen PEFT blocks and one new block."""

    name = "mlx"

    def __init__(
        self,
        hf_dir: Path,
        blocks: Sequence[Adapter] = (),
        spec: LoraSpec = LoraSpec(),
        lr: float = 1e-3,
        seed: int = 0,
        init_block: Path | None = None,
    ) -> None:
        from backends import ops

        self.ops = ops.MLX_OPS
        self.precision = "float32"
        self.spec = spec
        engine = MlxBackend(Path(hf_dir))  # loads exactly as chatting does
        self.hf_dir, self.model, self.tokenizer = engine.hf_dir, engine.model, engine.tokenizer
        self.render_chat = engine.render_chat
        self.context_length = engine.context_length
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.model.set_dtype(mx.float32)  # gradients and the teacher's distributions in full precision
        shapes = {name: _shape(module) for name, module in engine.linears.items()}
        frozen = [read_lora(block.path) for block in blocks]
        for block, parts in zip(blocks, frozen):  # every folder is checked before the model is touched
            check_lora_fits(block.path, parts, shapes)
        self.block_names = [f"block{index}" for index in range(len(blocks))]
        self.block_base_scales = [parts[0].scale for parts in frozen]  # alpha / rank of each folder
        targets = [name for name in engine.linears if any(name == t or name.endswith(f".{t}") for t in spec.targets)]
        if not targets:
            raise BackendError(f"{hf_dir}: cannot grow a block, no layer is one of {list(spec.targets)}")
        self.state = _StackState(new_scaling=spec.alpha / spec.rank)
        self.layers: dict[str, _BlockStackLinear] = {}
        for name, parts in zip(self.block_names, frozen):
            for part in parts:
                self._layer(part.module, engine.linears).frozen[name] = _FrozenBlock(
                    mx.array(part.down), mx.array(part.up)
                )
        keys = mx.random.split(mx.random.key(seed), len(targets))
        for key, name in zip(keys, targets):  # PEFT's default init: A ~ U(+-1/sqrt(in)), B = 0
            out_features, in_features = shapes[name]
            layer = self._layer(name, engine.linears)
            bound = 1 / math.sqrt(in_features)
            layer.new_down = mx.random.uniform(-bound, bound, (spec.rank, in_features), key=key)
            layer.new_up = mx.zeros((out_features, spec.rank))
        self.new_layers = {name: self.layers[name] for name in targets}
        if init_block is not None:
            self._copy_initial_block(Path(init_block))
        self.model.update_modules(tree_unflatten(list(self.layers.items())))
        self.model.freeze()
        for layer in self.new_layers.values():
            layer.unfreeze(keys=["new_down", "new_up"], recurse=False)
        self.set_block_scales([block.scale for block in blocks])
        self.lr = lr
        self.optimizer = optim.AdamW(learning_rate=lr, weight_decay=WEIGHT_DECAY, bias_correction=True)
        mx.eval(self.model.parameters())

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompts: Sequence[str], sampling: Sampling, *, new_block: bool) -> list[str]:
        """mlx-lm's batch generation (left padding, KV cache), each row stopped at the tokenizer's
        end-of-turn tokens."""
        from mlx_lm.generate import batch_generate
        from mlx_lm.sample_utils import make_sampler

        rows = [self.encode(prompt) for prompt in prompts]
        budget = token_budget(rows, sampling, self.context_length)
        if budget == 0:
            return ["" for _ in rows]
        self.state.new_block = new_block
        if sampling.seed is not None:
            mx.random.seed(sampling.seed)
        sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p if sampling.top_p < 1.0 else 0.0)
        result = batch_generate(
            self.model, self.tokenizer, rows, max_tokens=budget, sampler=sampler, return_token_ids=True
        )
        return [self.decode(ids) for ids in result.token_ids]

    def completion_logits(
        self, prefixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, new_block: bool
    ) -> tuple[mx.array, mx.array]:
        self.state.new_block = new_block
        inputs, positions, _, mask = self._batch(prefixes, completions)
        logits = mx.stop_gradient(self._logits(inputs, positions))
        mx.eval(logits)
        return logits, mask

    def train_step(
        self,
        prefixes: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        loss_fn: Callable[[mx.array, mx.array, mx.array], mx.array],
    ) -> float:
        loss, grads = self._loss_and_gradient(prefixes, completions, loss_fn)
        grads, norm = optim.clip_grad_norm(grads, GRAD_CLIP)
        if not (math.isfinite(loss) and math.isfinite(norm.item())):
            raise BackendError(f"training step refused: the loss ({loss}) or its gradient is not finite")
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        return loss

    def gradient_norm(
        self,
        prefixes: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        loss_fn: Callable[[mx.array, mx.array, mx.array], mx.array],
    ) -> float:
        _, grads = self._loss_and_gradient(prefixes, completions, loss_fn)
        return math.sqrt(sum(mx.sum(g * g).item() for _, g in tree_flatten(grads)))

    def set_block_scales(self, scales: Sequence[float]) -> None:
        """Scale each frozen block (0 switches one off), as ``scale * alpha / rank`` like PEFT's set_scale."""
        if len(scales) != len(self.block_names):
            raise ValueError(f"{len(scales)} scales for {len(self.block_names)} frozen blocks")
        self.state.scalings = {
            name: float(scale) * base for name, scale, base in zip(self.block_names, scales, self.block_base_scales)
        }

    def new_block_state(self) -> dict[str, tuple[mx.array, mx.array]]:
        return {name: (layer.new_down, layer.new_up) for name, layer in self.new_layers.items()}  # immutable arrays

    def load_new_block_state(self, state: dict[str, tuple[mx.array, mx.array]], lr: float | None = None) -> None:
        for name, layer in self.new_layers.items():
            layer.new_down, layer.new_up = state[name]
        self.lr = self.lr if lr is None else lr
        self.optimizer = optim.AdamW(learning_rate=self.lr, weight_decay=WEIGHT_DECAY, bias_correction=True)

    def save_new_block(self, path: Path) -> None:
        write_peft_block(
            Path(path), self.spec, str(self.hf_dir),
            {name: (layer.new_down, layer.new_up) for name, layer in self.new_layers.items()},
        )

    def close(self) -> None:
        self.model = self.optimizer = None
        self.layers, self.new_layers = {}, {}
        mx.clear_cache()

    def _layer(self, name: str, linears: dict[str, nn.Module]) -> _BlockStackLinear:
        if name not in self.layers:
            self.layers[name] = _BlockStackLinear(linears[name], self.state)
        return self.layers[name]

    def _batch(self, prefixes, completions):
        batch = completion_batch(prefixes, completions, self.pad_token_id)
        return (
            mx.array(batch.inputs, dtype=mx.int32).reshape(len(batch.inputs), -1),
            mx.array(batch.positions, dtype=mx.int32).reshape(len(batch.positions), -1),
            mx.array(batch.targets, dtype=mx.int32).reshape(len(batch.targets), -1),
            mx.array(batch.mask, dtype=mx.float32).reshape(len(batch.mask), -1),
        )

    def _logits(self, inputs: mx.array, positions: mx.array) -> mx.array:
        """float32 logits at ``positions`` only (the output head skips the prefixes), mlx-lm's
        Llama-family layout: ``model.model`` the decoder, then ``lm_head`` or the tied embedding."""
        hidden = self.model.model(inputs)
        index = mx.broadcast_to(positions[..., None], (*positions.shape, hidden.shape[-1]))
        picked = mx.take_along_axis(hidden, index, axis=1)
        if "lm_head" in self.model:
            return self.model.lm_head(picked)
        return self.model.model.embed_tokens.as_linear(picked)

    def _loss_and_gradient(self, prefixes, completions, loss_fn) -> tuple[float, dict]:
        """The student's loss (new block on) and its gradient with respect to the new block only."""
        self.state.new_block = True
        inputs, positions, targets, mask = self._batch(prefixes, completions)
        loss, grads = nn.value_and_grad(self.model, lambda: loss_fn(self._logits(inputs, positions), targets, mask))()
        mx.eval(loss, grads)
        return loss.item(), grads

    def _copy_initial_block(self, folder: Path) -> None:
        """Start the new block from a saved PEFT folder of the same shape (e.g. the torch trainer's start)."""
        shapes = {name: (tuple(layer.new_down.shape), tuple(layer.new_up.shape))
                  for name, layer in self.new_layers.items()}
        blocks = read_initial_block(folder, shapes, self.spec)
        for name, layer in self.new_layers.items():
            layer.new_down, layer.new_up = mx.array(blocks[name].down), mx.array(blocks[name].up)
