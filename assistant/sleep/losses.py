"""The sleep cycle's training objectives as pure functions of arrays, for torch and MLX alike.

Every function takes ``ops`` first (``backends.ops.TORCH_OPS`` or ``MLX_OPS``) and touches arrays
only through it, so the same code gives autograd graphs on torch and differentiable functions for
``mx.value_and_grad`` on MLX. Nothing here loads a model or samples: callers pass logits that are
already aligned with the completion (row t is the distribution that predicted completion token t)
and a mask that is 1 on completion tokens and 0 on prompt and padding.

Shapes: logits ``[..., T, V]``, masks and token log-probs ``[..., T]``; a group of samples is the
leading axis. Losses return a scalar array to minimise.
"""

from __future__ import annotations

import math

from backends.ops import ArrayOps

# The paper leaves these open; they are starting points to be measured, not tuned results.
# Forward KL(teacher || student), the beta = 0 end. Measured on the nano model (8 held-out facts, 60
# steps, everything else the night's defaults): recall of held-out phrasings 100% with beta = 0 and
# 12.5% with the symmetric beta = 0.5. A bounded divergence saturates exactly where a new fact sits:
# when the student gives the teacher's token almost no mass, JSD(0.5) is near ln 2 and its gradient
# near 0, while forward KL keeps pulling.
JSD_BETA = 0.0
# The divergence's weight; the LTI term gets 1 - alpha. Both terms are per-token means, but the
# policy gradient of a group of four with unit-spread advantages is the larger and far noisier one.
# Measured on the bench's first generated night (sleep seeds 0 and 3, 360 steps, both terms in one
# step): the block reproduced 85% and 80% of its own training answers at alpha = 0.5, 96% and 93%
# at 0.9 (98% and 93% with no LTI); recall of held-out phrasings 50%/40% and 53%/40%.
SEEDING_ALPHA = 0.9


def generalized_jsd(
    ops: ArrayOps, student_logits, teacher_logits, mask, beta: float = JSD_BETA, temperature: float = 1.0
):
    """Mean over completion tokens of the generalized Jensen-Shannon divergence JSD(beta).

    Why: Knowledge Seeding moves what the teacher (model + session in context) predicts into the
    student (grown model, no session) token by token, and GKD showed the choice of divergence
    matters: forward KL makes the student cover every teacher option, reverse KL makes it commit
    to the teacher's main one.

    Convention (GKD, TRL's GKDTrainer): with M = beta * teacher + (1 - beta) * student,
    JSD(beta) = beta * KL(teacher || M) + (1 - beta) * KL(student || M). The ends are taken as the
    limits of JSD(beta) / beta and JSD(beta) / (1 - beta), computed exactly: beta = 0 is forward
    KL(teacher || student), beta = 1 is reverse KL(student || teacher). Near the ends JSD(beta) is
    about beta (or 1 - beta) times that KL, so the loss scale jumps at exactly 0 and 1.

    Both distributions are softmax(logits / temperature); teacher logits never carry gradient.
    ``mask`` is 1 on completion tokens and 0 elsewhere, or any non-negative token weights (a
    weighted mean: a row weighted 2 counts as that row twice). An all-zero mask gives 0.
    """
    _require_unit_interval("beta", beta)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    student = ops.log_softmax(student_logits / temperature)
    teacher = ops.log_softmax(ops.stop_gradient(teacher_logits) / temperature)
    if beta == 0:
        per_token = _kl(ops, teacher, student)
    elif beta == 1:
        per_token = _kl(ops, student, teacher)
    else:
        mixture = ops.logaddexp(teacher + math.log(beta), student + math.log(1 - beta))
        per_token = beta * _kl(ops, teacher, mixture) + (1 - beta) * _kl(ops, student, mixture)
    return _masked_mean(ops, per_token, mask)


def completion_logprobs(ops: ArrayOps, logits, token_ids, temperature: float = 1.0):
    """Log-probability of each sampled token under softmax(logits / temperature), with gradient.

    Why: the RL terms (Learning to Imitate, Dreaming) need the policy's log-probabilities of its
    own samples as a differentiable array; use the temperature the samples were drawn at, so the
    policy gradient is that of the sampling policy.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return ops.take_along_last_axis(ops.log_softmax(logits / temperature), token_ids)


def group_advantages(ops: ArrayOps, rewards, eps: float = 1e-6):
    """GRPO advantages for one group of samples of the same prompt: (r - mean) / (std + eps).

    Why: a reward only says something relative to what the model usually does for that prompt, so
    each sample is judged against its siblings; no value network is needed. The std is the
    population one (divide by the group size), so the advantages have unit spread. A group whose
    rewards are all equal teaches nothing and gives exact zeros (rewards are shifted by the first
    one before centring, so the mean's rounding cannot leave a residue). No gradient flows back.
    """
    rewards = ops.stop_gradient(ops.asarray(rewards))
    if rewards.ndim != 1 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be one non-empty group (1-D), got shape {tuple(rewards.shape)}")
    offsets = rewards - rewards[0]
    centred = offsets - ops.mean(offsets)
    spread = ops.sqrt(ops.mean(centred * centred))
    return centred / (spread + eps)


def policy_gradient_loss(ops: ArrayOps, token_logprobs, advantages, mask):
    """REINFORCE with group advantages: -mean_i(A_i * (1 / n_i) * sum_t log p(y_i,t)).

    Why: raising the log-probability of completions that scored above their group (and lowering
    those below) follows the gradient of the expected reward without differentiating the reward.

    Normalisation (GRPO's): each completion's summed log-prob is divided by its own token count
    n_i (the mask's sum, at least 1), then the group is averaged over samples; so long and short
    completions weigh the same per sample. Advantages are constants (no gradient). The loss value
    itself means nothing; only its gradient does.
    """
    mask = ops.asarray(mask, like=token_logprobs)
    advantages = ops.stop_gradient(ops.asarray(advantages, like=token_logprobs))
    lengths = ops.clip(ops.sum(mask, axis=-1), low=1.0)
    mean_logprob = ops.sum(token_logprobs * mask, axis=-1) / lengths
    return -ops.mean(advantages * mean_logprob)


def seeding_objective(ops: ArrayOps, reward_term, distill_term, alpha: float = SEEDING_ALPHA):
    """The Knowledge Seeding loss to MINIMISE: alpha * E[D] - (1 - alpha) * E[r].

    Why: the paper maximises L_KS = E[(1 - alpha) * r - alpha * D(teacher || student)], mixing the
    imitation reward with the distillation divergence; optimisers minimise, so this returns -L_KS.

    ``reward_term`` is something to maximise whose gradient is that of E[r]: a reward is not
    differentiable, so pass the policy-gradient surrogate, i.e. ``-policy_gradient_loss(...)``.
    ``distill_term`` is the divergence to minimise (``generalized_jsd(...)``). Either may be a
    scalar or per-sample values; each is averaged.
    """
    _require_unit_interval("alpha", alpha)
    return alpha * ops.mean(distill_term) - (1 - alpha) * ops.mean(reward_term)


def _kl(ops: ArrayOps, log_p, log_q):
    """KL(p || q) over the last axis, from log-probabilities."""
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)


def _masked_mean(ops: ArrayOps, values, mask):
    """Mean of ``values`` weighted by ``mask`` (0 when nothing is masked in)."""
    mask = ops.asarray(mask, like=values)
    return ops.sum(values * mask) / ops.clip(ops.sum(mask), low=1.0)


def _require_unit_interval(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
