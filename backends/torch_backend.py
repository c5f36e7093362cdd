"""The PyTorch engine: transformers for the model, PEFT for stacked LoRA adapters.

It runs everywhere (CUDA, Apple MPS, plain CPU) and is the reference the other engines are
tested against, so generation is a plain token loop whose every step is easy to reason about.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.base import Adapter, BackendError, Sampling, end_token_ids, first_line
from backends.incremental_text import IncrementalText
from backends.peft_io import check_lora_fits, read_lora, read_model_config


def pick_device() -> torch.device:
    """The fastest device present: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class TorchBackend:
    """A Hugging Face causal LM folder loaded with transformers (fp32 on CPU, checkpoint dtype on GPUs)."""

    name = "torch"

    def __init__(self, hf_dir: Path, device: str | torch.device | None = None) -> None:
        self.hf_dir = hf_dir = Path(hf_dir)
        read_model_config(hf_dir)
        self.device = torch.device(device) if device is not None else pick_device()
        dtype = torch.float32 if self.device.type == "cpu" else "auto"
        try:
            with _no_progress_bars():
                self.tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
                base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise BackendError(f"{hf_dir}: cannot load the model ({first_line(error)})") from error
        self.base_model = base.to(self.device).eval()
        head = base.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_contiguous_input)
        self.model: torch.nn.Module = self.base_model  # the base, or a PeftModel wrapping it
        self.cache_name = cache_argument(base)
        self.context_length = int(base.config.max_position_embeddings)
        self.linear_shapes = {  # (out, in) of the bare model's layers, which adapters must fit
            name: tuple(module.weight.shape)
            for name, module in base.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        self.end_token_ids = end_token_ids(self.tokenizer.eos_token_id, self.tokenizer.get_added_vocab())

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise BackendError(f"{self.hf_dir}: the model has no chat template")
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) become their ids."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    @torch.inference_mode()
    def stream(
        self, prompt: str, sampling: Sampling = Sampling(), cancel: threading.Event | None = None
    ) -> Iterator[str]:
        prompt_ids = self.encode(prompt)
        budget = min(sampling.max_tokens, self.context_length - len(prompt_ids))
        if budget <= 0 and sampling.max_tokens > 0:
            raise BackendError(f"prompt of {len(prompt_ids)} tokens fills the {self.context_length}-token context")
        generator = torch.Generator()
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)
        text = IncrementalText(self.tokenizer.decode)
        inputs = torch.tensor([prompt_ids], device=self.device)
        cache = None
        for _ in range(budget):
            if cancel is not None and cancel.is_set():
                return
            output = self.model(input_ids=inputs, use_cache=True, **{self.cache_name: cache})
            cache = getattr(output, self.cache_name)
            token = _pick_token(output.logits[0, -1].float().cpu(), sampling, generator)
            if token in self.end_token_ids:
                break
            piece = text.add(token)
            if piece:
                yield piece
            inputs = torch.tensor([[token]], device=self.device)
        rest = text.finish()
        if rest:
            yield rest

    @torch.inference_mode()
    def token_logprobs(self, prompt: str, completion: str) -> list[float]:
        prompt_ids, completion_ids = self.encode(prompt), self.encode(completion)
        if not prompt_ids:
            raise BackendError("token_logprobs needs a non-empty prompt to condition on")
        ids = torch.tensor([prompt_ids + completion_ids], device=self.device)
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        targets = ids[0, len(prompt_ids) :].unsqueeze(-1)
        return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1).tolist()

    def set_adapters(self, adapters: Sequence[Adapter]) -> None:
        """Attach PEFT folders as named adapters, all active at once, each scaled by its ``scale``."""
        from peft import LoraConfig, PeftModel

        for adapter in adapters:  # every folder is checked before the model is touched
            check_lora_fits(adapter.path, read_lora(adapter.path), self.linear_shapes)
        self._detach_adapters()
        if not adapters:
            return
        names = [f"adapter{index}" for index in range(len(adapters))]
        # Wrap first, load after: even a failed load leaves a handle that the next call unloads.
        first_config = LoraConfig.from_pretrained(str(adapters[0].path))
        with peft_wrapping():
            self.model = peft_model = PeftModel(self.base_model, first_config, adapter_name=names[0])
        for name, adapter in zip(names, adapters):
            peft_model.load_adapter(str(adapter.path), adapter_name=name)
        peft_model.base_model.set_adapter(names, inference_mode=True)
        for module in peft_model.modules():
            if hasattr(module, "set_scale"):
                for name, adapter in zip(names, adapters):
                    module.set_scale(name, adapter.scale)
        peft_model.eval()

    def _detach_adapters(self) -> None:
        """Put the original linear layers back; PEFT never wrote into their weights."""
        if self.model is not self.base_model:
            self.base_model = self.model.base_model.unload()
            self.model = self.base_model

    def close(self) -> None:
        self.model = self.base_model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes and returns its KV cache: ``cache`` since
    transformers 5.25 (which warns about the old name), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around ``PeftModel(...)``: PEFT reads transformers' deprecated ``is_gradient_checkpointing``, a
    FutureWarning about their code that would reach the user's terminal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """The head's input, contiguous. Prefill keeps only the last position (``logits_to_keep``), a strided
    slice; in bf16 on a CPU torch multiplies such a slice by a per-row copy of the whole head (2.2 GB and
    10 s for 8 prompts on Qwen2.5-0.5B) instead of by the head once."""
    return (args[0].contiguous(), *args[1:])


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" bar stays off the user's terminal; its setting is restored after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Greedy at temperature 0, otherwise nucleus sampling at the given temperature."""
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
