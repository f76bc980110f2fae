"""Target Policy Optimization (Kaddour, 2026) and the baselines it is compared to.

Every experiment script imports its losses from here, so this file is the one
place where the method is written down. Notation follows the paper: a group of
K candidates y_1..y_K for one context, their scores s, standardized scores u,
the rollout-time policy p_old, the target q and the temperature eta.

TPO in three lines:
    u = standardize(s)                              population std over the group
    q = softmax(log_softmax(logp_old) + u / eta)    q ∝ p_old · exp(u / eta)
    L = -sum_i q_i log softmax(logp)_i              q fixed; dL/dlogits = p - q

Why a target: q is the closed-form maximiser of sum_i r_i u_i - eta KL(r || p_old)
over the K drawn candidates, so the update asks the policy to move a bounded
way, and its gradient p - q vanishes once it has: extra epochs on one batch
stop by themselves, where a mean-subtracted policy gradient keeps pushing.
A group scored all alike has q = p_old and asks for nothing, with no masking.

The trap with sequences: a candidate's log-prob is the sum of its token
log-probs (the paper's Eq. 1); over replies of tens of tokens or more those
sums lie tens of nats apart, p_old over the group is nearly one-hot, q is
nearly p_old, and the group teaches almost nothing. llm_rlvr.py offers the
mean token log-prob or the sum over a fixed budget instead (--seq-logp) and
logs the effective group size exp H(p_old) (about 1 means collapsed) and
mean |q - p_old|.

Conventions shared by every function below:
  * The group is the last dimension; any leading shape is allowed
    ([groups, K], [B, T, K], [seeds, B, K], ...).
  * `mask` (bool, same shape as the group tensor, True = real candidate) drops
    padded entries, so groups of unequal size can share one tensor.
  * Inputs may be float64, float32, float16 or bfloat16; arithmetic is done in
    at least float32 and the result has that dtype.
  * Scores, advantages and old or reference log-probs are moved to the device
    of the current log-probs; scores must have exactly logp's shape (one per
    candidate), advantages need only broadcast against it.
  * One zero-variance rule (FLAT_EPS below) decides which groups are "all
    scored alike"; `standardize` and `group_advantages` give them exactly 0.
  * Losses return a scalar averaged as their docstring says, ready for
    `.backward()`.
"""

import math
import os
import time

import torch

# A group counts as "all scored alike" (flat) when its scores span at most
# FLAT_EPS machine epsilons of the compute dtype (float32, or float64 for
# float64 scores) relative to the largest |score|:
#
#     max(s) - min(s) <= FLAT_EPS * eps(promote_types(s.dtype, float32)) * max|s|
#
# The test is on the range, not on the computed std, because a group of equal
# scores whose value float cannot represent (0.65, 0.3, 1/3, ...) still gets a
# rounding std of about one ulp from its rounded mean, and dividing by that
# turns nothing into a full-size preference. The range of equal scores is
# exactly 0 whatever K and however the mean rounds. The tolerance of 4 eps
# (4-8 ulps of the largest score) absorbs the few ulps by which a reward
# computed along two paths can differ (0.1 + 0.2 vs 0.3), and it scales with
# the data, so standardize(a*s + b) == standardize(s) for a > 0 as long as
# a*s + b keeps the scores more than those few ulps apart (float64: shifts up
# to about 1e14 for scores 1 apart; float32: about 1e6). eps is that of the
# dtype the mean and std are computed in, never of a narrower input: the
# tolerance is there for the rounding of that arithmetic, and 4 eps of
# bfloat16 (3%) or float16 (0.4%) would erase real, exactly stored
# differences such as bfloat16 scores [100, 101, 102, 100.5].
FLAT_EPS = 4.0


def _compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def _as_mask(mask, like):
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the group tensor has shape {tuple(like.shape)}")
    return mask.to(device=like.device, dtype=torch.bool)


def _like(x, logp, name):
    """x on logp's device, refused unless it has logp's shape (one entry per candidate)."""
    if x.shape != logp.shape:
        raise ValueError(f"{name} and logp must have the same shape, one entry per candidate; "
                         f"got {name} {tuple(x.shape)} and logp {tuple(logp.shape)}")
    return x.to(logp.device)


