"""The torch block trainer against the torch chat engine and PEFT, on the tiny random Llama."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch
from helpers import (
    COMPLETIONS,
    SPEC,
    chat_engine_logits,
    cross_entropy,
    prompts_of,
    token_batch,
)

from backends import ops, torch_trainer
from backends.base import Adapter, BackendError, BlockTrainer, LoraSpec, Sampling
from backends.select import open_trainer
from backends.torch_trainer import TorchBlockTrainer


@pytest.fixture
def trainer(tiny_model_dir, frozen) -> TorchBlockTrainer:
    return TorchBlockTrainer(tiny_model_dir, frozen, SPEC, lr=1e-2, seed=0, device="cpu")


def frozen_state(trainer: TorchBlockTrainer) -> dict[str, torch.Tensor]:
    """Every weight except the new block's: base model and older blocks."""
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()
            if ".new." not in name}


def test_implements_the_protocol_and_opens_by_name(tiny_model_dir, trainer):
    assert isinstance(trainer, BlockTrainer)
    assert (trainer.name, trainer.context_length, trainer.ops) == ("torch", 512, ops.TORCH_OPS)
    opened = open_trainer("torch", tiny_model_dir, spec=SPEC)
    assert isinstance(opened, TorchBlockTrainer) and opened.block_names == []
    with pytest.raises(BackendError, match="cannot train"):
        open_trainer("llamacpp", tiny_model_dir)


