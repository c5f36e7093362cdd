"""A night's block scaled before it goes live: the change to the weights scales, nothing else."""

from __future__ import annotations

import pytest
import torch

from assistant.adapters import scaled


def test_scaling_the_factors_scales_the_change_to_the_weights():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, generator=generator), torch.randn(16, 4, generator=generator)
    scaled_a, scaled_b = scaled([a, b], 0.7)
    assert torch.allclose(scaled_b @ scaled_a, 0.7 * (b @ a), atol=1e-6)
    assert a.norm() > scaled_a.norm()  # a copy: the given state is untouched
    assert torch.equal(scaled([a, b], 1.0)[0], a)


def test_an_engines_dict_of_factor_pairs_keeps_its_shape():
    state = {"layers.0.mlp.up_proj": (torch.ones(2, 3), torch.ones(3, 2))}
    result = scaled(state, 0.25)
    assert list(result) == list(state) and isinstance(result["layers.0.mlp.up_proj"], tuple)
    down, up = result["layers.0.mlp.up_proj"]
    assert torch.allclose(down @ up, 0.25 * (state["layers.0.mlp.up_proj"][0] @ state["layers.0.mlp.up_proj"][1]))


def test_a_negative_scale_is_refused():
    with pytest.raises(ValueError, match="negative"):
        scaled([torch.ones(1)], -0.5)