def masked_mean(x, mask=None):
    """mean of x over the entries where mask is True (all entries if mask is None):

        sum_i m_i x_i / max(1, sum_i m_i)

    Returns 0 (not NaN) when the mask selects nothing, so an all-padding batch
    contributes no gradient instead of poisoning the step.
    """
    x = x.to(_compute_dtype(x))  # a bfloat16 sum of many small terms rounds them away
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def _centre(x, mask, dim, what):
    """(x - mean, population std, flat) over the real entries of dim:

        dev_i = m_i (x_i - mean),  std = sqrt(sum_i dev_i^2 / n),  n = sum_i m_i
        flat  = max(x) - min(x) <= FLAT_EPS · eps · max|x|,   eps = eps(promote_types(dtype of x, float32))

    flat is the one zero-variance rule of this module (see FLAT_EPS); padded
    entries get dev = 0 and a fully padded group is flat.
    """
    eps = torch.finfo(_compute_dtype(x)).eps if x.dtype.is_floating_point else 0.0  # integer scores are exact
    x = x.to(_compute_dtype(x))
    m = _as_mask(mask, x)
    if not torch.isfinite(x[m]).all():
        raise ValueError(f"{what} contain NaN or infinite values; check the reward function")
    spread = x.masked_fill(~m, float("-inf")).amax(dim, keepdim=True) - x.masked_fill(~m, float("inf")).amin(dim, keepdim=True)
    x = x.masked_fill(~m, 0.0)
    flat = spread <= FLAT_EPS * eps * x.abs().amax(dim, keepdim=True)
    w = m.to(x.dtype)
    n = w.sum(dim, keepdim=True).clamp(min=1)
    dev = (x - x.sum(dim, keepdim=True) / n) * w
    return dev, (dev.square().sum(dim, keepdim=True) / n).sqrt(), flat


def _unless_flat(dev, denom, flat):
    """dev / denom, and exactly 0 in flat groups (whose denom may be a rounding residue)."""
    return torch.where(flat, torch.zeros_like(dev), dev / torch.where(flat, torch.ones_like(denom), denom))


def standardize(scores, dim=-1, mask=None):
    """Within-group z-scores: u_i = (s_i - mean(s)) / std(s).

    std is the *population* standard deviation (divide by K, not K - 1), as in
    the paper. A flat group, max(s) - min(s) <= FLAT_EPS · eps · max|s| with
    eps that of float32 or float64, whichever the arithmetic runs in (all
    candidates scored alike, see FLAT_EPS), maps to u = 0: it carries no
    preference. Masked entries are left out of the mean and std and get u = 0.

    Raises ValueError if a (non-masked) score is NaN or infinite: a broken
    reward function must stop the run, not silently zero a group.
    """
    dev, std, flat = _centre(scores, mask, dim, "scores")
    return _unless_flat(dev, std, flat)


def informative_groups(scores, mask=None):
    """True for each group whose scores are not all alike (u is not all zero).

    Shape: scores.shape[:-1]. Used for GRPO (masked), which keeps only these
    groups, and for logging the fraction of groups that carry no signal.
    """
    return ~_centre(scores, mask, -1, "scores")[2][..., 0]


def tpo_target(logp_old, u, eta=1.0, mask=None):
    """The TPO target over the last dimension, in log space.

        q = softmax(logp_old + u / eta)  =  softmax(log_softmax(logp_old) + u / eta)  ∝  p_old · exp(u / eta)

    q is the unique maximiser over the simplex of  sum_i r_i u_i - eta · KL(r || p_old):
    the scores tilt the rollout policy, and eta sets how far. With u = 0 the
    target is p_old itself, to the bit: softmax(logp_old + 0) is the very
    computation that gives p on the rollout-time weights, so a group scored
    all alike asks for exactly nothing on the first epoch (see tpo_loss).
    Masked entries get q = 0. No gradient flows through q.
    """
    if not eta > 0:
        raise ValueError(f"eta must be positive, got {eta}")
    with torch.no_grad():
        dtype = torch.promote_types(_compute_dtype(logp_old), u.dtype)
        m = _as_mask(mask, logp_old)
        logits = logp_old.to(dtype).masked_fill(~m, float("-inf"))
        q = torch.softmax(logits + u.to(dtype) / eta, -1)  # softmax's own normalisation stands in for log_softmax
        return q.masked_fill(~m, 0.0)  # also clears NaN of fully padded groups


