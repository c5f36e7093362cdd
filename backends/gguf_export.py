"""Hugging Face model folders and PEFT LoRA folders -> GGUF files that llama.cpp loads.

llama.cpp only reads GGUF, while the rest of Somnus (training, the torch and mlx engines) speaks
Hugging Face safetensors and PEFT. This module is the one bridge, written on the ``gguf`` package:
hyperparameters under llama.cpp's key names, tensors under llama.cpp's names (the ``gguf``
package's name map of the model's architecture), the tokenizer as a byte-level BPE vocabulary
(split like GPT-2, Llama 3 or Qwen2) or a SentencePiece-style one (Gemma), and LoRA adapters in
llama.cpp's adapter layout. The families it knows are those of ``_FAMILIES`` (Llama, Qwen2/2.5,
Qwen3, Gemma 3 text); any other architecture is refused by name. An f32 export computes what
torch computes to ~1e-6 in log-probability, except Gemma 3, whose GELU llama.cpp's CPU backend
reads from an fp16 table: its log-probs stray up to ~6e-4 from torch's, its greedy text does not.

Layout details that matter for equal outputs across engines:

* Hugging Face rotates query/key halves (``rotate_half``). llama.cpp's Llama graph rotates
  adjacent pairs, so for Llama the rows of q_proj/k_proj (and of a LoRA's q/k ``lora_B``) are
  permuted so that each head's two halves interleave; Qwen and Gemma run NEOX-style rope in
  llama.cpp, which rotates halves like Hugging Face, so their rows are written as they are.
* Gemma's RMSNorm multiplies by ``1 + w`` where llama.cpp multiplies by ``w``, so Gemma's norm
  weights are written plus one.
* llama.cpp scales a LoRA by ``alpha / rank`` (rank read from ``lora_b``); PEFT by
  ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). The written alpha reproduces PEFT's scale, and a
  block whose rank differs (PEFT's rank_pattern) gets the difference folded into its ``lora_b``.
* A SentencePiece-style BPE (Gemma's) goes as llama.cpp's ``llama`` tokenizer, which merges the
  adjacent pair whose joined token scores highest rather than by a merge list, so each token scores
  minus the rank of the first merge that makes it: the same merges in the same order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from backends.base import BackendError
from backends.peft_io import ADAPTER_WEIGHTS, read_lora, read_model_config


@dataclass(frozen=True)
class _Family:
    """How one Hugging Face architecture maps onto its llama.cpp counterpart."""

    arch: gguf.MODEL_ARCH
    hf_class: str  # config.json's ``architectures`` entry
    model_type: str  # config.json's ``model_type``
    activation: str  # the only MLP activation llama.cpp's graph of this arch computes
    interleaves_rope: bool  # llama.cpp rotates adjacent pairs (Llama) rather than halves (NEOX)
    norm_shift: float  # added to every RMSNorm weight: llama.cpp multiplies by w, Gemma by 1 + w

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


_FAMILIES = {
    family.name: family
    for family in (
        _Family(gguf.MODEL_ARCH.LLAMA, "LlamaForCausalLM", "llama", "silu", True, 0.0),
        _Family(gguf.MODEL_ARCH.QWEN2, "Qwen2ForCausalLM", "qwen2", "silu", False, 0.0),
        _Family(gguf.MODEL_ARCH.QWEN3, "Qwen3ForCausalLM", "qwen3", "silu", False, 0.0),
        _Family(gguf.MODEL_ARCH.GEMMA3, "Gemma3ForCausalLM", "gemma3_text", "gelu_pytorch_tanh", False, 1.0),
    )
}
# Split regexes of byte-level BPE tokenizers -> llama.cpp's tokenizer.ggml.pre for the same split.
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
# The normalizer of a SentencePiece-style BPE that spells spaces as "▁" and adds no leading one.
_SPACES_AS_METASPACE = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
_DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}
_IGNORED_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")


def export_model(hf_dir: Path, out_path: Path, dtype: str = "f32") -> Path:
    """Write the Hugging Face model in ``hf_dir`` as one GGUF file (weights, tokenizer, template).

    ``dtype`` is ``"f32"`` (bit-faithful) or ``"f16"`` (half the size; norms stay f32 as llama.cpp
    expects). The file appears at ``out_path`` only once complete.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if dtype not in _DTYPES:
        raise BackendError(f"unknown GGUF dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    np_dtype, file_type = _DTYPES[dtype]
    config = read_model_config(hf_dir)
    family = _family_of(config, hf_dir / "config.json")
    hparams = _Hparams(config, hf_dir / "config.json", family)
    weights = _read_safetensors(hf_dir)
    name_map = gguf.get_tensor_name_map(family.arch, hparams.n_layer)

    with _atomic_writer(out_path, gguf.GGUFType.MODEL, family.name) as writer:
        writer.add_name(hf_dir.name)
        writer.add_file_type(file_type)
        hparams.write(writer)
        _write_tokenizer(writer, hf_dir, hparams.vocab_size, config)
        for hf_name, tensor in weights:
            if _IGNORED_TENSORS.search(hf_name):
                continue
            found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
            if found is None:
                raise BackendError(f"{hf_dir / 'model.safetensors'}: tensor {hf_name} is not part of a {family.hf_class}")
            kind, name = found
            if kind == gguf.MODEL_TENSOR.TOKEN_EMBD and tensor.shape[0] != hparams.vocab_size:
                raise BackendError(f"{hf_dir}: {tensor.shape[0]} embedding rows for vocab_size {hparams.vocab_size}")
            if hf_name.endswith("norm.weight"):
                tensor = tensor + family.norm_shift
            tensor = hparams.to_llamacpp_rows(kind, tensor)
            writer.add_tensor(name, tensor.astype(np_dtype if tensor.ndim > 1 else np.float32))
    return out_path


def export_lora(peft_dir: Path, out_path: Path, *, arch: str, n_head: int, n_head_kv: int) -> Path:
    """Write the PEFT LoRA in ``peft_dir`` as a llama.cpp LoRA adapter (``general.type = adapter``).

    ``arch`` is the base GGUF's ``general.architecture``; ``n_head``/``n_head_kv`` are its query and
    key/value head counts, needed to permute the q/k ``lora_B`` rows the way the base weights were.
    """
    peft_dir, out_path = Path(peft_dir), Path(out_path)
    if arch not in _FAMILIES:
        raise BackendError(f"{peft_dir}: LoRA export for llama.cpp architecture {arch!r} is not supported")
    family = _FAMILIES[arch]
    blocks = read_lora(peft_dir)
    source = peft_dir / ADAPTER_WEIGHTS
    n_layer = 1 + max((int(m) for b in blocks for m in re.findall(r"\.layers\.(\d+)\.", b.module)), default=0)
    name_map = gguf.get_tensor_name_map(family.arch, n_layer)
    permute = {gguf.MODEL_TENSOR.ATTN_Q: n_head, gguf.MODEL_TENSOR.ATTN_K: n_head_kv} if family.interleaves_rope else {}
    # llama.cpp applies alpha / rank; this alpha reproduces PEFT's scale for the first block's rank,
    # and any block of another rank gets the difference folded into its lora_b.
    alpha = blocks[0].scale * blocks[0].down.shape[0]

    with _atomic_writer(out_path, gguf.GGUFType.ADAPTER, family.name) as writer:
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for block in blocks:
            found = name_map.get_type_and_name(block.module + ".weight", try_suffixes=(".weight",))
            if found is None:
                raise BackendError(f"{source}: LoRA on {block.module} is not supported by the llama.cpp export")
            kind, name = found
            rank = block.down.shape[0]
            lora_b = block.up * (block.scale * rank / alpha)
            if kind in permute:
                lora_b = _interleave_rope_halves(lora_b, permute[kind], source)
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(block.down, dtype=np.float32))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(lora_b, dtype=np.float32))
    return out_path


