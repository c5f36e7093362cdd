"""The imitation rewards on hand-made strings and vectors, with values worked out by hand."""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import pytest

from assistant.sleep.rewards import (
    EDIT_DISTANCE_THRESHOLD,
    cosine_reward,
    imitation_reward,
    levenshtein_reward,
    normalise_answer,
)

# ---------------------------------------------------------------- normalise_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Your dog is called Rex.", "your dog is called rex"),
        ("  «Rex!»\n", "rex"),
        ("¿Dónde está Rex?", "dónde está rex"),
        ("Rex's bowl holds 3.5 kg, mostly.", "rex's bowl holds 3.5 kg, mostly"),
        ("a \t\n  b", "a b"),
        ("ＲＥＸ ﬁnds it", "rex finds it"),  # NFKC: full-width letters, the fi ligature
        ("Straße", "strasse"),  # case folding, not just lower()
        ("$5 each", "$5 each"),  # symbols are not punctuation
        ("...", ""),
        ("", ""),
    ],
)
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


# ---------------------------------------------------------------- levenshtein_reward


def test_identical_and_differently_dressed_strings_score_one():
    assert levenshtein_reward("My sister lives in Porto.", "My sister lives in Porto.") == 1.0
    assert levenshtein_reward("Your dog is called Rex.", "your dog is called rex") == 1.0


def test_hand_computed_distance_and_the_cut_off():
    # kitten -> sitting: 3 edits, longer string 7 characters, normalised distance 3/7 = 0.43
    assert levenshtein_reward("kitten", "sitting", threshold=0.5) == pytest.approx(4 / 7)
    assert levenshtein_reward("kitten", "sitting", threshold=0.43) == pytest.approx(4 / 7)
    assert levenshtein_reward("kitten", "sitting", threshold=3 / 7) == 0.0  # strictly under z0
    assert levenshtein_reward("kitten", "sitting", threshold=0.42) == 0.0


def test_empty_strings():
    assert levenshtein_reward("", "") == 1.0
    assert levenshtein_reward(" . ", "") == 1.0  # empty once normalised
    assert levenshtein_reward("", "Rex") == 0.0
    assert levenshtein_reward("Rex", "", threshold=1.0) == 0.0


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café"), 1.0),
        ("naïve", "naive", 0.8),  # one code point of five
        ("🐶 Rex", "🐱 Rex", 0.8),
        ("我的狗叫雷克斯", "我的猫叫雷克斯", 6 / 7),
    ],
)
def test_unicode_counts_code_points(candidate, reference, expected):
    assert levenshtein_reward(candidate, reference, threshold=1.0) == pytest.approx(expected)


def test_default_threshold_pays_near_copies_and_not_unrelated_sentences():
    assert levenshtein_reward("My sister is called Alice.", "My sister is Alice.") > 0.7
    assert levenshtein_reward("Your dog is called Rex.", "The meeting is on Tuesday at three.") == 0.0
    assert levenshtein_reward("I work as a nurse in Lisbon.", "Thanks a lot, that was helpful.") == 0.0
    assert 0 < EDIT_DISTANCE_THRESHOLD <= 1


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, math.nan])
def test_bad_threshold_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        levenshtein_reward("a", "b", threshold=threshold)


# ---------------------------------------------------------------- cosine_reward


@pytest.mark.parametrize(
    ("u", "v", "expected"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 1.0),
        ([1.0, 2.0, 3.0], [10.0, 20.0, 30.0], 1.0),  # length does not matter
        ([1.0, 0.0], [0.5, math.sqrt(3) / 2], 0.5),  # 60 degrees
        ([1.0, 0.0], [0.0, 4.0], 0.0),  # orthogonal
        ([1.0, 0.0], [-1.0, 0.0], 0.0),  # opposite is clipped to nothing, not below it
        ([1.0, 0.0], [-0.5, math.sqrt(3) / 2], 0.0),  # 120 degrees
    ],
)
def test_cosine_mapping(u, v, expected):
    assert cosine_reward(u, v) == pytest.approx(expected)
    single = cosine_reward(np.array(u, dtype=np.float32), np.array(v, dtype=np.float32))
    assert single == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("u", "v", "message"),
    [
        ([0.0, 0.0], [1.0, 0.0], "non-zero"),
        ([1.0, math.nan], [1.0, 0.0], "finite"),
        ([1.0, 0.0], [1.0, 0.0, 0.0], "same length"),
        ([[1.0, 0.0]], [[1.0, 0.0]], "vectors"),
    ],
)
def test_cosine_refuses_what_has_no_cosine(u, v, message):
    with pytest.raises(ValueError, match=message):
        cosine_reward(u, v)


# ---------------------------------------------------------------- imitation_reward


def test_gamma_mixes_semantic_and_surface():
    surface = 4 / 7  # kitten / sitting, as above
    assert imitation_reward("kitten", "sitting", gamma=1.0, threshold=0.5, semantic=0.3) == pytest.approx(0.3)
    assert imitation_reward("kitten", "sitting", gamma=0.0, threshold=0.5, semantic=0.3) == pytest.approx(surface)
    assert imitation_reward("kitten", "sitting", gamma=0.25, threshold=0.5, semantic=0.3) == pytest.approx(
        0.25 * 0.3 + 0.75 * surface
    )
    assert imitation_reward("kitten", "sitting", gamma=0.0, threshold=0.4, semantic=0.3) == 0.0  # z0 passes through


def test_paraphrase_earns_only_its_semantic_share():
    reward = imitation_reward("Rex is your dog.", "Your dog is called Rex.", gamma=0.5, threshold=0.5, semantic=0.9)
    assert reward == pytest.approx(0.45)


@pytest.mark.parametrize("gamma", [0.0, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("semantic", [0.0, 0.6, 1.0])
@pytest.mark.parametrize(("candidate", "reference"), [("", ""), ("Rex", "rex."), ("kitten", "sitting"), ("a", "zzz")])
def test_reward_stays_between_its_parts(gamma, semantic, candidate, reference):
    surface = levenshtein_reward(candidate, reference)
    reward = imitation_reward(candidate, reference, gamma=gamma, semantic=semantic)
    assert 0.0 <= reward <= 1.0
    assert min(surface, semantic) - 1e-12 <= reward <= max(surface, semantic) + 1e-12


@pytest.mark.parametrize(
    ("gamma", "semantic", "name"),
    [(1.2, 0.5, "gamma"), (-0.1, 0.5, "gamma"), (0.5, 1.1, "semantic"), (0.5, math.nan, "semantic")],
)
def test_out_of_range_mixing_is_refused(gamma, semantic, name):
    with pytest.raises(ValueError, match=name):
        imitation_reward("a", "a", gamma=gamma, semantic=semantic)


def test_semantic_score_must_be_given():
    with pytest.raises(TypeError, match="semantic"):
        imitation_reward("a", "a")
