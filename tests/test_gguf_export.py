"""GGUF export: the exported tiny model and LoRA load in real llama.cpp and compute what torch computes.

Tolerances (max abs difference of logits, values of order 1-3): f32 weights with llama.cpp's KV
cache in f32 agree with transformers to ~2e-6 (asserted < 1e-4); f16 weights to ~3e-3 (asserted < 2e-2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from helpers import make_peft_lora, torch_logits

from backends.base import BackendError
from backends.gguf_export import export_lora, export_model

F32_LOGIT_TOLERANCE = 1e-4
F16_LOGIT_TOLERANCE = 2e-2
TEXTS = [
    "Hello! How can I help you today?",
    "héllo wörld, ça va? 日本語のテキスト 🎉🦊 naïve café",
    "line one\nline two\n\n\ttabbed   spaced  \r\n end",
    "it's 1234 they'll we've I'm 3.14159 -- (brackets) [x] {y}",
    "<|im_start|>user\nMy dog Rex likes the park.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|><|im_start|>",
]


def llamacpp_logits(gguf_path: Path, ids: list[int], lora_path: Path | None = None) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (f32 KV cache, as the backend uses for f32)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf_path), n_ctx=128, logits_all=True, type_k=0, type_v=0, verbose=False,
        lora_path=str(lora_path) if lora_path else None,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.fixture(scope="module")
def sample_ids(hf_tokenizer) -> list[int]:
    return hf_tokenizer.encode(TEXTS[4] + "Hello! Where is John?", add_special_tokens=False)


def test_metadata_describes_a_llama_with_its_chat_tokenizer(tiny_gguf, hf_tokenizer):
    fields = gguf.GGUFReader(tiny_gguf).fields
    value = {key: field.contents() for key, field in fields.items()}
    assert value["general.architecture"] == "llama"
    assert value["llama.block_count"] == 2
    assert (value["llama.attention.head_count"], value["llama.attention.head_count_kv"]) == (4, 2)
    assert value["llama.rope.freq_base"] == 10000.0
    assert (value["tokenizer.ggml.model"], value["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert value["tokenizer.ggml.eos_token_id"] == hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert value["tokenizer.ggml.add_bos_token"] is False
    assert value["tokenizer.chat_template"] == hf_tokenizer.chat_template
    types = value["tokenizer.ggml.token_type"]
    assert types[hf_tokenizer.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    assert types[hf_tokenizer.convert_tokens_to_ids("Hello")] == gguf.TokenType.NORMAL
    assert oct(tiny_gguf.stat().st_mode & 0o777) == "0o600"


def assert_llamacpp_tokenizes_like(gguf_path: Path, hf_tokenizer, texts: list[str] = TEXTS) -> None:
    """llama.cpp's tokens of ``texts`` and of a chat are transformers' own, and decode back to the text."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    for text in texts:
        expected = hf_tokenizer.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
        assert llm.detokenize(expected, special=True).decode() == text
    chat = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": TEXTS[1]}, {"role": "assistant", "content": TEXTS[2]}], tokenize=False
    )
    expected = hf_tokenizer.encode(chat, add_special_tokens=False)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == expected
    llm.close()


def test_llamacpp_tokenizes_exactly_like_transformers(tiny_gguf, hf_tokenizer):
    assert_llamacpp_tokenizes_like(tiny_gguf, hf_tokenizer)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_llama3_and_qwen2_splits_tokenize_like_transformers(pre, tiny_model_dir, tmp_path):
    """A tokenizer with Llama 3's or Qwen2's split, as transformers' GGUF import writes them."""
    from transformers import AutoTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
    )

    from assistant.nano.tokenizer import save, train_tokenizer

    folder = tmp_path / pre
    shutil.copytree(tiny_model_dir, folder)
    # trained on TEXTS, the vocabulary merges digits, which these splits keep apart and GPT-2's does not
    save(train_tokenizer(TEXTS * 20, vocab_size=400), folder)
    gpt2_tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS[pre]}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    split_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert any(  # the split matters on these texts
        split_tokenizer.encode(text, add_special_tokens=False) != gpt2_tokenizer.encode(text, add_special_tokens=False)
        for text in TEXTS
    )
    exported = export_model(folder, tmp_path / f"{pre}.gguf")
    assert gguf.GGUFReader(exported).fields["tokenizer.ggml.pre"].contents() == pre
    assert_llamacpp_tokenizes_like(exported, split_tokenizer)