def export_lora_for_model(peft_dir: Path, hf_dir: Path, out_path: Path) -> Path:
    """``export_lora`` for a LoRA of the model in ``hf_dir``: its architecture and head counts from its config."""
    hf_dir = Path(hf_dir)
    config = read_model_config(hf_dir)
    family = _family_of(config, hf_dir / "config.json")
    hparams = _Hparams(config, hf_dir / "config.json", family)
    return export_lora(peft_dir, out_path, arch=family.name, n_head=hparams.n_head, n_head_kv=hparams.n_head_kv)


def check_exportable(hf_dir: Path) -> None:
    """Raise BackendError, naming the architecture, unless the model in ``hf_dir`` can go to llama.cpp."""
    hf_dir = Path(hf_dir)
    config = _read_json(hf_dir / "config.json")
    _Hparams(config, hf_dir / "config.json", _family_of(config, hf_dir / "config.json"))


def chat_template_of(hf_dir: Path) -> str | None:
    """The model's Jinja chat template, as the GGUF export writes it (None: it has none)."""
    path = Path(hf_dir) / "tokenizer_config.json"
    return _chat_template(Path(hf_dir), _read_json(path) if path.is_file() else {})


def _family_of(config: dict, path: Path) -> _Family:
    """The family named by config.json's ``architectures`` (or, lacking it, its ``model_type``)."""
    architectures = config.get("architectures") or []
    for family in _FAMILIES.values():
        if family.hf_class in architectures or (not architectures and config.get("model_type") == family.model_type):
            return family
    named = ", ".join(architectures) or config.get("model_type") or "an unnamed architecture"
    known = ", ".join(family.hf_class for family in _FAMILIES.values())
    raise BackendError(f"{path}: {named} cannot be exported to GGUF (supported: {known})")


