"""Rewards for Learning to Imitate: how close the student's continuation is to the teacher's.

In LTI the student completes a prefix of a teacher sample d without the session in context; its
continuation d_hat earns r = gamma * r_sem + (1 - gamma) * r_abs. r_abs is a surface match
(normalised edit distance, cut off past a threshold z0), r_sem a meaning match judged elsewhere
(the teacher's own verdict, pooled hidden states or an embedding model) and passed in as a number.
Plain Python and NumPy: rewards are never differentiated.
"""

from __future__ import annotations

import unicodedata

import numpy as np
from rapidfuzz.distance import Levenshtein

# The paper leaves these open; they are starting points to be measured, not tuned results.
IMITATION_GAMMA = 0.5  # a personal fact needs both its exact form (a name, a number) and its meaning: equal weight
EDIT_DISTANCE_THRESHOLD = 0.5  # unrelated sentences measured 0.7-0.85 apart, so z0 = 0.5 pays no chance overlap


def normalise_answer(text: str) -> str:
    """``text`` as the comparison sees it: Unicode NFKC, case-folded, whitespace runs collapsed to
    one space, and punctuation and whitespace stripped from both ends.

    Why: "Your dog is called Rex." and "your dog is called rex" state the same thing; a reward
    that paid for the final full stop would teach formatting instead of the fact. Punctuation
    inside the text ("Rex's", "3.5") is kept, because there it carries meaning.
    """
    words = unicodedata.normalize("NFKC", text).casefold().split()
    collapsed = " ".join(words)
    start, end = 0, len(collapsed)
    while start < end and _is_edge_noise(collapsed[start]):
        start += 1
    while end > start and _is_edge_noise(collapsed[end - 1]):
        end -= 1
    return collapsed[start:end]


def levenshtein_reward(candidate: str, reference: str, threshold: float = EDIT_DISTANCE_THRESHOLD) -> float:
    """r_abs = 1 - Lev(c, r) / max(|c|, |r|) if that normalised distance is below ``threshold``, else 0.

    Why: the surface half of the imitation reward, and the threshold (the paper's z0) keeps the
    reward from paying for the chance overlap any two sentences share. Both strings go through
    ``normalise_answer`` first; distances count Unicode code points. Two strings empty after
    normalisation are identical (1.0); one empty and one not are at distance 1 (0.0).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    distance = Levenshtein.normalized_distance(candidate, reference, processor=normalise_answer)
    return 1.0 - distance if distance < threshold else 0.0


def cosine_reward(u, v) -> float:
    """Semantic similarity of two embedding vectors as max(0, cosine), in [0, 1].

    Why the clip rather than (1 + cos) / 2: embeddings of unrelated sentences sit near cosine 0,
    not -1, so the affine map would pay unrelated text about half the reward; a negative cosine
    means no shared meaning, which is worth nothing, as is zero.
    """
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if u.ndim != 1 or u.shape != v.shape:
        raise ValueError(f"embeddings must be two vectors of the same length, got shapes {u.shape} and {v.shape}")
    norms = np.linalg.norm(u) * np.linalg.norm(v)
    if not np.isfinite(norms) or norms == 0:
        raise ValueError("embeddings must be finite and non-zero to have a cosine")
    return float(np.clip(np.dot(u, v) / norms, 0.0, 1.0))


def imitation_reward(
    candidate: str,
    reference: str,
    *,
    gamma: float = IMITATION_GAMMA,
    threshold: float = EDIT_DISTANCE_THRESHOLD,
    semantic: float,
) -> float:
    """The LTI reward r = gamma * r_sem + (1 - gamma) * r_abs, in [0, 1].

    Why: the surface term alone punishes a correct paraphrase, the semantic term alone forgives a
    wrong name; mixing them rewards continuations that say the teacher's thing in nearly its words.
    ``semantic`` is r_sem in [0, 1], already judged by the caller (``cosine_reward`` of two
    embeddings, or the teacher's yes/no verdict as 1.0/0.0); ``threshold`` is z0 for r_abs.
    """
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0 <= semantic <= 1:
        raise ValueError(f"semantic must be in [0, 1], got {semantic}")
    return gamma * semantic + (1 - gamma) * levenshtein_reward(candidate, reference, threshold)


def _is_edge_noise(character: str) -> bool:
    """Whitespace or any Unicode punctuation (categories P*: . , ! ? « » ¿ 。 and so on)."""
    return character.isspace() or unicodedata.category(character).startswith("P")
