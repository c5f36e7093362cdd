"""The sleep's student and teacher on PyTorch: frozen LoRA blocks plus one new, trainable block.

The model is the chat engine's (same loading, dtype and checks), wrapped in PEFT with one named
adapter per older night and the new block last. Older blocks are frozen: they are slow memories,
each consolidated on its own night, and training them again would let tonight's sessions overwrite
what earlier nights stored (a lower learning rate for them is a possible later option, not offered
now). The new block starts with PEFT's own initialisation, A random and B = 0, so before the first
step it adds exact zeros and the grown model is, to the bit, the model it grew from.

``new_block=False`` switches the new block off (PEFT skips inactive adapters), which computes exactly
the frozen stack: the teacher and the reference of the same object, without a second model in memory.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backends.base import Adapter, BackendError, LoraSpec, Sampling
from backends.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraBlock, check_lora_fits, read_lora
from backends.torch_backend import TorchBackend, peft_wrapping

# On a CPU with native bf16, bf16 weights made SmolLM2-135M's and Qwen2.5-0.5B's sleep 1.7-3.4x faster
# (docs/decisions.md); a smaller model (nano, the tests' tiny ones) keeps the fp32 its nights were tuned in.
BF16_MIN_PARAMETERS = 50_000_000
NEW_BLOCK = "new"  # PEFT adapter name of the trainable block; older blocks are "block0", "block1", ...
GRAD_CLIP = 1.0  # max L2 norm of the new block's gradient per step: one odd batch cannot wreck the block
WEIGHT_DECAY = 0.01  # AdamW's usual default, written out so both engines use the same


class TorchBlockTrainer:
    """A Hugging Face model wearing frozen PEFT blocks and one new block that AdamW trains."""

    name = "torch"
    generate_batch = 64  # prompts decoded together (see ``generate``)

    def __init__(
        self,
        hf_dir: Path,
        blocks: Sequence[Adapter] = (),
        spec: LoraSpec = LoraSpec(),
        lr: float = 1e-3,
        seed: int = 0,
        device: str | torch.device | None = None,
        init_block: Path | None = None,
        precision: str = "auto",
    ) -> None:
        """``precision``: the frozen weights' dtype: "bf16", "fp32", or "auto" (bf16 for a model of
        ``BF16_MIN_PARAMETERS`` or more on a CPU that computes bf16 natively, else as the chat engine
        loads it). The new block trains in fp32 either way."""
        from peft import LoraConfig, PeftModel
        from peft.tuners.lora import LoraLayer

        from backends import ops

        if precision not in ("bf16", "fp32", "auto"):
            raise BackendError(f"unknown precision {precision!r}: bf16, fp32 or auto")
        self.ops = ops.TORCH_OPS
        self.spec = spec
        engine = TorchBackend(Path(hf_dir), device=device)  # loads exactly as chatting does
        if precision == "bf16" or (precision == "auto" and _bf16_pays(engine)):
            engine.base_model.to(torch.bfloat16)  # before PEFT, which keeps its adapters in fp32
        self.precision = str(next(engine.base_model.parameters()).dtype).removeprefix("torch.")
        for block in blocks:  # every folder is checked before the model is touched
            check_lora_fits(block.path, read_lora(block.path), engine.linear_shapes)
        self.hf_dir, self.device, self.tokenizer = engine.hf_dir, engine.device, engine.tokenizer
        self.render_chat, self.cache_name = engine.render_chat, engine.cache_name
        self.context_length, self.end_token_ids = engine.context_length, engine.end_token_ids
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0)
        try:
            with torch.random.fork_rng(devices=[]), peft_wrapping():  # seeded init, caller's RNG untouched
                torch.manual_seed(seed)
                self.model = PeftModel(engine.base_model, config, adapter_name=NEW_BLOCK)
        except ValueError as error:
            raise BackendError(f"{hf_dir}: cannot grow a block on {list(spec.targets)} ({error})") from error
        self.block_names = [f"block{index}" for index in range(len(blocks))]
        for name, block in zip(self.block_names, blocks):
            self.model.load_adapter(str(block.path), adapter_name=name)
        self.lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self.new_layers = {  # layer name in the Hugging Face model -> its LoRA layer carrying the new block
            name: module
            for name, module in self.model.base_model.model.named_modules()
            if isinstance(module, LoraLayer) and NEW_BLOCK in module.lora_A
        }
        self.new_parameters = [
            param for layer in self.new_layers.values() for part in (layer.lora_A, layer.lora_B)
            for param in part[NEW_BLOCK].parameters()
        ]
        if init_block is not None:
            self._copy_initial_block(Path(init_block))
        self.model.eval()  # no dropout anywhere, also while training the new block
        self.active: list[str] | None = None
        self.set_block_scales([block.scale for block in blocks])
        self.optimizer = torch.optim.AdamW(self.new_parameters, lr=lr, weight_decay=WEIGHT_DECAY)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], sampling: Sampling, *, new_block: bool) -> list[str]:
        """Left-padded batch decoding with a KV cache, ``generate_batch`` prompts at a time, shortest
        first (so a batch pads little); each row stops at its own end of turn.

        Decoding every prompt of a call together held one KV cache for all of them: the gate's
        in-context reading of 72 sessions (about 290 prompts of up to 512 tokens) doubled a sleep's
        peak memory when the bundled model grew from 2 to 6 KV heads."""
        rows = [self.encode(prompt) for prompt in prompts]
        budget = token_budget(rows, sampling, self.context_length)
        if budget == 0:
            return ["" for _ in rows]
        self._activate(new_block)
        generator = torch.Generator()
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)
        order = sorted(range(len(rows)), key=lambda index: len(rows[index]))
        texts = [""] * len(rows)
        for start in range(0, len(order), self.generate_batch):
            chunk = order[start : start + self.generate_batch]
            for index, ids in zip(chunk, self._decode_batch([rows[i] for i in chunk], sampling, budget, generator)):
                texts[index] = self.decode(ids)
        return texts

    def _decode_batch(self, rows: list[list[int]], sampling: Sampling, budget: int,
                      generator: torch.Generator) -> list[list[int]]:
        """Up to ``budget`` new tokens for each row; finished rows leave the batch (and the cache)."""
        width = max(len(row) for row in rows)
        inputs = torch.tensor([[self.pad_token_id] * (width - len(row)) + row for row in rows], device=self.device)
        attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        outputs: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))  # the prompts still generating, in batch order
        cache = None
        for _ in range(budget):
            output = self.model(
                input_ids=inputs, attention_mask=attention, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{self.cache_name: cache},
            )
            cache = getattr(output, self.cache_name)
            tokens = _pick_tokens(output.logits[:, -1].float().cpu(), sampling, generator).tolist()
            for row, token in zip(live, tokens):
                if token not in self.end_token_ids:
                    outputs[row].append(token)
            keep = [index for index, token in enumerate(tokens) if token not in self.end_token_ids]
            if not keep:
                break
            if len(keep) < len(live):
                kept = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(kept)
                attention, positions = attention[kept], positions[kept]
                live = [live[index] for index in keep]
            inputs = torch.tensor([[tokens[index]] for index in keep], device=self.device)
            attention = torch.cat([attention, attention.new_ones(len(live), 1)], dim=-1)
            positions = positions[:, -1:] + 1
        return outputs

    @torch.no_grad()  # not inference_mode: the teacher's logits go into losses next to tensors with gradient
    def completion_logits(
        self, prefixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, new_block: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._activate(new_block)
        inputs, positions, _, mask, lengths = self._batch(prefixes, completions)
        return self._logits(inputs, positions, lengths), mask

    def train_step(
        self,
        prefixes: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> float:
        loss = self._backward(prefixes, completions, loss_fn)
        norm = torch.nn.utils.clip_grad_norm_(self.new_parameters, GRAD_CLIP)
        if not (math.isfinite(loss) and math.isfinite(float(norm))):
            self.optimizer.zero_grad(set_to_none=True)
            raise BackendError(f"training step refused: the loss ({loss}) or its gradient is not finite")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def gradient_norm(
        self,
        prefixes: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> float:
        self._backward(prefixes, completions, loss_fn)
        norm = math.sqrt(sum(float(p.grad.square().sum()) for p in self.new_parameters if p.grad is not None))
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def set_block_scales(self, scales: Sequence[float]) -> None:
        """Scale each frozen block (PEFT's ``set_scale``, as the chat engine does); 0 switches one off."""
        if len(scales) != len(self.block_names):
            raise ValueError(f"{len(scales)} scales for {len(self.block_names)} frozen blocks")
        self.scales = [float(scale) for scale in scales]
        for layer in self.lora_layers:
            for name, scale in zip(self.block_names, self.scales):
                layer.set_scale(name, scale)

    def new_block_state(self) -> list[torch.Tensor]:
        return [param.detach().clone() for param in self.new_parameters]

    def load_new_block_state(self, state: Sequence[torch.Tensor], lr: float | None = None) -> None:
        with torch.no_grad():
            for param, saved in zip(self.new_parameters, state, strict=True):
                param.copy_(saved)
        self.optimizer.state.clear()  # Adam's moments belonged to the other weights
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def save_new_block(self, path: Path) -> None:
        write_peft_block(
            Path(path), self.spec, str(self.hf_dir),
            {name: (layer.lora_A[NEW_BLOCK].weight, layer.lora_B[NEW_BLOCK].weight)
             for name, layer in self.new_layers.items()},
        )

    def close(self) -> None:
        self.model = self.optimizer = None
        self.lora_layers, self.new_layers, self.new_parameters = [], {}, []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _activate(self, new_block: bool) -> None:
        """Make active the frozen blocks whose scale is not 0, then the new block if asked.

        Inactive adapters are skipped, not multiplied by 0, so a dropped block costs nothing and the
        sum is the same sequence of additions the chat engine does for that stack.
        """
        names = [name for name, scale in zip(self.block_names, self.scales) if scale != 0]
        names += [NEW_BLOCK] if new_block else []
        if names == self.active:
            return
        self.model.base_model.set_adapter(names, inference_mode=True)  # freezes every adapter it touches
        for param in self.new_parameters:
            param.requires_grad_(True)
        self.active = names

    def _batch(self, prefixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]):
        """(inputs, positions, targets, mask) as tensors on the model's device (see ``completion_batch``),
        and each row's unpadded length."""
        batch = completion_batch(prefixes, completions, self.pad_token_id)
        ids = functools.partial(torch.tensor, dtype=torch.long, device=self.device)
        mask = torch.tensor(batch.mask, dtype=torch.float32, device=self.device)
        lengths = [len(prefix) + len(completion) for prefix, completion in zip(prefixes, completions)]
        return ids(batch.inputs), ids(batch.positions), ids(batch.targets), mask, lengths

    def _logits(self, inputs: torch.Tensor, positions: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """fp32 logits at ``positions`` only: the output head runs on completion positions, not on
        the (often long) prefixes. Rows of like length go through the model together, each group cut
        to its longest row: short questions are not padded to a long reading's length."""
        causal_lm = self.model.base_model.model
        picked, order = [], []
        for group in length_groups(lengths):
            rows = torch.tensor(group, device=inputs.device)
            width = max(lengths[i] for i in group)
            hidden = causal_lm.get_decoder()(input_ids=inputs[rows, :width]).last_hidden_state
            at = positions[rows].clamp(max=width - 1)  # a shorter completion's padded steps are masked
            picked.append(hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1])))
            order += group
        hidden = torch.cat(picked) if len(picked) > 1 else picked[0]
        if order != sorted(order):
            hidden = hidden[torch.tensor(order, device=inputs.device).argsort()]
        return causal_lm.get_output_embeddings()(hidden).float()

    def _backward(self, prefixes, completions, loss_fn) -> float:
        """The student's loss (new block on) with its gradient accumulated on the new block."""
        self._activate(True)
        self.optimizer.zero_grad(set_to_none=True)
        inputs, positions, targets, mask, lengths = self._batch(prefixes, completions)
        loss = loss_fn(self._logits(inputs, positions, lengths), targets, mask)
        loss.backward()
        return float(loss.detach())

    def _copy_initial_block(self, folder: Path) -> None:
        """Start the new block from a saved PEFT folder of the same shape (e.g. another engine's start)."""
        parts = {name: (layer.lora_A[NEW_BLOCK].weight, layer.lora_B[NEW_BLOCK].weight)
                 for name, layer in self.new_layers.items()}
        shapes = {name: (tuple(down.shape), tuple(up.shape)) for name, (down, up) in parts.items()}
        blocks = read_initial_block(folder, shapes, self.spec)
        with torch.no_grad():
            for name, (down, up) in parts.items():
                down.copy_(torch.from_numpy(blocks[name].down))
                up.copy_(torch.from_numpy(blocks[name].up))