class _Hparams:
    """The hyperparameters llama.cpp needs for one family, read from a transformers 4 or 5 config.json."""

    def __init__(self, config: dict, path: Path, family: _Family):
        try:
            self.n_layer = int(config["num_hidden_layers"])
            self.n_embd = int(config["hidden_size"])
            self.n_ff = int(config["intermediate_size"])
            self.n_head = int(config["num_attention_heads"])
            self.n_head_kv = int(config.get("num_key_value_heads") or self.n_head)
            self.vocab_size = int(config["vocab_size"])
            self.context_length = int(config["max_position_embeddings"])
            self.rms_eps = float(config.get("rms_norm_eps", 1e-6))
            self.head_dim = int(config.get("head_dim") or self.n_embd // self.n_head)
        except (KeyError, TypeError, ValueError) as error:
            raise BackendError(f"{path}: missing or invalid {family.hf_class} setting {error}") from None
        self.family, self.config, self.path = family, config, path
        # Gemma's config calls it hidden_activation; the others hidden_act.
        activation = config.get("hidden_activation") or config.get("hidden_act") or family.activation
        if activation != family.activation:
            raise BackendError(f"{path}: activation {activation!r} is not {family.hf_class}'s {family.activation}")
        if config.get("use_sliding_window"):
            raise BackendError(f"{path}: sliding-window attention in {family.hf_class} is not supported by the GGUF export")
        # transformers 5 nests RoPE settings in rope_parameters (per layer type for Gemma 3);
        # 4.x keeps rope_theta/rope_scaling (and Gemma's rope_local_base_freq) at the top.
        rope = dict(config.get("rope_parameters") or {})
        full, local = rope.get("full_attention"), rope.get("sliding_attention")
        if full is None:
            full = rope or dict(config.get("rope_scaling") or {})
        self.rope_theta = float(full.get("rope_theta", config.get("rope_theta", 10000.0)))
        self.rope_type = full.get("rope_type", full.get("type", "default"))
        self.rope_factor = float(full.get("factor", 1.0))
        if self.rope_type not in ("default", "linear"):
            raise BackendError(f"{path}: RoPE scaling {self.rope_type!r} is not supported by the GGUF export")
        if family.arch == gguf.MODEL_ARCH.GEMMA3:
            local = local or {}
            self.rope_theta_local = float(local.get("rope_theta", config.get("rope_local_base_freq", 10000.0)))
            if local.get("rope_type", "default") != "default":
                raise BackendError(f"{path}: RoPE scaling on sliding layers is not supported by the GGUF export")
            self._check_gemma3()

    def _check_gemma3(self) -> None:
        """Refuse Gemma 3 settings llama.cpp's graph does not read from a GGUF file."""
        config, path = self.config, self.path
        if config.get("attn_logit_softcapping"):
            raise BackendError(f"{path}: attention logit softcapping is not supported by llama.cpp's Gemma 3")
        if config.get("use_bidirectional_attention"):
            raise BackendError(f"{path}: bidirectional attention is not supported by llama.cpp's Gemma 3")
        # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B.
        scalar = self.n_embd // self.n_head if self.n_layer == 62 else self.head_dim
        if float(config.get("query_pre_attn_scalar", scalar)) != scalar:
            raise BackendError(
                f"{path}: query_pre_attn_scalar {config['query_pre_attn_scalar']} differs from the {scalar} "
                "that llama.cpp's Gemma 3 uses"
            )
        layer_types = config.get("layer_types") or [
            "full_attention" if (i + 1) % int(config.get("sliding_window_pattern", 6)) == 0 else "sliding_attention"
            for i in range(self.n_layer)
        ]
        self.sliding_layers = [kind == "sliding_attention" for kind in layer_types]
        self.sliding_window = int(config.get("sliding_window") or 0)

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_context_length(self.context_length)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_block_count(self.n_layer)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_layer_norm_rms_eps(self.rms_eps)
        writer.add_vocab_size(self.vocab_size)
        if self.rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(self.rope_factor)
        if self.family.arch == gguf.MODEL_ARCH.GEMMA3:
            if self.config.get("final_logit_softcapping"):
                writer.add_final_logit_softcapping(float(self.config["final_logit_softcapping"]))
            if self.sliding_window and any(self.sliding_layers):
                writer.add_sliding_window(self.sliding_window)
                writer.add_sliding_window_pattern(self.sliding_layers)
                writer.add_rope_freq_base_swa(self.rope_theta_local)

    def to_llamacpp_rows(self, kind: gguf.MODEL_TENSOR, tensor: np.ndarray) -> np.ndarray:
        """The tensor in llama.cpp's row order: Llama's q/k rows pair up for adjacent-pair rope."""
        if not self.family.interleaves_rope:
            return tensor
        if kind == gguf.MODEL_TENSOR.ATTN_Q:
            return _interleave_rope_halves(tensor, self.n_head, self.path)
        if kind == gguf.MODEL_TENSOR.ATTN_K:
            return _interleave_rope_halves(tensor, self.n_head_kv, self.path)
        return tensor


def _interleave_rope_halves(rows: np.ndarray, n_head: int, source: Path) -> np.ndarray:
    """Reorder each head's rows from [first half, second half] to [x0, y0, x1, y1, ...] pairs."""
    if rows.shape[0] % (2 * n_head):
        raise BackendError(f"{source}: {rows.shape[0]} attention rows do not split into {n_head} heads")
    head_dim = rows.shape[0] // n_head
    grouped = rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:])
    return grouped.swapaxes(1, 2).reshape(rows.shape)