def tpo_loss(logp, logp_old, scores, eta=1.0, anchor=True, mask=None):
    """TPO: cross-entropy from the fixed target q to the current group policy.

        u  = standardize(scores)
        q  = softmax(logp_old + u / eta)                   (anchor=True)
        q  = softmax(u / eta)                              (anchor=False, the no-anchor ablation)
        L  = mean over groups of  -sum_i q_i log softmax(logp)_i

    logp are the candidates' current log-probabilities (for a sequence, the sum
    of its token log-probs), logp_old the same under the rollout-time policy.
    Only their differences within a group matter, so they can be in the
    thousands. The gradient of one group's term with respect to logp is
    exactly p - q with p = softmax(logp): zero once the policy matches the
    target, and exactly 0.0 on the first epoch for a group scored all alike
    (there q = p_old = p, computed alike, so no rounding residue is left for an
    optimizer to amplify). Over several epochs on one batch, q stays frozen.
    Groups with no real candidate (all masked) are left out of the mean.
    """
    m = _as_mask(mask, logp)
    logits = logp.to(_compute_dtype(logp))
    # q in p's dtype: with logp_old or scores of a wider dtype, q = p_old and p would round differently
    logp_old = _like(logp_old, logp, "logp_old").to(logits.dtype)
    u = standardize(_like(scores, logp, "scores"), mask=m).to(logits.dtype)
    prior = logp_old if anchor else torch.zeros_like(logp_old)
    q = tpo_target(prior.detach(), u, eta, mask=m)  # the target, not a path for gradients
    masked = logits.masked_fill(~m, float("-inf"))
    ce = -torch.where(m, q * torch.log_softmax(masked, -1), torch.zeros_like(q)).sum(-1)
    # The gradient is set to p - q as computed, not left to log_softmax's backward, whose p = exp(log p)
    # differs from q = p_old by rounding (~1e-9) even where the two are equal: on a batch of groups scored
    # all alike, AdamW would normalise that noise into a full-size step in a random direction.
    p_minus_q = torch.where(m, torch.softmax(masked, -1) - q, torch.zeros_like(q)).detach()
    surrogate = torch.where(m, p_minus_q * logits, torch.zeros_like(q)).sum(-1)
    return masked_mean(ce.detach() + surrogate - surrogate.detach(), m.any(-1))  # value ce, gradient p - q


def group_advantages(rewards, eps=1e-8, mask=None):
    """GRPO's group z-score: A_i = (r_i - mean(r)) / (std(r) + eps).

    Population std over the last dimension, with the paper's eps = 1e-8 in
    the division. A flat group (all rewards alike, the same rule as
    `standardize`) gets A = 0 exactly: its numerator is only the rounding of
    the mean when the reward is not representable (0.65, 0.3, ...), and
    dividing that by its own rounding std + 1e-8 would give every member the
    same spurious advantage of order 1. Masked entries get A = 0.
    """
    dev, std, flat = _centre(rewards, mask, -1, "rewards")
    return _unless_flat(dev, std + eps, flat)


def pg_loss(logp, advantages, mask=None):
    """REINFORCE: L = mean of -A · log pi(a), with A = reward - baseline held fixed."""
    logp = logp.to(_compute_dtype(logp))
    return masked_mean(-advantages.detach().to(logp.device, logp.dtype) * logp, mask)


def group_pg_loss(logp, scores, mask=None):
    """Group PG: the candidates and standardized scores u of TPO, but a
    scalar-weighted REINFORCE loss instead of target matching:

        L = mean over candidates of  -u_i · log pi(y_i)

    It isolates what target matching adds over using the same u as weights.
    """
    return pg_loss(logp, standardize(_like(scores, logp, "scores"), mask=mask), mask)


