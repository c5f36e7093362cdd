"""Training the bundled model is reproducible: the same seed gives the same weights, bit for bit."""

import hashlib

from assistant.nano.train import train


def test_the_same_seed_trains_the_same_model(tmp_path):
    digests = []
    for run in ("a", "b"):
        info = train(tmp_path / run, seed=3, steps=3, batch_size=2, lr=1e-3, corpus_sessions=200)
        digests.append(hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest())
        assert info["steps"] == 3 and info["seed"] == 3
    assert digests[0] == digests[1]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