def read_initial_block(
    folder: Path, shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]], spec: LoraSpec
) -> dict[str, LoraBlock]:
    """The LoRA blocks of ``folder``, checked to be a start for the new block on any engine.

    ``shapes`` maps each layer the new block adapts to the shapes of its A and B; the folder must
    adapt exactly those layers, with those shapes and the spec's alpha / rank.
    """
    blocks = {block.module: block for block in read_lora(folder)}
    if set(blocks) != set(shapes):
        raise BackendError(f"{folder}: its layers are not the new block's targets {list(spec.targets)}")
    for name, (down, up) in shapes.items():
        if (blocks[name].down.shape, blocks[name].up.shape) != (down, up):
            raise BackendError(f"{folder}: {name} does not have the new block's rank {spec.rank}")
        if not math.isclose(blocks[name].scale, spec.alpha / spec.rank):
            raise BackendError(f"{folder}: its alpha / rank is not {spec.alpha} / {spec.rank}")
    return blocks


def write_peft_block(
    path: Path, spec: LoraSpec, base_model: str, weights: Mapping[str, tuple[object, object]]
) -> None:
    """Write one LoRA block as a PEFT folder, the same bytes from every engine.

    ``weights`` maps each adapted layer's Hugging Face name to (A as (rank, in), B as (out, rank)),
    torch tensors or mlx/numpy arrays. The folder is written under a temporary name and renamed, so
    it is complete or absent; files are 0600 and the folder 0700. An existing folder is never
    replaced: blocks are immutable once written.
    """
    path = Path(path)
    if path.exists():
        raise BackendError(f"{path}: already exists, a block is never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(spec.targets),
        "bias": "none",
        "inference_mode": True,
    }
    tensors = {
        f"base_model.model.{name}.lora_{part}.weight": np.ascontiguousarray(_to_numpy(array), dtype=np.float32)
        for name, pair in sorted(weights.items())
        for part, array in zip("AB", pair)
    }
    from safetensors.numpy import save_file

    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))  # 0700
    try:
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for file in staging.iterdir():
            file.chmod(0o600)
            with open(file, "rb") as written:
                os.fsync(written.fileno())
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _bf16_pays(engine: TorchBackend) -> bool:
    """Whether bf16 weights speed this model up here: a large enough model on a CPU with native bf16."""
    if engine.device.type != "cpu" or not cpu_computes_bf16():
        return False
    return sum(p.numel() for p in engine.base_model.parameters()) >= BF16_MIN_PARAMETERS