def dg_loss(logp, advantages, eta=1.0, mask=None):
    """Delightful policy gradient (Osband, 2026):

        w = sigmoid(A · (-log pi(a)) / eta) · A      (held fixed)
        L = mean of -w · log pi(a)

    Surprising successes (high surprisal, A > 0) keep nearly their full
    weight; surprising failures are damped. The paper runs it for one
    gradient epoch only, as it diverges with more.
    """
    logp = logp.to(_compute_dtype(logp))
    A = advantages.detach().to(logp.device, logp.dtype)
    w = torch.sigmoid(A * (-logp.detach()) / eta) * A
    return masked_mean(-w * logp, mask)


def _log_ratio_bound(dtype):
    """The largest log-ratio whose exp still leaves e^20 of headroom in dtype."""
    return math.log(torch.finfo(dtype).max) - 20.0


# GRPO's log-ratios are clamped to [-GRPO_LOG_RATIO_CLIP, GRPO_LOG_RATIO_CLIP], value and gradient, as the
# paper's authors do (their grpo_loss clips logp - logp_old with jnp.clip before both the ratio and the KL).
GRPO_LOG_RATIO_CLIP = 20.0


def _clipped_surrogate(log_ratio, A, clip_eps, mask):
    """mean of -min(rho · A, clip(rho, 1 - eps, 1 + eps) · A) with rho = exp(log_ratio)."""
    rho = log_ratio.exp()
    return masked_mean(-torch.minimum(rho * A, rho.clamp(1 - clip_eps, 1 + clip_eps) * A), mask)


def ppo_loss(logp, logp_old, advantages, clip_eps=0.2, mask=None):
    """PPO's clipped surrogate (no critic here; the caller picks A):

        rho = exp(logp - logp_old)
        L   = mean of -min(rho · A, clip(rho, 1 - eps, 1 + eps) · A)

    Where the unclipped branch is the smaller (A < 0 and rho > 1 + eps, or
    A > 0 and rho < 1 - eps) its gradient is -rho · A · grad logp, however far
    the ratio has moved: a sample whose probability has grown 1e13-fold
    (log-ratio 30) while A < 0 is pushed back hard, not ignored. The log-ratio
    is not clamped below (rho underflows to 0, which is the exact limit).
    Above, exp would overflow (float32: log-ratio > 88.7), so the log-ratio's
    value is capped at log(largest float) - 20 (float32: 68.7, float64: 689.8)
    while its gradient passes through unchanged: beyond the cap the sample is
    still pushed back, with the cap's weight e^68.7 · |A|, and e^20 of headroom
    keeps a batch mean of up to ~1e6 such terms with |A| up to ~100 finite.
    The paper's epsilon is 0.2. (GRPO clamps instead, as its authors do: see
    `grpo_loss`.)
    """
    logp = logp.to(_compute_dtype(logp))
    A = advantages.detach().to(logp.device, logp.dtype)
    log_ratio = logp - logp_old.detach().to(logp.device, logp.dtype)
    over = (log_ratio - _log_ratio_bound(logp.dtype)).clamp(min=0).detach()
    return _clipped_surrogate(log_ratio - over, A, clip_eps, mask)  # capped value, uncapped gradient path


def kl_penalty(logp, logp_ref, clip=GRPO_LOG_RATIO_CLIP):
    """Per-sample estimate of the reverse KL(pi || ref), always >= 0:

        d = clamp(logp - logp_ref, -clip, clip),   k = exp(-d) + d - 1,   dk/dlogp = 1 - exp(-d)

    Its value is an unbiased estimate of KL(pi || ref) when a ~ pi. Used as
    a loss with the samples held fixed, as GRPO does, its expected gradient
    is that of KL(ref || pi): E_pi[(1 - ref/pi) grad log pi] = -sum ref grad log pi.
    Either way it is zero where pi = ref, so the penalty acts only once the
    policy has moved. Computed in at least float32 as expm1(-d) + d: k is
    about d^2 / 2, which exp(-d) + d - 1 in bfloat16 rounds to 0 for
    |d| < 0.03 (KL < 4e-4).

    d is clamped to [-20, 20], value and gradient, as in the paper's GRPO: a
    sample beyond it gives k = e^20 + 19 or about 19 and no gradient. Without
    the clamp the gradient of a token far below the reference is 1 - e^|d|
    (e^30 at d = -30), and one such token could set a whole step's direction.
    """
    logp = logp.to(_compute_dtype(logp))
    d = (logp - logp_ref.detach().to(logp.device, logp.dtype)).clamp(-clip, clip)
    return torch.expm1(-d) + d


