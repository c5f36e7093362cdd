"""Training the bundled model is reproducible: the same seed gives the same weights, bit for bit."""

import hashlib
import re

from assistant.nano import evaluate
from assistant.nano.train import train


def test_the_same_seed_trains_the_same_model(tmp_path):
    digests = []
    for run in ("a", "b"):
        info = train(tmp_path / run, seed=3, steps=3, batch_size=2, lr=1e-3, corpus_sessions=200)
        digests.append(hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest())
        assert info["steps"] == 3 and info["seed"] == 3
    assert digests[0] == digests[1]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_the_training_log_reads_babi_stories_beside_the_loss(tmp_path, capsys):
    folder = tmp_path / "babi"
    folder.mkdir()
    story = "1 Mary moved to the bathroom.\n2 John went to the hallway.\n3 Where is Mary? \tbathroom\t1\n"
    (folder / evaluate.BABI_FILE).write_text(story)
    train(tmp_path / "m", seed=3, steps=4, batch_size=2, lr=1e-3, log_every=1, corpus_sessions=200, babi=folder)
    last = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step 4/4"))
    assert re.search(r"held-out answer loss \d+\.\d{3} in-context [01]\.\d{3} bAbI [01]\.000$", last), last


def test_invented_words_are_spelt_from_pieces_that_no_sentence_of_the_world_says():
    from transformers import AutoTokenizer

    from assistant.models import NANO_DIR
    from assistant.nano.train import word_pieces
    from assistant.nano.world import World

    pieces = set(word_pieces(AutoTokenizer.from_pretrained(NANO_DIR), World(2, invented_share=0.0)))
    assert {"ase", "ment"} <= pieces  # held-out "basement" is b-ase-ment: its pieces get copied in training
    assert not pieces & {"the", "to", "moved", "went", "is", "in", "my", "cat", "bedroom"}
    assert all(2 <= len(piece) <= 4 and piece.isalpha() for piece in pieces)