def _write_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int, config: dict) -> None:
    """Write the BPE vocabulary (padded to ``vocab_size``), special ids and chat template."""
    tokenizer_path = hf_dir / "tokenizer.json"
    tokenizer = _read_json(tokenizer_path)
    tokenizer_config = _read_json(hf_dir / "tokenizer_config.json")
    model = tokenizer.get("model") or {}
    pre_name = _pre_tokenizer_name(tokenizer.get("pre_tokenizer") or {})
    sentencepiece = _is_sentencepiece_bpe(tokenizer)
    if model.get("type") != "BPE" or (pre_name is None and not sentencepiece):
        raise BackendError(
            f"{tokenizer_path}: only byte-level BPE tokenizers that split text like GPT-2, Llama 3 or Qwen2, "
            "or SentencePiece-style BPE like Gemma's, can be exported"
        )

    ids = {token: int(i) for token, i in model["vocab"].items()}
    added_types = {}
    for added in tokenizer.get("added_tokens", []):
        ids[added["content"]] = int(added["id"])
        added_types[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if len(ids) > vocab_size or max(ids.values()) >= vocab_size:
        raise BackendError(f"{tokenizer_path}: {len(ids)} tokens do not fit the model's vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in ids.items():
        tokens[i] = token
        types[i] = added_types.get(i, gguf.TokenType.NORMAL)
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]

    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        scores = [0.0] * vocab_size
        for rank, (left, right) in reversed(list(enumerate(merges))):  # the first merge making a token wins
            if left + right in ids:
                scores[ids[left + right]] = -1.0 - rank
        for token, i in ids.items():
            if _BYTE_TOKEN.fullmatch(token) and i not in added_types:
                types[i] = gguf.TokenType.BYTE
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(False)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_name)
        writer.add_token_list(tokens)
        writer.add_token_merges([" ".join(m) for m in merges])
    writer.add_token_types([int(t) for t in types])
    id_writers = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id}
    if sentencepiece:  # the token llama.cpp's SentencePiece tokenizer writes for what no byte token spells
        id_writers["unk"] = writer.add_unk_token_id
    for role, add_id in id_writers.items():
        token_id = _special_token_id(role, tokenizer_config, config, ids)
        if token_id is not None:
            add_id(token_id)
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tokenizer_config.get("add_eos_token", False)))
    template = _chat_template(hf_dir, tokenizer_config)
    if template:
        writer.add_chat_template(template)