@functools.cache
def cpu_computes_bf16() -> bool:
    """Whether the CPU has bf16 instructions (x86 AMX or AVX-512 BF16, Arm BF16), as Linux lists them."""
    try:
        flags = {word for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.lower().startswith(("flags", "features")) for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().float().cpu().numpy()
    return np.asarray(array)


def token_budget(rows: Sequence[Sequence[int]], sampling: Sampling, context_length: int) -> int:
    """How many tokens every row of a batch may add: the sampling's max, within the context left by
    the longest prompt (one budget for the batch keeps every row's positions inside the model's range)."""
    if not rows:
        return 0
    if any(not row for row in rows):
        raise BackendError("generate needs non-empty prompts")
    longest = max(map(len, rows))
    budget = min(sampling.max_tokens, context_length - longest)
    if budget <= 0 and sampling.max_tokens > 0:
        raise BackendError(f"a prompt of {longest} tokens fills the {context_length}-token context")
    return max(budget, 0)


@dataclass(frozen=True)
class CompletionBatch:
    """Prefix + completion rows laid out for one forward pass, as plain lists for any engine.

    ``inputs`` [B, L] are right-padded (padding after every real token changes nothing under causal
    attention, so no attention mask is needed); ``positions`` [B, Tc] are the inputs whose outputs
    predict each completion token; ``targets`` [B, Tc] are the completion ids (0 where padded) and
    ``mask`` [B, Tc] is 1.0 on completion tokens, 0.0 on padding.
    """

    inputs: list[list[int]]
    positions: list[list[int]]
    targets: list[list[int]]
    mask: list[list[float]]


# What one more pass through the model is counted as, in tokens (each layer's fixed work): rows split
# into another group only when that saves more padding than this.
GROUP_OVERHEAD_TOKENS = 64


def length_groups(lengths: Sequence[int], most: int = 3) -> list[list[int]]:
    """The rows (indices into ``lengths``) in at most ``most`` groups of like length, chosen to
    spend the fewest padded tokens, counting ``GROUP_OVERHEAD_TOKENS`` for each group."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    cost = lambda a, b: (b - a) * lengths[order[b - 1]] + GROUP_OVERHEAD_TOKENS  # rows order[a:b], one pass
    best = {(0, 0): (0, [])}  # (rows placed, groups used) -> (cost, cuts)
    for used in range(1, most + 1):
        for end in range(1, len(order) + 1):
            options = [(best[(start, used - 1)][0] + cost(start, end), best[(start, used - 1)][1] + [end])
                       for start in range(end) if (start, used - 1) in best]
            if options:
                best[(end, used)] = min(options)
    _, cuts = min(best[(len(order), used)] for used in range(1, most + 1) if (len(order), used) in best)
    return [order[a:b] for a, b in zip([0] + cuts[:-1], cuts)]


def completion_batch(
    prefixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_token_id: int
) -> CompletionBatch:
    if len(prefixes) != len(completions) or not prefixes:
        raise ValueError(f"{len(prefixes)} prefixes for {len(completions)} completions (need one each, >= 1)")
    if any(len(prefix) == 0 for prefix in prefixes):
        raise ValueError("every prefix needs at least one token to predict its completion from")
    rows = [list(prefix) + list(completion) for prefix, completion in zip(prefixes, completions)]
    width, steps = max(map(len, rows)), max(map(len, completions))
    return CompletionBatch(
        inputs=[row + [pad_token_id] * (width - len(row)) for row in rows],
        positions=[[min(len(prefix) - 1 + t, width - 1) for t in range(steps)] for prefix in prefixes],
        targets=[list(completion) + [0] * (steps - len(completion)) for completion in completions],
        mask=[[1.0] * len(completion) + [0.0] * (steps - len(completion)) for completion in completions],
    )


def _pick_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]: greedy at temperature 0, else nucleus sampling."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    sorted_probs[torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= sampling.top_p] = 0.0
    return order.gather(-1, torch.multinomial(sorted_probs, 1, generator=generator)).squeeze(-1)

