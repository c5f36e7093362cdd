"""Helpers shared by several test modules (not fixtures, which live in conftest.py).

PEFT LoRA folders with non-zero adapters, transformers' own logits as the reference that the
llama.cpp export and engine are checked against, checks every engine must pass on the tiny Llama,
and the batch and loss the torch and mlx block trainers are both checked on.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from backends import ops
from backends.base import Backend, LoraSpec, Sampling
from backends.torch_backend import TorchBackend
from backends.torch_trainer import TorchBlockTrainer, completion_batch

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 4, 8
PROMPT_MESSAGES = [{"role": "user", "content": "My sister is called Alice. Where is John?"}]
COMPLETION = "John travelled to the hallway.<|im_end|>"
SPEC = LoraSpec(rank=LORA_RANK, alpha=LORA_ALPHA)
QUESTIONS = [  # different lengths, so one batch mixes padded and unpadded rows
    "Where is John?",
    "My sister is called Alice and she lives in Porto. Where is Sandra?",
    "Hi",
]
COMPLETIONS = [COMPLETION, "Porto.<|im_end|>", "Hello! How can I help you today?<|im_end|>"]


def cross_entropy(logits, targets, mask):
    """Mean negative log-likelihood of the target completion: a loss written once for any engine."""
    array_ops = ops.TORCH_OPS if isinstance(logits, torch.Tensor) else ops.MLX_OPS
    logprobs = array_ops.take_along_last_axis(array_ops.log_softmax(logits), targets)
    return -array_ops.sum(logprobs * mask) / array_ops.sum(mask)




def make_peft_lora(model_dir: Path, out_dir: Path, seed: int, **lora_options) -> Path:
    """A real PEFT LoRA on a tiny model with random, non-zero lora_B (PEFT starts B at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    options = {"r": LORA_RANK, "lora_alpha": LORA_ALPHA, "target_modules": TARGET_MODULES, **lora_options}
    with torch.random.fork_rng(devices=[]):  # lora_A too is drawn from the seed, whatever ran before
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(out_dir)
    return out_dir


def torch_logits(model_dir: Path, ids: list[int], adapters: list[tuple[Path, float]] = ()) -> np.ndarray:
    """transformers' logits for ``ids``, with PEFT adapters applied together, each times its scale."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapters:
        names = [f"adapter{i}" for i in range(len(adapters))]
        model = PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0])
        for name, (path, _) in zip(names[1:], adapters[1:]):
            model.load_adapter(path, adapter_name=name)
        model.base_model.set_adapter(names)
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict):
                for name, (_, scale) in zip(names, adapters):
                    module.scaling[name] *= scale
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def check_stops_at_end_token(backend: Backend, greedy_ids: list[int], decode) -> None:
    """Any engine: pretend a token the model greedily writes ends the turn; the stream stops before it."""
    stop_at = next(i for i, token in enumerate(greedy_ids) if i > 0 and token not in greedy_ids[:i])
    usual = backend.end_token_ids
    backend.end_token_ids = frozenset({greedy_ids[stop_at]})
    try:
        text = "".join(backend.stream(backend.render_chat(PROMPT_MESSAGES), Sampling(max_tokens=len(greedy_ids))))
    finally:
        backend.end_token_ids = usual
    assert text == decode(greedy_ids[:stop_at])


def check_cancel_stops_between_tokens(backend: Backend) -> None:
    """Any engine: a set event ends the stream before the next token."""
    prompt = backend.render_chat(PROMPT_MESSAGES)
    cancel = threading.Event()
    cancel.set()
    assert list(backend.stream(prompt, Sampling(max_tokens=20), cancel)) == []
    cancel.clear()
    received = []
    for piece in backend.stream(prompt, Sampling(max_tokens=20), cancel):
        received.append(piece)
        cancel.set()
    assert len(received) == 1


def token_batch(trainer: TorchBlockTrainer):
    prompts = [trainer.tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in QUESTIONS]
    return [trainer.encode(p) for p in prompts], [trainer.encode(c) for c in COMPLETIONS]


def chat_engine_logits(backend: TorchBackend, prefixes, completions, pad_token_id: int) -> torch.Tensor:
    """The chat engine's full forward pass on the same right-padded batch, at the completion positions."""
    batch = completion_batch(prefixes, completions, pad_token_id)
    with torch.no_grad():
        logits = backend.model(input_ids=torch.tensor(batch.inputs)).logits
    positions = torch.tensor(batch.positions)
    return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))


def prompts_of(trainer: TorchBlockTrainer) -> list[str]:
    return [trainer.tokenizer.decode(prefix) for prefix in token_batch(trainer)[0]]
