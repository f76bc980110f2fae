"""Tests, grouped by the file they check. Run: python -m pytest -q test_tpo.py"""

import json
import math

import pytest
import torch

import tpo

torch.manual_seed(0)


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
    assert tpo.kl_penalty(torch.tensor([100.0]), torch.tensor([0.0])).item() == pytest.approx(math.exp(-20) + 19)


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


def test_bandit_rejects_unknown_method():
    with pytest.raises(SystemExit):
        bandit.main(["--setting", "single", "--methods", "tpo,ce"])
