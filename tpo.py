"""Target Policy Optimization (Kaddour, 2026) and the baselines it is compared to.

Every experiment script imports its losses from here, so this file is the one
place where the method is written down. Notation follows the paper: a group of
K candidates y_1..y_K for one context, their scores s, standardized scores u,
the rollout-time policy p_old, the target q and the temperature eta.

TPO in three lines (SPEC section 1):
    u = standardize(s)                              population std over the group
    q = softmax(log_softmax(logp_old) + u / eta)    q ∝ p_old · exp(u / eta)
    L = -sum_i q_i log softmax(logp)_i              q fixed; dL/dlogits = p - q

Conventions shared by every function below:
  * The group is the last dimension; any leading shape is allowed
    ([groups, K], [B, T, K], [seeds, B, K], ...).
  * `mask` (bool, same shape as the group tensor, True = real candidate) drops
    padded entries, so groups of unequal size can share one tensor.
  * Inputs may be float64, float32, float16 or bfloat16; arithmetic is done in
    at least float32 and the result has that dtype.
  * Losses return a scalar averaged as their docstring says, ready for
    `.backward()`.
"""

import torch

# A group counts as "all scored alike" when its population std is at most
# ZERO_STD_RTOL times the largest |score| in it. The threshold is relative, so
# standardize(a*s + b) == standardize(s) for a > 0 up to float rounding, and
# 1e-6 sits above float32 rounding noise (about 1.2e-7 relative) for groups of
# identical scores whose mean is not exactly representable.
ZERO_STD_RTOL = 1e-6


def _compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def _as_mask(mask, like):
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the group tensor has shape {tuple(like.shape)}")
    return mask.to(device=like.device, dtype=torch.bool)


def masked_mean(x, mask=None):
    """mean of x over the entries where mask is True (all entries if mask is None).

    Returns 0 (not NaN) when the mask selects nothing, so an all-padding batch
    contributes no gradient instead of poisoning the step.
    """
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def _centre(x, mask, dim, what):
    """(x with padding zeroed, x - mean, population std) over the real entries of dim."""
    x = x.to(_compute_dtype(x))
    m = _as_mask(mask, x)
    if not torch.isfinite(x[m]).all():
        raise ValueError(f"{what} contain NaN or infinite values; check the reward function")
    x = x.masked_fill(~m, 0.0)
    w = m.to(x.dtype)
    n = w.sum(dim, keepdim=True).clamp(min=1)
    dev = (x - x.sum(dim, keepdim=True) / n) * w
    return x, dev, (dev.square().sum(dim, keepdim=True) / n).sqrt()


def standardize(scores, dim=-1, mask=None):
    """Within-group z-scores: u_i = (s_i - mean(s)) / std(s).

    std is the *population* standard deviation (divide by K, not K - 1), as in
    the paper. A group whose std is at most ZERO_STD_RTOL * max|s| (all
    candidates scored alike) maps to u = 0: it carries no preference. Masked
    entries are left out of the mean and std and get u = 0.

    Raises ValueError if a (non-masked) score is NaN or infinite: a broken
    reward function must stop the run, not silently zero a group.
    """
    s, dev, std = _centre(scores, mask, dim, "scores")
    scale = s.abs().amax(dim, keepdim=True)
    flat = std <= ZERO_STD_RTOL * scale
    return torch.where(flat, torch.zeros_like(dev), dev / torch.where(flat, torch.ones_like(std), std))


def informative_groups(scores, mask=None):
    """True for each group whose scores are not all alike (u is not all zero).

    Shape: scores.shape[:-1]. Used for GRPO (masked), which drops such groups,
    and for logging the fraction of groups that carry no signal.
    """
    u = standardize(scores, mask=mask)
    return (u != 0).any(-1)


def tpo_target(logp_old, u, eta=1.0, mask=None):
    """The TPO target over the last dimension, in log space.

        q = softmax(log_softmax(logp_old) + u / eta)  ∝  p_old · exp(u / eta)

    q is the unique maximiser over the simplex of  sum_i r_i u_i - eta · KL(r || p_old):
    the scores tilt the rollout policy, and eta sets how far. With u = 0 the
    target is p_old itself. Masked entries get q = 0. No gradient flows
    through q.
    """
    if not eta > 0:
        raise ValueError(f"eta must be positive, got {eta}")
    with torch.no_grad():
        dtype = torch.promote_types(_compute_dtype(logp_old), u.dtype)
        m = _as_mask(mask, logp_old)
        logits = logp_old.to(dtype).masked_fill(~m, float("-inf"))
        logits = torch.log_softmax(logits, -1) + u.to(dtype) / eta
        q = torch.softmax(logits, -1)
        return q.masked_fill(~m, 0.0)  # also clears NaN of fully padded groups


