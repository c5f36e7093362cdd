"""The bundled model: its files, its tokenizer, its chat template, and that it reads its context."""

from __future__ import annotations

import json
import shutil

import pytest

from assistant.models import NANO_DIR
from assistant.nano import evaluate
from assistant.nano.tokenizer import CHAT_TEMPLATE
from assistant.nano.world import World
from backends.base import BackendError, Sampling
from backends.select import open_backend

pytestmark = pytest.mark.skipif(not (NANO_DIR / "model.safetensors").is_file(), reason="nano model not built")

GREEDY = Sampling(max_tokens=40, temperature=0.0)

@pytest.fixture(scope="module")
def nano():
    backend = open_backend("torch", hf_dir=NANO_DIR)
    yield backend
    backend.close()


def test_the_shipped_files_are_small_real_and_loadable_by_transformers():
    from transformers import AutoConfig, AutoTokenizer

    total = sum(f.stat().st_size for f in NANO_DIR.iterdir())
    assert total < 50 * 1024 * 1024
    assert AutoConfig.from_pretrained(NANO_DIR).architectures == ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(NANO_DIR)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert json.loads((NANO_DIR / "training.json").read_text())["seed"] == 0


def test_the_tokenizer_round_trips_text_and_the_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(NANO_DIR)
    for text in ["My dog is called Rex.", "Zoë lives in Kraków 🐕\n\ttabs", "Where is John?", "ümlaut – dash"]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2
    assert tokenizer.eos_token == "<|im_end|>"


def test_the_shipped_model_answers_from_its_context(nano):
    messages = [
        {"role": "user", "content": "My sister is called Freya. I live in Turin."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "What is my sister's name?"},
    ]
    reply = "".join(nano.stream(nano.render_chat(messages), GREEDY))
    assert "Freya" in reply


def test_the_shipped_model_reads_a_babi_story(nano):
    story = "Mary moved to the bathroom.\nJohn went to the hallway.\nMary travelled to the office.\nWhere is Mary?"
    reply = "".join(nano.stream(nano.render_chat([{"role": "user", "content": story}]), GREEDY))
    assert evaluate.answered(reply, "office") and not evaluate.answered(reply, "bathroom")


def test_the_shipped_model_finds_the_asked_persons_room_not_the_last_one(nano):
    replies = []
    for first, second in [("Mary", "John"), ("Sandra", "Daniel"), ("John", "Mary")]:
        story = f"{first} moved to the bathroom.\n{second} went to the hallway.\nWhere is {first}?"
        replies.append("".join(nano.stream(nano.render_chat([{"role": "user", "content": story}]), GREEDY)))
    assert all(evaluate.answered(reply, "bathroom") for reply in replies), replies


def test_the_shipped_model_writes_answerable_questions(nano):
    session = World(7, heldout=True).telling_session(3)
    from assistant.sleep.teach import ASK, parse_questions

    request = session.chat() + [{"role": "user", "content": ASK}]
    reply = "".join(nano.stream(nano.render_chat(request), Sampling(max_tokens=96)))

    questions = parse_questions(reply)
    assert questions and all(q in session.answerable for q in questions)


def test_a_gguf_export_of_the_shipped_model_chats_in_llama_cpp(tmp_path, nano):
    pytest.importorskip("llama_cpp")
    from backends.gguf_export import export_model

    gguf = export_model(NANO_DIR, tmp_path / "nano.gguf")
    llama = open_backend("llamacpp", gguf_path=gguf)
    try:
        prompt = nano.render_chat([{"role": "user", "content": "My dog is called Rex. What is my dog's name?"}])
        assert "".join(llama.stream(prompt, GREEDY)) == "".join(nano.stream(prompt, GREEDY))
    finally:
        llama.close()


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_damaged_weights_give_one_line_naming_the_file(tmp_path, damage):
    copy = tmp_path / "nano"
    shutil.copytree(NANO_DIR, copy)
    weights = copy / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    with pytest.raises(BackendError) as error:
        open_backend("torch", hf_dir=copy)
    message = str(error.value)
    assert "\n" not in message
    assert "model.safetensors" in message or str(copy) in message
