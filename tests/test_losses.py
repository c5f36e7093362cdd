"""The sleep losses on hand-made arrays: hand-computed values, torch's own KL, and torch == MLX.

Every loss runs through ``backends.ops``; the cross-engine tests feed the same NumPy inputs to
``TORCH_OPS`` and ``MLX_OPS`` and require the same numbers, and skip cleanly without MLX.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backends.ops
from assistant.sleep.losses import (
    completion_logprobs,
    generalized_jsd,
    group_advantages,
    policy_gradient_loss,
    seeding_objective,
)
from backends.ops import TORCH_OPS

try:
    import mlx.core as mx

    MLX_MISSING = ""
except (ImportError, OSError) as error:
    MLX_MISSING = f"mlx is not importable: {error}"

needs_mlx = pytest.mark.skipif(bool(MLX_MISSING), reason=MLX_MISSING or "mlx present")
ENGINE_OPS = ["torch", pytest.param("mlx", marks=needs_mlx)]
CROSS_ENGINE_TOLERANCE = 1e-5  # float32 on both, different kernels

TEACHER = [0.9, 0.1]
STUDENT = [0.5, 0.5]


@pytest.fixture(params=ENGINE_OPS)
def ops(request):
    return getattr(backends.ops, f"{request.param.upper()}_OPS")


def as_numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.array(array)


def logits_of(probabilities) -> np.ndarray:
    """Logits whose softmax is ``probabilities`` (one token, one row)."""
    return np.log(np.asarray(probabilities, dtype=np.float32))[None, :]


def kl(p, q) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def random_case(seed: int = 0):
    """Two batches of 5 tokens over a 7-word vocabulary, with prompt and padding masked out."""
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(2, 5, 7)).astype(np.float32)
    teacher = rng.normal(scale=2.0, size=(2, 5, 7)).astype(np.float32)
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=np.float32)
    return student, teacher, mask


# ---------------------------------------------------------------- generalized JSD


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_identical_distributions_are_zero_apart(ops, beta):
    student, _, mask = random_case()
    value = generalized_jsd(ops, ops.asarray(student), ops.asarray(student), ops.asarray(mask), beta)
    assert abs(float(as_numpy(value))) < 1e-6


@pytest.mark.parametrize(
    ("beta", "expected"),
    [
        (0.0, kl(TEACHER, STUDENT)),
        (1.0, kl(STUDENT, TEACHER)),
        (0.5, 0.5 * kl(TEACHER, [0.7, 0.3]) + 0.5 * kl(STUDENT, [0.7, 0.3])),
        (0.25, 0.25 * kl(TEACHER, [0.6, 0.4]) + 0.75 * kl(STUDENT, [0.6, 0.4])),
    ],
)
def test_hand_computed_two_word_values(ops, beta, expected):
    value = generalized_jsd(
        ops, ops.asarray(logits_of(STUDENT)), ops.asarray(logits_of(TEACHER)), ops.asarray([1.0]), beta
    )
    assert float(as_numpy(value)) == pytest.approx(expected, rel=1e-5)


def test_a_row_weighted_two_counts_as_that_row_twice():
    student, teacher, mask = random_case()
    weighted = mask * np.array([[2.0], [1.0]], dtype=np.float32)
    twice = [np.concatenate([a[:1], a]) for a in (student, teacher, mask)]

    def jsd(arrays, beta):
        return generalized_jsd(TORCH_OPS, *(torch.from_numpy(a) for a in arrays), beta).item()

    for beta in (0.0, 0.5, 1.0):
        value = jsd((student, teacher, weighted), beta)
        assert value == pytest.approx(jsd(twice, beta), rel=1e-6)
        assert value != pytest.approx(jsd((student, teacher, mask), beta), rel=1e-3)  # the weight matters


def test_beta_zero_is_torch_forward_kl_and_beta_one_its_reverse():
    student, teacher, mask = (torch.from_numpy(a) for a in random_case())
    student_logp, teacher_logp = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    forward = F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)
    reverse = F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True).sum(-1)
    tokens = mask.sum()
    assert generalized_jsd(TORCH_OPS, student, teacher, mask, 0.0).item() == pytest.approx(
        ((forward * mask).sum() / tokens).item(), rel=1e-5
    )
    assert generalized_jsd(TORCH_OPS, student, teacher, mask, 1.0).item() == pytest.approx(
        ((reverse * mask).sum() / tokens).item(), rel=1e-5
    )


def test_swapping_roles_mirrors_beta(ops):
    student, teacher, mask = (ops.asarray(a) for a in random_case())
    for beta in (0.0, 0.2, 0.5):
        one_way = generalized_jsd(ops, student, teacher, mask, beta)
        mirrored = generalized_jsd(ops, teacher, student, mask, 1 - beta)
        assert float(as_numpy(one_way)) == pytest.approx(float(as_numpy(mirrored)), rel=1e-5)


def test_ends_are_the_limits_of_the_mixture():
    """JSD(beta) / beta tends to forward KL as beta -> 0, JSD(beta) / (1 - beta) to reverse KL as beta -> 1."""
    student, teacher, mask = (torch.from_numpy(a).double() for a in random_case())
    small = 1e-5
    assert generalized_jsd(TORCH_OPS, student, teacher, mask, small).item() / small == pytest.approx(
        generalized_jsd(TORCH_OPS, student, teacher, mask, 0.0).item(), rel=1e-3
    )
    assert generalized_jsd(TORCH_OPS, student, teacher, mask, 1 - small).item() / small == pytest.approx(
        generalized_jsd(TORCH_OPS, student, teacher, mask, 1.0).item(), rel=1e-3
    )


def test_mask_excludes_tokens(ops):
    student, teacher, mask = random_case()
    value = generalized_jsd(ops, ops.asarray(student), ops.asarray(teacher), ops.asarray(mask), 0.5)
    scrambled = student.copy()
    scrambled[mask == 0] = 50.0  # wildly different where the mask is 0
    same = generalized_jsd(ops, ops.asarray(scrambled), ops.asarray(teacher), ops.asarray(mask), 0.5)
    first_token_only = np.zeros_like(mask)
    first_token_only[0, 1] = 1.0
    alone = generalized_jsd(ops, ops.asarray(student), ops.asarray(teacher), ops.asarray(first_token_only), 0.5)
    just_that_row = generalized_jsd(
        ops, ops.asarray(student[0, 1:2]), ops.asarray(teacher[0, 1:2]), ops.asarray([1.0]), 0.5
    )
    nothing = generalized_jsd(ops, ops.asarray(student), ops.asarray(teacher), ops.asarray(np.zeros_like(mask)), 0.5)
    assert float(as_numpy(same)) == pytest.approx(float(as_numpy(value)), rel=1e-6)
    assert float(as_numpy(alone)) == pytest.approx(float(as_numpy(just_that_row)), rel=1e-6)
    assert float(as_numpy(alone)) != pytest.approx(float(as_numpy(value)), rel=1e-3)
    assert float(as_numpy(nothing)) == 0.0


def test_boolean_and_integer_masks_count_like_float_ones():
    student, teacher, mask = (torch.from_numpy(a) for a in random_case())
    expected = generalized_jsd(TORCH_OPS, student, teacher, mask, 0.5).item()
    for other in (mask.bool(), mask.long()):
        assert generalized_jsd(TORCH_OPS, student, teacher, other, 0.5).item() == pytest.approx(expected)


def test_temperature_softens_both_distributions(ops):
    student, teacher, mask = random_case()
    warm = generalized_jsd(ops, ops.asarray(student), ops.asarray(teacher), ops.asarray(mask), 0.5, temperature=2.0)
    divided = generalized_jsd(ops, ops.asarray(student / 2), ops.asarray(teacher / 2), ops.asarray(mask), 0.5)
    plain = generalized_jsd(ops, ops.asarray(student), ops.asarray(teacher), ops.asarray(mask), 0.5)
    assert float(as_numpy(warm)) == pytest.approx(float(as_numpy(divided)), rel=1e-5)
    assert float(as_numpy(warm)) < float(as_numpy(plain))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradient_reaches_the_student_only_on_torch(beta):
    student, teacher, mask = (torch.from_numpy(a).requires_grad_(True) for a in random_case())
    generalized_jsd(TORCH_OPS, student, teacher, mask.detach(), beta).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0
    assert torch.all(student.grad[mask == 0] == 0)  # masked tokens get no push either


@needs_mlx
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradient_reaches_the_student_only_on_mlx(beta):
    from backends.ops import MLX_OPS

    student, teacher, mask = (mx.array(a) for a in random_case())
    grads = mx.grad(lambda s, t: generalized_jsd(MLX_OPS, s, t, mask, beta), argnums=(0, 1))(student, teacher)
    student_grad, teacher_grad = (np.array(g) for g in grads)
    assert np.all(teacher_grad == 0)
    assert np.abs(student_grad).sum() > 0


def test_bad_beta_and_temperature_are_refused():
    student, teacher, mask = (torch.from_numpy(a) for a in random_case())
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(TORCH_OPS, student, teacher, mask, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(TORCH_OPS, student, teacher, mask, 0.5, temperature=0.0)


# ---------------------------------------------------------------- RL pieces


def test_completion_logprobs_pick_the_sampled_tokens(ops):
    logits = ops.asarray(np.log(np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], dtype=np.float32)))
    picked = as_numpy(completion_logprobs(ops, logits, np.array([2, 0])))
    np.testing.assert_allclose(picked, np.log([0.5, 0.6]), rtol=1e-6)
    flatter = as_numpy(completion_logprobs(ops, logits, np.array([2, 0]), temperature=1e6))
    np.testing.assert_allclose(flatter, np.log([1 / 3, 1 / 3]), rtol=1e-4)


def test_group_advantages_hand_values(ops):
    advantages = as_numpy(group_advantages(ops, [0.0, 1.0], eps=0.0))
    np.testing.assert_allclose(advantages, [-1.0, 1.0], rtol=1e-6)
    spread = as_numpy(group_advantages(ops, [1.0, 2.0, 3.0, 6.0], eps=0.0))
    np.testing.assert_allclose(spread, np.array([-2.0, -1.0, 0.0, 3.0]) / math.sqrt(3.5), rtol=1e-6)


def test_group_advantages_sum_to_zero_with_unit_spread(ops):
    rewards = np.random.default_rng(1).uniform(size=8).astype(np.float32)
    advantages = as_numpy(group_advantages(ops, ops.asarray(rewards)))
    assert abs(advantages.sum()) < 1e-5
    assert np.sqrt(np.mean(advantages**2)) == pytest.approx(1.0, rel=1e-4)
    assert np.argmax(advantages) == np.argmax(rewards)


@pytest.mark.parametrize("rewards", [[0.1, 0.1, 0.1], [0.7] * 7, [0.3]])
def test_tied_group_gives_exact_zeros(ops, rewards):
    assert np.all(as_numpy(group_advantages(ops, rewards)) == 0.0)


def test_group_advantages_carry_no_gradient_and_refuse_empty_groups():
    rewards = torch.tensor([0.0, 1.0, 0.5], requires_grad=True)
    assert not group_advantages(TORCH_OPS, rewards).requires_grad
    with pytest.raises(ValueError, match="non-empty"):
        group_advantages(TORCH_OPS, [])
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(TORCH_OPS, [[0.0, 1.0]])


def test_policy_gradient_loss_hand_value(ops):
    token_logprobs = ops.asarray([[-1.0, -3.0, -9.0], [-2.0, -9.0, -9.0]])
    mask = ops.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = policy_gradient_loss(ops, token_logprobs, ops.asarray([1.0, 0.5]), mask)
    # sample 0: mean log-prob -2, sample 1: -2; -(1 * -2 + 0.5 * -2) / 2 = 1.5
    assert float(as_numpy(loss)) == pytest.approx(1.5)


def test_policy_gradient_step_raises_the_best_sample():
    """One SGD step on a 4-way toy policy raises the best sample's probability and lowers the worst's."""
    logits = torch.zeros(4, requires_grad=True)
    samples = np.array([0, 1, 2, 3])
    rewards = [0.1, 0.9, 0.4, 0.0]
    before = torch.softmax(logits, -1).detach().clone()
    token_logprobs = completion_logprobs(TORCH_OPS, logits.expand(4, 1, 4), samples[:, None])
    loss = policy_gradient_loss(TORCH_OPS, token_logprobs, group_advantages(TORCH_OPS, rewards), torch.ones(4, 1))
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    after = torch.softmax(logits, -1)
    assert after[1] > before[1]
    assert after[3] < before[3]
    assert torch.argmax(after) == 1


def test_seeding_objective_is_the_negated_paper_objective(ops):
    reward, divergence = ops.asarray([1.0, 3.0]), ops.asarray(1.0)
    # L_KS = E[(1 - alpha) r - alpha D] = 0.75 * 2 - 0.25 * 1 = 1.25, to maximise; the loss is -1.25
    assert float(as_numpy(seeding_objective(ops, reward, divergence, 0.25))) == pytest.approx(-1.25)
    assert float(as_numpy(seeding_objective(ops, reward, divergence, 0.0))) == pytest.approx(-2.0)
    assert float(as_numpy(seeding_objective(ops, reward, divergence, 1.0))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="alpha"):
        seeding_objective(ops, reward, divergence, -0.1)


def test_minimising_the_seeding_loss_raises_reward_and_lowers_divergence():
    reward = torch.tensor(0.0, requires_grad=True)
    divergence = torch.tensor(0.0, requires_grad=True)
    seeding_objective(TORCH_OPS, reward, divergence, 0.3).backward()
    assert reward.grad.item() == pytest.approx(-0.7)  # descent moves reward up
    assert divergence.grad.item() == pytest.approx(0.3)  # and divergence down


# ---------------------------------------------------------------- the same numbers on both engines


def _every_loss(ops):
    """Each loss of the module on one fixed set of inputs, as NumPy arrays."""
    student, teacher, mask = random_case(seed=3)
    tokens = np.random.default_rng(4).integers(0, 7, size=(2, 5))
    logprobs = completion_logprobs(ops, ops.asarray(student), tokens, temperature=0.7)
    advantages = group_advantages(ops, [0.2, 0.9])
    pg = policy_gradient_loss(ops, logprobs, advantages, ops.asarray(mask))
    jsd = {
        beta: generalized_jsd(ops, ops.asarray(student), ops.asarray(teacher), ops.asarray(mask), beta, 1.3)
        for beta in (0.0, 0.5, 1.0)
    }
    return {
        "completion_logprobs": logprobs,
        "group_advantages": advantages,
        "policy_gradient_loss": pg,
        **{f"generalized_jsd(beta={beta})": value for beta, value in jsd.items()},
        "seeding_objective": seeding_objective(ops, -pg, jsd[0.5], 0.4),
    }


@needs_mlx
def test_every_loss_gives_the_same_numbers_on_torch_and_mlx():
    from backends.ops import MLX_OPS

    on_torch, on_mlx = _every_loss(TORCH_OPS), _every_loss(MLX_OPS)
    for name, value in on_torch.items():
        np.testing.assert_allclose(
            as_numpy(on_mlx[name]), as_numpy(value), rtol=CROSS_ENGINE_TOLERANCE, atol=1e-6, err_msg=name
        )


@needs_mlx
def test_one_training_step_is_the_same_on_torch_and_mlx():
    """A JSD + policy-gradient step: autograd on torch, value_and_grad on MLX, same gradient."""
    from backends.ops import MLX_OPS

    student, teacher, mask = random_case(seed=5)
    tokens = np.random.default_rng(6).integers(0, 7, size=(2, 5))

    def loss(ops, student_logits):
        advantages = group_advantages(ops, [1.0, 0.0])
        pg = policy_gradient_loss(ops, completion_logprobs(ops, student_logits, tokens), advantages, ops.asarray(mask))
        jsd = generalized_jsd(ops, student_logits, ops.asarray(teacher), ops.asarray(mask))
        return seeding_objective(ops, -pg, jsd)

    torch_student = torch.from_numpy(student).requires_grad_(True)
    torch_value = loss(TORCH_OPS, torch_student)
    torch_value.backward()
    mlx_value, mlx_grad = mx.value_and_grad(lambda s: loss(MLX_OPS, s))(mx.array(student))
    assert float(as_numpy(mlx_value)) == pytest.approx(torch_value.item(), rel=CROSS_ENGINE_TOLERANCE)
    np.testing.assert_allclose(np.array(mlx_grad), as_numpy(torch_student.grad), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- backends.ops itself


def test_ops_module_imports_neither_engine_until_asked():
    code = (
        "import sys, backends.ops\n"
        "assert 'torch' not in sys.modules and 'mlx' not in sys.modules, sorted(sys.modules)\n"
        "backends.ops.TORCH_OPS\n"
        "assert 'torch' in sys.modules and 'mlx' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_ops_module_has_no_other_engines():
    with pytest.raises(AttributeError, match="CUDA_OPS"):
        backends.ops.CUDA_OPS  # noqa: B018