def tpo_loss(logp, logp_old, scores, eta=1.0, anchor=True, mask=None):
    """TPO: cross-entropy from the fixed target q to the current group policy.

        u  = standardize(scores)
        q  = softmax(log_softmax(logp_old) + u / eta)      (anchor=True)
        q  = softmax(u / eta)                              (anchor=False, the no-anchor ablation)
        L  = mean over groups of  -sum_i q_i log softmax(logp)_i

    logp are the candidates' current log-probabilities (for a sequence, the sum
    of its token log-probs), logp_old the same under the rollout-time policy.
    Only their differences within a group matter, so they can be in the
    thousands. The gradient of one group's term with respect to logp is
    exactly p - q with p = softmax(logp): zero once the policy matches the
    target, and zero on the first epoch for a group scored all alike (there
    q = p_old = p). Over several epochs on one batch, q stays frozen.
    Groups with no real candidate (all masked) are left out of the mean.
    """
    m = _as_mask(mask, logp)
    u = standardize(scores, mask=m)
    prior = logp_old if anchor else torch.zeros_like(logp_old)
    q = tpo_target(prior.detach(), u, eta, mask=m)  # the target, not a path for gradients
    logp_theta = torch.log_softmax(logp.to(_compute_dtype(logp)).masked_fill(~m, float("-inf")), -1)
    ce = -torch.where(m, q * logp_theta, torch.zeros_like(q)).sum(-1)
    return masked_mean(ce, m.any(-1))


def group_advantages(rewards, eps=1e-8, mask=None):
    """GRPO's group z-score: A_i = (r_i - mean(r)) / (std(r) + eps).

    Population std over the last dimension. Unlike `standardize`, a group of
    equal rewards gives A = 0 through the numerator, with eps (1e-8, the
    paper's) only guarding the division. Masked entries get A = 0.
    """
    _, dev, std = _centre(rewards, mask, -1, "rewards")
    return dev / (std + eps)


def pg_loss(logp, advantages, mask=None):
    """REINFORCE: L = mean of -A · log pi(a), with A = reward - baseline held fixed."""
    logp = logp.to(_compute_dtype(logp))
    return masked_mean(-advantages.detach().to(logp.dtype) * logp, mask)


def group_pg_loss(logp, scores, mask=None):
    """Group PG: the candidates and standardized scores u of TPO, but a
    scalar-weighted REINFORCE loss instead of target matching:

        L = mean over candidates of  -u_i · log pi(y_i)

    It isolates what target matching adds over using the same u as weights.
    """
    return pg_loss(logp, standardize(scores, mask=mask), mask)


def dg_loss(logp, advantages, eta=1.0, mask=None):
    """Delightful policy gradient (Osband, 2026):

        w = sigmoid(A · (-log pi(a)) / eta) · A      (held fixed)
        L = mean of -w · log pi(a)

    Surprising successes (high surprisal, A > 0) keep nearly their full
    weight; surprising failures are damped. The paper runs it for one
    gradient epoch only, as it diverges with more.
    """
    logp = logp.to(_compute_dtype(logp))
    A = advantages.detach().to(logp.dtype)
    w = torch.sigmoid(A * (-logp.detach()) / eta) * A
    return masked_mean(-w * logp, mask)


def ppo_loss(logp, logp_old, advantages, clip_eps=0.2, mask=None):
    """PPO's clipped surrogate (no critic here; the caller picks A):

        rho = exp(logp - logp_old)
        L   = mean of -min(rho · A, clip(rho, 1 - eps, 1 + eps) · A)

    The log-ratio is clamped to [-20, 20] before exp so that sequence
    log-probs far apart stay finite; far outside [1 - eps, 1 + eps] this does
    not change which branch min() takes. The paper's epsilon is 0.2.
    """
    logp = logp.to(_compute_dtype(logp))
    A = advantages.detach().to(logp.dtype)
    log_ratio = (logp - logp_old.detach().to(logp.dtype)).clamp(-20.0, 20.0)
    rho = log_ratio.exp()
    surrogate = torch.minimum(rho * A, rho.clamp(1 - clip_eps, 1 + clip_eps) * A)
    return masked_mean(-surrogate, mask)


def kl_penalty(logp, logp_ref):
    """Per-sample estimate of the reverse KL(pi || ref), always >= 0:

        d = logp - logp_ref  (clamped to [-20, 20]),   k = exp(-d) + d - 1

    Its value is an unbiased estimate of KL(pi || ref) when a ~ pi. Used as
    a loss with the samples held fixed, as GRPO does, its expected gradient
    is that of KL(ref || pi): E_pi[(1 - ref/pi) grad log pi] = -sum ref grad log pi.
    Either way it is zero where pi = ref, so the penalty acts only once the
    policy has moved.
    """
    d = (logp - logp_ref.detach().to(logp.dtype)).clamp(-20.0, 20.0)
    return torch.exp(-d) + d - 1


def grpo_loss(logp, logp_old, advantages, beta=0.04, clip_eps=0.2, logp_ref=None, mask=None):
    """GRPO: PPO's clipped surrogate on group z-scored advantages plus a
    reverse-KL penalty:

        L = mean of [ -min(rho · A, clip(rho, 1 - eps, 1 + eps) · A) + beta · k(logp, logp_ref) ]

    with A from `group_advantages`, k from `kl_penalty`, and the reference
    policy the rollout policy unless `logp_ref` is given (the LLM trainer
    passes the initial model). Paper defaults: beta = 0.04, eps = 0.2;
    "GRPO (no KL)" is beta = 0. "GRPO (masked)" passes a mask that also
    drops the groups whose rewards are all equal (see `informative_groups`).
    """
    logp = logp.to(_compute_dtype(logp))
    ref = logp_old if logp_ref is None else logp_ref
    loss = ppo_loss(logp, logp_old, advantages, clip_eps, mask)
    if beta:
        loss = loss + beta * masked_mean(kl_penalty(logp, ref), mask)
    return loss