def _is_sentencepiece_bpe(tokenizer: dict) -> bool:
    """Whether the tokenizer is a SentencePiece BPE as Gemma's: spaces spelt "▁" (none added in front),
    characters outside the vocabulary as byte tokens, and no split but at spaces, which are gone by then."""
    model, pre = tokenizer.get("model") or {}, tokenizer.get("pre_tokenizer")
    splits_nothing = pre is None or (
        pre.get("type") == "Split" and pre.get("pattern") == {"String": " "} and not pre.get("invert")
    )
    return bool(model.get("byte_fallback")) and tokenizer.get("normalizer") == _SPACES_AS_METASPACE and splits_nothing


def _pre_tokenizer_name(pre: dict) -> str | None:
    """llama.cpp's name for how the tokenizer splits text before BPE, or None for a split it lacks.

    GPT-2's split is ByteLevel's own regex; Llama 3 and Qwen2 (also Qwen2.5 and Qwen3) put their
    regex in a Split before a regex-free ByteLevel, as their tokenizer.json files and transformers'
    GGUF import write them.
    """
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else None
    parts = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(parts) != 2:
        return None
    split, byte_level = parts
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        return None
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    return _SPLITS.get((split.get("pattern") or {}).get("Regex"))


def _special_token_id(role: str, tokenizer_config: dict, config: dict, ids: dict[str, int]) -> int | None:
    """The id of the bos/eos/pad token: the tokenizer's named token first, config.json's id second."""
    token = tokenizer_config.get(f"{role}_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and token in ids:
        return ids[token]
    fallback = config.get(f"{role}_token_id")
    if isinstance(fallback, list):
        fallback = fallback[0] if fallback else None
    return int(fallback) if fallback is not None else None


def _chat_template(hf_dir: Path, tokenizer_config: dict) -> str | None:
    template_file = hf_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp chats with the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackendError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BackendError(f"{path}: unreadable JSON ({error})") from None
    if not isinstance(value, dict):
        raise BackendError(f"{path}: expected a JSON object")
    return value


def _read_safetensors(hf_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """All weights of ``hf_dir``, from ``model.safetensors`` or the shards its index lists."""
    index_path = hf_dir / "model.safetensors.index.json"
    if not (hf_dir / "model.safetensors").exists() and index_path.exists():
        shards = sorted(set(_read_json(index_path).get("weight_map", {}).values()))
        for shard in shards:
            yield from _read_tensors(hf_dir / shard)
    else:
        yield from _read_tensors(hf_dir / "model.safetensors")


def _read_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of one safetensors file as float32 numpy arrays (through torch, which reads bf16 too)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise BackendError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key).float().numpy()
    except (SafetensorError, OSError, RuntimeError) as error:
        raise BackendError(f"{path}: corrupt safetensors file ({error})") from None


@contextmanager
def _atomic_writer(out_path: Path, gguf_type: str, arch: str) -> Iterator[gguf.GGUFWriter]:
    """A GGUFWriter for ``arch`` whose file replaces ``out_path`` (mode 0600) only if everything was written."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(temp_path, arch)
    writer.add_type(gguf_type)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(temp_path, 0o600)
        os.replace(temp_path, out_path)
    except OSError as error:
        raise BackendError(f"{out_path}: cannot write GGUF file ({error})") from None
    finally:
        writer.close()
        temp_path.unlink(missing_ok=True)