def test_sentencepiece_bpe_tokenizes_like_transformers(tiny_model_dir, tmp_path):
    """A Gemma-style tokenizer (BPE over spaces spelt "▁", byte tokens for characters it lacks) goes as
    llama.cpp's SentencePiece tokenizer, scored by merge rank, and tokenizes exactly as transformers."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import AutoTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # trained on the ASCII texts only, so the accents, CJK and emoji of the others fall back to bytes
    ascii_texts = [text for text in TEXTS if text.isascii()]
    tokenizer.train_from_iterator(ascii_texts * 20, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    spec = json.loads(tokenizer.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]  # after the specials, as in Gemma's vocabulary
    spec["model"]["vocab"] = {
        **{token: i for token, i in trained[: len(specials)]},
        **{token: len(specials) + i for i, token in enumerate(byte_tokens)},
        **{token: i + len(byte_tokens) for token, i in trained[len(specials) :]},
    }
    # In "qjk" transformers merges j+k first (rank 0); a tokenizer blind to merge order would take q+j.
    for token in ["q", "j", "k", "jk", "qj"]:
        spec["model"]["vocab"].setdefault(token, len(spec["model"]["vocab"]))
    spec["model"]["merges"] = [["j", "k"], ["q", "j"], *spec["model"]["merges"]]
    folder = shutil.copytree(tiny_model_dir, tmp_path / "sentencepiece")
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
    }))
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<0xC3>" in hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode(TEXTS[1], add_special_tokens=False))
    assert hf_tokenizer.tokenize("qjk") == ["q", "jk"]
    exported = export_model(folder, tmp_path / "sentencepiece.gguf")
    assert gguf.GGUFReader(exported).fields["tokenizer.ggml.model"].contents() == "llama"
    assert_llamacpp_tokenizes_like(exported, hf_tokenizer, [*TEXTS, "qjk jkqjk"])


def test_f32_logits_equal_torch(tiny_model_dir, tiny_gguf, sample_ids):
    difference = np.abs(llamacpp_logits(tiny_gguf, sample_ids) - torch_logits(tiny_model_dir, sample_ids))
    assert difference.max() < F32_LOGIT_TOLERANCE


def test_f16_logits_close_to_torch(tiny_model_dir, tiny_gguf, tmp_path, sample_ids):
    half = export_model(tiny_model_dir, tmp_path / "tiny-f16.gguf", dtype="f16")
    assert half.stat().st_size < 0.6 * tiny_gguf.stat().st_size
    assert gguf.GGUFReader(half).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    difference = np.abs(llamacpp_logits(half, sample_ids) - torch_logits(tiny_model_dir, sample_ids))
    assert difference.max() < F16_LOGIT_TOLERANCE


def test_tied_embeddings_without_lm_head(tiny_model_dir, tmp_path, sample_ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, tie_word_embeddings=True)
    model.tie_weights()
    tied_dir = tmp_path / "tied"
    model.save_pretrained(tied_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tied_dir / name)
    exported = export_model(tied_dir, tmp_path / "tied.gguf")
    assert "output.weight" not in {tensor.name for tensor in gguf.GGUFReader(exported).tensors}
    difference = np.abs(llamacpp_logits(exported, sample_ids) - torch_logits(tied_dir, sample_ids))
    assert difference.max() < F32_LOGIT_TOLERANCE


def test_transformers_4_config_with_top_level_rope_theta(tiny_model_dir, tmp_path):
    old_style = tmp_path / "old-style"
    shutil.copytree(tiny_model_dir, old_style)
    config = json.loads((old_style / "config.json").read_text())
    del config["rope_parameters"]
    config["rope_theta"] = 500000.0
    (old_style / "config.json").write_text(json.dumps(config))
    exported = export_model(old_style, tmp_path / "old.gguf")
    assert gguf.GGUFReader(exported).fields["llama.rope.freq_base"].contents() == 500000.0


def test_lora_gives_peft_logits(tiny_model_dir, tiny_gguf, tmp_path, sample_ids):
    peft_dir = make_peft_lora(tiny_model_dir, tmp_path / "lora", seed=1)
    adapter = export_lora(peft_dir, tmp_path / "lora.gguf", arch="llama", n_head=4, n_head_kv=2)
    fields = gguf.GGUFReader(adapter).fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 8.0
    expected = torch_logits(tiny_model_dir, sample_ids, [(peft_dir, 1.0)])
    assert np.abs(expected - torch_logits(tiny_model_dir, sample_ids)).max() > 0.1  # the LoRA matters
    assert np.abs(llamacpp_logits(tiny_gguf, sample_ids, adapter) - expected).max() < F32_LOGIT_TOLERANCE


def test_rslora_with_per_module_ranks_gives_peft_logits(tiny_model_dir, tiny_gguf, tmp_path, sample_ids):
    peft_dir = make_peft_lora(
        tiny_model_dir, tmp_path / "lora", seed=2, r=8, lora_alpha=4, use_rslora=True, rank_pattern={"q_proj": 2}
    )
    adapter = export_lora(peft_dir, tmp_path / "lora.gguf", arch="llama", n_head=4, n_head_kv=2)
    expected = torch_logits(tiny_model_dir, sample_ids, [(peft_dir, 1.0)])
    assert np.abs(llamacpp_logits(tiny_gguf, sample_ids, adapter) - expected).max() < F32_LOGIT_TOLERANCE


def test_missing_or_corrupt_input_names_the_file(tiny_model_dir, tmp_path):
    with pytest.raises(BackendError, match="config.json"):
        export_model(tmp_path, tmp_path / "out.gguf")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BackendError, match="model.safetensors"):
        export_model(broken, tmp_path / "out.gguf")
    with pytest.raises(BackendError, match="adapter_config.json"):
        export_lora(tmp_path, tmp_path / "out.gguf", arch="llama", n_head=4, n_head_kv=2)
    assert not list(tmp_path.glob("*gguf*"))  # neither a result nor a leftover temporary file


def test_failed_export_keeps_the_previous_file(tiny_model_dir, tiny_gguf, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").write_text("{not json")
    target = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf, target)
    with pytest.raises(BackendError, match="tokenizer.json"):
        export_model(broken, target)
    assert target.read_bytes() == tiny_gguf.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "model.gguf"]


def test_unknown_families_are_refused_by_name(tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError, match="MistralForCausalLM cannot be exported to GGUF"):
        export_model(other, tmp_path / "other.gguf")
    assert not list(tmp_path.glob("*gguf*"))