def test_only_the_new_block_trains(trainer):
    trainable = {name for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert trainable and all(".new." in name for name in trainable)
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == {
        id(p) for p in trainer.new_parameters}
    assert len(trainable) == 2 * 7 * 2  # A and B on seven projections in two layers
    assert all(not layer.lora_B["new"].weight.any() for layer in trainer.new_layers.values())


@pytest.mark.parametrize("older", [0, 1, 2])
def test_growth_computes_exactly_the_old_stack(tiny_model_dir, frozen, backend, older):
    trainer = TorchBlockTrainer(tiny_model_dir, frozen[:older], SPEC, seed=older, device="cpu")
    prefixes, completions = token_batch(trainer)
    grown, mask = trainer.completion_logits(prefixes, completions, new_block=True)
    old, _ = trainer.completion_logits(prefixes, completions, new_block=False)
    bare = chat_engine_logits(backend, prefixes, completions, trainer.pad_token_id)
    backend.set_adapters(frozen[:older])
    assert torch.equal(grown, old)
    assert torch.equal(grown, chat_engine_logits(backend, prefixes, completions, trainer.pad_token_id))
    assert torch.equal(grown, bare) == (older == 0)
    assert grown.shape == (3, max(map(len, completions)), len(trainer.tokenizer))
    assert mask.tolist() == [[1.0] * len(c) + [0.0] * (grown.shape[1] - len(c)) for c in completions]


def test_row_t_predicts_completion_token_t(trainer, backend, frozen):
    backend.set_adapters(frozen)
    prefixes, completions = token_batch(trainer)
    logits, _ = trainer.completion_logits(prefixes, completions, new_block=False)
    logprobs = torch.log_softmax(logits, dim=-1)
    for row, completion in enumerate(completions):
        prompt = trainer.tokenizer.decode(prefixes[row])
        expected = torch.tensor(backend.token_logprobs(prompt, COMPLETIONS[row]))
        ours = logprobs[row, torch.arange(len(completion)), torch.tensor(completion)]
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_steps_lower_the_loss_and_touch_only_the_new_block(trainer):
    prefixes, completions = token_batch(trainer)
    before = frozen_state(trainer)
    old, _ = trainer.completion_logits(prefixes, completions, new_block=False)
    losses = [trainer.train_step(prefixes, completions, cross_entropy) for _ in range(5)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.1
    after = frozen_state(trainer)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(trainer.completion_logits(prefixes, completions, new_block=False)[0], old)
    grown, mask = trainer.completion_logits(prefixes, completions, new_block=True)
    assert not torch.equal(grown, old)
    assert cross_entropy(grown, torch.tensor([c + [0] * (mask.shape[1] - len(c)) for c in completions]),
                         mask) < losses[-1]


def test_rows_of_unlike_length_go_through_in_groups_with_the_same_logits_and_gradient(trainer, monkeypatch):
    short, long = trainer.encode("Hi"), trainer.encode("A much longer prompt " * 20)
    prefixes = [short, long, short + short, long[:-3]]
    completions = [trainer.encode(" yes"), trainer.encode(" no thanks"), trainer.encode(" a"), trainer.encode(" b c")]
    lengths = [len(p) + len(c) for p, c in zip(prefixes, completions)]
    assert torch_trainer.length_groups(lengths) == [[0, 2], [3, 1]]  # the short pair leaves the long pair's padding
    trainer.train_step(prefixes, completions, cross_entropy)  # a non-zero block, so the gradient reaches A too
    grouped, mask = trainer.completion_logits(prefixes, completions, new_block=True)
    norm = trainer.gradient_norm(prefixes, completions, cross_entropy)
    monkeypatch.setattr(torch_trainer, "GROUP_OVERHEAD_TOKENS", 10**6)  # one pass, padded to the longest row
    assert torch_trainer.length_groups(lengths) == [[0, 2, 3, 1]]
    padded = trainer.completion_logits(prefixes, completions, new_block=True)[0]
    torch.testing.assert_close(padded * mask[..., None], grouped * mask[..., None], rtol=0, atol=1e-5)
    assert trainer.gradient_norm(prefixes, completions, cross_entropy) == pytest.approx(norm, rel=1e-5)


def test_like_lengths_stay_one_pass_and_each_row_is_in_one_group():
    assert torch_trainer.length_groups([50, 52, 51]) == [[0, 2, 1]]
    groups = torch_trainer.length_groups([53, 50, 120, 55, 118, 300, 52, 49])
    assert sorted(i for group in groups for i in group) == list(range(8)) and len(groups) == 3
    assert groups[-1] == [5]


def test_a_non_finite_loss_is_refused_without_a_step(trainer):
    prefixes, completions = token_batch(trainer)
    weights = [param.detach().clone() for param in trainer.new_parameters]
    with pytest.raises(BackendError, match="not finite"):
        trainer.train_step(prefixes, completions, lambda *arrays: cross_entropy(*arrays) / 0)
    assert all(torch.equal(w, p) for w, p in zip(weights, trainer.new_parameters))
    assert all(p.grad is None for p in trainer.new_parameters)


def test_gradient_norm_scores_without_changing_anything(trainer):
    prefixes, completions = token_batch(trainer)
    weights = [param.detach().clone() for param in trainer.new_parameters]
    norm = trainer.gradient_norm(prefixes, completions, cross_entropy)
    assert norm > 0  # B = 0 zeroes the gradient of A, not that of B
    assert all(torch.equal(w, p) for w, p in zip(weights, trainer.new_parameters))
    assert all(p.grad is None for p in trainer.model.parameters())
    assert trainer.gradient_norm(prefixes, completions, cross_entropy) == norm  # nothing accumulated
    trainer.train_step(prefixes, completions, cross_entropy)
    assert trainer.gradient_norm(prefixes, completions, cross_entropy) != norm


def test_block_scales_rescale_and_drop_older_blocks(trainer, backend, frozen):
    prefixes, completions = token_batch(trainer)
    trainer.train_step(prefixes, completions, cross_entropy)
    trainer.set_block_scales([0.0, 1.0])
    backend.set_adapters(frozen[1:])
    expected = chat_engine_logits(backend, prefixes, completions, trainer.pad_token_id)
    assert torch.equal(trainer.completion_logits(prefixes, completions, new_block=False)[0], expected)
    trainer.set_block_scales([0.5, -1.5])
    backend.set_adapters([Adapter(frozen[0].path, 0.5), Adapter(frozen[1].path, -1.5)])
    expected = chat_engine_logits(backend, prefixes, completions, trainer.pad_token_id)
    assert torch.equal(trainer.completion_logits(prefixes, completions, new_block=False)[0], expected)
    with pytest.raises(ValueError, match="2 frozen blocks"):
        trainer.set_block_scales([1.0])


def test_saved_block_is_a_private_peft_folder_the_chat_engine_wears(trainer, backend, frozen, tmp_path):
    prefixes, completions = token_batch(trainer)
    for _ in range(3):
        trainer.train_step(prefixes, completions, cross_entropy)
    folder = tmp_path / "blocks" / "night-1"
    trainer.save_new_block(folder)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE((folder / name).stat().st_mode) == 0o600 for name in os.listdir(folder))
    assert os.listdir(folder.parent) == ["night-1"]  # no temporary folder left behind
    backend.set_adapters([*frozen, Adapter(folder, 1.0)])
    grown, _ = trainer.completion_logits(prefixes, completions, new_block=True)
    worn = chat_engine_logits(backend, prefixes, completions, trainer.pad_token_id)
    torch.testing.assert_close(worn, grown, rtol=0, atol=1e-5)
    with pytest.raises(BackendError, match="already exists"):
        trainer.save_new_block(folder)


def test_a_saved_block_restarts_training_where_it_was(tiny_model_dir, trainer, frozen, tmp_path):
    prefixes, completions = token_batch(trainer)
    trainer.train_step(prefixes, completions, cross_entropy)
    trainer.save_new_block(tmp_path / "start")
    resumed = TorchBlockTrainer(tiny_model_dir, frozen, SPEC, seed=5, device="cpu", init_block=tmp_path / "start")
    assert torch.equal(resumed.completion_logits(prefixes, completions, new_block=True)[0],
                       trainer.completion_logits(prefixes, completions, new_block=True)[0])
    with pytest.raises(BackendError, match=re.escape(str(tmp_path / "start"))):
        TorchBlockTrainer(tiny_model_dir, frozen, LoraSpec(rank=2, alpha=8), init_block=tmp_path / "start")


def test_blocks_for_another_model_are_refused(tiny_model_dir, tiny_adapters):
    with pytest.raises(BackendError, match=re.escape(str(tiny_adapters["other_model"]))):
        TorchBlockTrainer(tiny_model_dir, [Adapter(tiny_adapters["other_model"], 1.0)], SPEC)
    with pytest.raises(BackendError, match="adapter_config.json"):
        TorchBlockTrainer(tiny_model_dir, [Adapter(tiny_model_dir / "missing", 1.0)], SPEC)


def test_batched_greedy_generation_matches_the_chat_engine(trainer, backend, frozen, tmp_path):
    prompts = prompts_of(trainer)
    greedy = Sampling(max_tokens=16)
    backend.set_adapters(frozen)
    assert trainer.generate(prompts, greedy, new_block=False) == [
        "".join(backend.stream(prompt, greedy)) for prompt in prompts]
    prefixes, completions = token_batch(trainer)
    for _ in range(3):
        trainer.train_step(prefixes, completions, cross_entropy)
    trainer.save_new_block(tmp_path / "night")
    backend.set_adapters([*frozen, Adapter(tmp_path / "night", 1.0)])
    assert trainer.generate(prompts, greedy, new_block=True) == [
        "".join(backend.stream(prompt, greedy)) for prompt in prompts]


def test_each_row_stops_at_its_own_end_of_turn(trainer, backend, frozen):
    """Pretend a token the first prompt greedily writes ends the turn: that row stops before it,
    the others go on exactly as the chat engine with the same end token."""
    prompts = prompts_of(trainer)
    backend.set_adapters(frozen)
    first = torch.tensor([trainer.encode(prompts[0])])
    with torch.no_grad():
        written = backend.model.generate(first, max_new_tokens=12, do_sample=False)[0, first.shape[1]:].tolist()
    stop_at = next(i for i, token in enumerate(written) if i > 0 and token not in written[:i])
    usual = backend.end_token_ids
    trainer.end_token_ids = backend.end_token_ids = frozenset({written[stop_at]})
    try:
        texts = trainer.generate(prompts, Sampling(max_tokens=12), new_block=False)
        assert texts[0] == backend.tokenizer.decode(written[:stop_at])
        assert texts == ["".join(backend.stream(prompt, Sampling(max_tokens=12))) for prompt in prompts]
    finally:
        trainer.end_token_ids = backend.end_token_ids = usual
    assert trainer.decode(trainer.encode("Hi<|im_end|>")) == "Hi"  # special tokens never reach the text


def test_generation_in_small_batches_keeps_each_prompts_answer(trainer, monkeypatch):
    """Prompts decode a few at a time, shortest first; the answers come back in the prompts' order,
    the same as decoded all together."""
    prompts = prompts_of(trainer)
    prompts = [prompts[0] + " more words here", *prompts, prompts[-1][:5]]
    greedy = Sampling(max_tokens=12)
    together = trainer.generate(prompts, greedy, new_block=False)
    monkeypatch.setattr(trainer, "generate_batch", 2)
    assert trainer.generate(prompts, greedy, new_block=False) == together
    assert len(set(together)) > 1


def test_sampling_is_seeded(trainer):
    prompts = prompts_of(trainer)
    hot = Sampling(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    first = trainer.generate(prompts, hot, new_block=True)
    assert first == trainer.generate(prompts, hot, new_block=True)
    assert first != trainer.generate(prompts, Sampling(max_tokens=16, temperature=1.0, top_p=0.9, seed=8),
                                     new_block=True)
    assert trainer.generate([], hot, new_block=True) == []
    with pytest.raises(BackendError, match="context"):
        trainer.generate(["Hi " * 600], hot, new_block=True)


def test_saved_block_runs_on_llama_cpp(trainer, backend, frozen, tmp_path):
    """llama.cpp converts the saved folder itself (adapter.gguf inside it) and agrees with torch."""
    pytest.importorskip("llama_cpp")
    from backends.gguf_export import export_model
    from backends.select import open_backend

    prefixes, completions = token_batch(trainer)
    for _ in range(3):
        trainer.train_step(prefixes, completions, cross_entropy)
    trainer.save_new_block(tmp_path / "night")
    stack = [*frozen, Adapter(tmp_path / "night", 1.0)]
    llama = open_backend("llamacpp", gguf_path=export_model(trainer.hf_dir, tmp_path / "tiny.gguf"))
    try:
        prompt = prompts_of(trainer)[0]
        backend.set_adapters(frozen)
        before = torch.tensor(backend.token_logprobs(prompt, COMPLETIONS[0]))
        backend.set_adapters(stack)
        expected = torch.tensor(backend.token_logprobs(prompt, COMPLETIONS[0]))
        assert (expected - before).abs().max() > 1e-2
        llama.set_adapters(stack)
        worn = torch.tensor(llama.token_logprobs(prompt, COMPLETIONS[0]))
        torch.testing.assert_close(worn, expected, rtol=0, atol=1e-4)
    finally:
        llama.close()


def test_a_bf16_trainer_keeps_the_zero_init_exact_trains_its_fp32_block_and_is_chosen_where_it_pays(tiny_model_dir):
    trainer = TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), lr=1e-2, seed=0, device="cpu",
                                precision="bf16")
    assert trainer.precision == "bfloat16" and all(p.dtype == torch.float32 for p in trainer.new_parameters)
    prefix, completion = [trainer.encode("Where do I live?")], [trainer.encode(" In Quito.")]
    frozen, _ = trainer.completion_logits(prefix, completion, new_block=False)
    grown, _ = trainer.completion_logits(prefix, completion, new_block=True)
    assert torch.equal(frozen, grown)  # B = 0 adds exact zeros in bf16 too

    def loss(logits, targets, mask):
        return -(torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] * mask).sum() / mask.sum()

    losses = [trainer.train_step(prefix, completion, loss) for _ in range(5)]
    assert losses[-1] < losses[0]
    trainer.close()
    # a tiny model gains nothing from bf16: "auto" leaves it as the chat engine loads it
    assert TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), device="cpu",
                             precision="auto").precision == "float32"
    with pytest.raises(BackendError, match="unknown precision"):
        TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), device="cpu", precision="fp8")


def test_bf16_decoding_multiplies_by_the_head_once_not_by_a_copy_per_prompt(tiny_model_dir):
    from torch.profiler import ProfilerActivity, profile

    trainer = TorchBlockTrainer(tiny_model_dir, [], LoraSpec(rank=4, alpha=8.0), device="cpu", precision="bf16")
    head = trainer.model.get_output_embeddings().weight
    prompts = [trainer.render_chat([{"role": "user", "content": "Where do I live? " * (1 + i)}]) for i in range(4)]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as run:
        trainer.generate(prompts, Sampling(max_tokens=2, temperature=0.0), new_block=True)
    shapes = [shape for event in run.events() for shape in event.input_shapes if isinstance(shape, list)]
    assert shapes and not [s for s in shapes if len(s) == 3 and s[0] > 1 and sorted(s[1:]) == sorted(head.shape)]
    trainer.close()