def grpo_loss(logp, logp_old, advantages, beta=0.04, clip_eps=0.2, logp_ref=None, mask=None):
    """GRPO: PPO's clipped surrogate on group z-scored advantages plus a
    reverse-KL penalty:

        L = mean of [ -min(rho · A, clip(rho, 1 - eps, 1 + eps) · A) + beta · k(logp, logp_ref) ]

    with rho = exp(d), d = clamp(logp - logp_old, -20, 20) (value and gradient,
    as the paper's authors clamp it; `ppo_loss` does not), A from
    `group_advantages`, k from `kl_penalty`, and the reference
    policy the rollout policy unless `logp_ref` is given (the LLM trainer
    passes the initial model). Paper defaults: beta = 0.04, eps = 0.2;
    "GRPO (no KL)" is beta = 0.

    "GRPO (masked)" passes a mask that also drops the flat groups (rewards
    all alike, see `informative_groups`). Both terms are then means over the
    entries of the N_inf informative groups only, not over all N groups:

        L_masked = (N / N_inf) · surrogate part of L  +  beta · mean KL over informative entries

    Flat groups already have A = 0, so their surrogate is 0 and masking
    changes GRPO in exactly two ways, both deliberate: the step on the
    informative groups grows by N / N_inf (x10 when 90% of groups fail, as
    early in the terminal-reward runs), and the flat groups' KL, which would
    hold their policy near the rollout policy, is dropped with them. That is
    what zero-variance masking means in DAPO-style implementations (mean over
    the tokens that remain), and it is the only reading under which masking
    can change GRPO's result at all, as the paper reports it does.
    """
    logp = logp.to(_compute_dtype(logp))
    ref = logp_old if logp_ref is None else logp_ref
    A = advantages.detach().to(logp.device, logp.dtype)
    log_ratio = (logp - logp_old.detach().to(logp.device, logp.dtype)).clamp(-GRPO_LOG_RATIO_CLIP, GRPO_LOG_RATIO_CLIP)
    loss = _clipped_surrogate(log_ratio, A, clip_eps, mask)
    if beta:
        loss = loss + beta * masked_mean(kl_penalty(logp, ref), mask)
    return loss


# ---------------------------------------------------------------------------
# Shared by the experiment scripts, not part of the method
# ---------------------------------------------------------------------------

def steps_to_threshold(curve, threshold=0.01):
    """The index of the first entry of an error curve strictly below threshold, None if none is.

    The one definition of "steps to X% error" behind every table here: strictly below, as the
    paper's authors count it (a curve that touches 1% has not reached "below 1%").
    """
    hit = (torch.as_tensor(curve) < threshold).nonzero()
    return int(hit[0]) if len(hit) else None


def idle_cores(n):
    """How many of n cores other processes leave idle: n minus busy_cores(), at least 1.

    Every trainer here sizes its CPU threads with it unless --threads says otherwise: torch's (and vLLM's)
    OpenMP threads wait for each other at every operation, so one thread on a core that another job
    keeps busy holds all of them back, and on a shared machine fewer threads finish sooner.
    """
    return max(1, n - round(busy_cores()))


def busy_cores(window=0.5):
    """Cores in use by all processes over the next `window` seconds, from the kernel's CPU time counters
    (/proc/stat: busy = all time but idle and I/O wait); where there are none, the 1-minute load average.

    Not the load average where the counters exist: it decays over minutes, so a run started just after
    another one ended (the next line of a sweep) would still count the finished run's cores as busy.
    """
    def ticks():  # (all time, idle time) in clock ticks, summed over the machine's cores
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(fields), fields[3] + fields[4]

    try:
        total0, idle0 = ticks()
        time.sleep(window)
        total1, idle1 = ticks()
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))
