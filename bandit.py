"""Tabular bandits: paper §2 (its first experiment family).

The policy is an explicit table of logits and every method takes normalized
steps on it directly, logits += alpha * g / ||g||, with no optimizer, so the
only difference between methods is the direction g they compute.

  single  one context, 100 arms, arm 0 correct, reward 1{a = 0}; each step
          samples 100 actions per seed and forms each method's gradient
          estimate from them; misalignment is measured against the exact
          policy gradient pi(y)(e_y - pi).
  multi   100 contexts with 10 arms each, logits drawn from N(0, 1), arm 0
          correct everywhere; exact population updates (no sampling), one
          global normalization over all contexts, misalignment against the
          supervised cross-entropy (CE) direction.

    python bandit.py --setting single      # 100 seeds, about 4 s on one core of a 2-core AMD EPYC
    python bandit.py --setting multi       # 100 seeds, about 45 s on one core of the same machine

The gradient estimates are the autograd gradients of the real losses in
tpo.py (a loss's gradient with respect to the logits is minus the direction).
All seeds run as one batched tensor computation in float64. The paper does
not give the number of steps; the defaults (--steps) are ours, long enough
for every method's curve to flatten. In the multi setting the paper uses
closed forms for the exact updates, written beside each method below; `multi`
also checks them against Monte-Carlo averages of the sampled losses.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

import tpo

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--setting", choices=["single", "multi"], default="single")
parser.add_argument("--methods", default=None,
                    help="comma list; default: pg,dg,grpo,tpo (single) or ce,pg,dg,grpo,tpo (multi)")
parser.add_argument("--seeds", type=int, default=100, help="independent runs, batched (paper: 100)")
parser.add_argument("--steps", type=int, default=None,
                    help="update steps (paper: not stated; default 300 single, 1000 multi)")
parser.add_argument("--alpha", type=float, default=0.1, help="normalized step size (paper: 0.1)")
parser.add_argument("--eta", type=float, default=1.0, help="TPO and DG temperature (paper: 1)")
parser.add_argument("--arms", type=int, default=None, help="arms per context (paper: 100 single, 10 multi)")
parser.add_argument("--samples", type=int, default=100, help="single: actions sampled per step (paper: 100)")
parser.add_argument("--contexts", type=int, default=100, help="multi: number of contexts (paper: 100)")
parser.add_argument("--baseline", type=float, default=0.5,
                    help="single: constant baseline in A = r - b for PG, DG and TPO's scores (authors' code: 0.5)")
parser.add_argument("--seed", type=int, default=0, help="base random seed")
parser.add_argument("--threads", type=int, default=0,
                    help="CPU threads (default: one per core that other processes leave idle, judged by their CPU "
                         "time over half a second at start; torch's threads slow down several-fold when one of them shares a core)")
parser.add_argument("--out", default=None, help="JSON path (default: runs/bandit_<setting>.json; results/ holds the committed ones); the PNG goes beside it")


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------
# Single context: each method's loss on 100 sampled actions per seed
# ---------------------------------------------------------------------------
# logits: [S seeds, A arms]; a, r: [S, N samples]. Each function returns a
# scalar loss whose gradient with respect to the logits is -(that method's g)
# up to a positive factor per seed, which the normalized step removes.

def logp_of(logits, a):
    return torch.log_softmax(logits, -1).gather(-1, a)


def pg_single(logits, a, r, args):
    return tpo.pg_loss(logp_of(logits, a), r - args.baseline)


def dg_single(logits, a, r, args):
    return tpo.dg_loss(logp_of(logits, a), r - args.baseline, eta=args.eta)


def grpo_single(logits, a, r, args):
    # One epoch on fresh samples: the ratio is 1, so the clip and the KL term
    # have zero gradient and GRPO is REINFORCE on z-scored rewards.
    logp = logp_of(logits, a)
    return tpo.grpo_loss(logp, logp.detach(), tpo.group_advantages(r))


def tpo_single(logits, a, r, args):
    # TPO scores every arm at once: the mean advantage each arm collected in
    # this batch (0 for arms not sampled), standardized over the arms.
    scores = torch.zeros_like(logits).scatter_add(-1, a, r - args.baseline) / a.shape[-1]
    return tpo.tpo_loss(logits, logits.detach(), scores, eta=args.eta)


SINGLE = {"pg": pg_single, "dg": dg_single, "grpo": grpo_single, "tpo": tpo_single}


def direction(loss_fn, logits, *batch):
    logits = logits.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(logits, *batch), logits)
    return -grad


def cosine(g, h):
    return (g * h).sum(-1) / (g.norm(dim=-1) * h.norm(dim=-1)).clamp(min=1e-300)


def normalized_step(logits, g, alpha):
    return logits + alpha * g / g.norm(dim=-1, keepdim=True).clamp(min=1e-300)


def run_single(method, args, gen):
    S, A, N = args.seeds, args.arms, args.samples
    logits = torch.zeros(S, A, dtype=torch.float64)
    errors, misalign = [], []
    for _ in range(args.steps):
        pi = logits.softmax(-1)
        errors.append(pi[:, 1:].sum(-1))  # 1 - pi(y*), summed so it stays exact near 0; recorded before each step
        a = torch.multinomial(pi, N, replacement=True, generator=gen)  # [S, N]
        r = (a == 0).to(logits.dtype)
        g = direction(SINGLE[method], logits, a, r, args)
        oracle = pi[:, :1] * (torch.nn.functional.one_hot(torch.zeros(S, dtype=torch.long), A) - pi)
        misalign.append((1 - cosine(g, oracle)).clamp(min=0))
        logits = normalized_step(logits, g, args.alpha)
    return torch.stack(errors, 1), torch.stack(misalign, 1)  # [S, steps]


# ---------------------------------------------------------------------------
# Multi context: exact population updates
# ---------------------------------------------------------------------------
# With a one-hot reward every method moves each context's logits along
# e_y - pi with a weight beta(p), p = pi(y) (the paper's Appendix B, there at
# eta = 1). TPO's update is computed from its real target, q - pi with
# u = standardize(e_y), and equals the closed form below; the others use
# their closed forms.

def tpo_beta(p, arms, eta):
    """TPO's weight: standardizing e_y over A arms gives u_y = sqrt(A - 1) and
    u_j = -1 / sqrt(A - 1) elsewhere, so q ∝ pi · exp(u / eta) raises the correct
    arm by L = exp((u_y - u_j) / eta) = exp(A / (eta sqrt(A - 1))) against the rest:
    q_y = p L / (1 - p + p L), the wrong arms keep their shares of 1 - q_y, and
    q - pi = (q_y - p) / (1 - p) · (e_y - pi) = p (L - 1) / (1 - p + p L) · (e_y - pi)."""
    L = math.exp(arms / (eta * math.sqrt(arms - 1)))
    return p * (L - 1) / (1 - p + L * p)


BETA = {
    "ce": lambda p, arms, eta: torch.ones_like(p),
    "pg": lambda p, arms, eta: p,                              # E[r grad log pi], any constant baseline
    "dg": lambda p, arms, eta: p / (1 + p ** (1 / eta)),       # A = r: only the correct arm has weight, sigmoid(-log p / eta)
    "grpo": lambda p, arms, eta: (p / (1 - p).clamp(min=1e-12)).sqrt(),  # population z-scored reward
    "tpo": tpo_beta,
}


def exact_direction(method, logits, eta):
    # logits: [S, C contexts, A arms]; the correct arm is 0 in every context.
    pi = logits.softmax(-1)
    e_y = torch.zeros_like(pi)
    e_y[..., 0] = 1
    if method == "tpo":
        return direction(lambda z: tpo.tpo_loss(z, z.detach(), e_y, eta=eta), logits) * logits.shape[:-1].numel()
    return BETA[method](pi[..., :1], logits.shape[-1], eta) * (e_y - pi)


def run_multi(method, args, gen):
    S, C, A = args.seeds, args.contexts, args.arms
    logits = torch.randn(S, C, A, dtype=torch.float64, generator=gen)
    errors, misalign = [], []
    for _ in range(args.steps):
        g = exact_direction(method, logits, args.eta).flatten(1)  # [S, C*A], one normalization for all contexts
        ce = exact_direction("ce", logits, args.eta).flatten(1)
        misalign.append((1 - cosine(g, ce)).clamp(min=0))
        logits = normalized_step(logits.flatten(1), g, args.alpha).view(S, C, A)
        errors.append(logits.softmax(-1)[..., 1:].sum(-1).mean(-1))  # 1 - pi(y), mean over contexts, after the step
    return torch.stack(errors, 1), torch.stack(misalign, 1)


def beta_check(args, gen, ps=(0.05, 0.1, 0.3, 0.6, 0.9), n=400_000):
    """beta(p) three ways at a few p (wrong arms equally likely): the closed
    form, the coefficient of the exact update used here, and a Monte-Carlo
    average of each method's *sampled* loss gradient (n actions, A = r, no
    baseline), which is what the closed forms are expectations of."""
    A, rows = args.arms, []
    mc_args = argparse.Namespace(**{**vars(args), "baseline": 0.0})
    for p in ps:
        pi = torch.full((1, A), (1 - p) / (A - 1), dtype=torch.float64)
        pi[0, 0] = p
        logits = pi.log()
        d = torch.zeros_like(pi)
        d[0, 0] = 1
        d = d - pi  # e_y - pi
        a = torch.multinomial(pi, n, replacement=True, generator=gen)
        r = (a == 0).to(pi.dtype)
        for m in ["ce"] + list(SINGLE):
            closed = float(BETA[m](torch.tensor(p, dtype=torch.float64), A, args.eta))
            exact = exact_direction(m, logits[None], args.eta)[0]
            row = {"p": p, "method": m, "closed_form": closed, "exact_update": float((exact * d).sum() / (d * d).sum())}
            if m in SINGLE:
                # A mean over n samples estimates the expectation (TPO's gives q - pi).
                g = direction(SINGLE[m], logits, a, r, mc_args)
                row["monte_carlo"] = float((g * d).sum() / (d * d).sum())
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Main loop: every method, all seeds at once
# ---------------------------------------------------------------------------

def main(argv=None):
    args = parser.parse_args(argv)
    single = args.setting == "single"
    # not `or`: an explicit 0 must be refused below, not silently replaced by the default
    if args.arms is None:
        args.arms = 100 if single else 10
    if args.steps is None:
        args.steps = 300 if single else 1000
    default_methods = "pg,dg,grpo,tpo" if single else "ce,pg,dg,grpo,tpo"
    methods = (args.methods or default_methods).split(",")
    known = SINGLE if single else BETA
    bad = [m for m in methods if m not in known]
    if bad:
        fail(f"unknown method(s) {bad} for --setting {args.setting}; choose from {sorted(known)}")
    for name in ("seeds", "steps", "samples", "contexts"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1")
    if args.arms < 2:
        fail("--arms must be at least 2")
    if not (args.alpha > 0 and args.eta > 0):
        fail("--alpha and --eta must be positive")
    if args.threads < 0:
        fail("--threads must be at least 1, or 0 for one per idle core")
    torch.set_num_threads(args.threads or min(torch.get_num_threads(), tpo.idle_cores(os.cpu_count() or 1)))
    out = args.out or os.path.join("runs", f"bandit_{args.setting}.json")

    results = {}
    for i, m in enumerate(methods):
        gen = torch.Generator().manual_seed(args.seed)  # same seeds (same initial logits) for every method
        t0 = time.time()
        err, mis = (run_single if single else run_multi)(m, args, gen)
        e, s = err.mean(0), mis.mean(0)
        results[m] = {
            "error_mean": e.tolist(),
            "error_se": (err.std(0) / math.sqrt(args.seeds)).tolist() if args.seeds > 1 else None,
            "misalignment_mean": s.tolist(),
            "final_error": float(e[-1]),
            "final_misalignment": float(s[-1]),
            "mean_misalignment": float(s.mean()),
            "steps_to_1pct": tpo.steps_to_threshold(e, 0.01),
        }
        print(f"[{i + 1}/{len(methods)}] {m}: {args.steps} steps x {args.seeds} seeds in {time.time() - t0:.1f}s")

    print(f"\n{args.setting}-context bandit, {args.arms} arms, {args.seeds} seeds, {args.steps} steps "
          f"(error = 1 - pi(correct){', mean over contexts' if not single else ''}; all columns are means over seeds)")
    print(f"{'method':8s} {'final error':>12s} {'step to 1%':>11s} {'final misalignment':>19s} {'misalignment, mean over steps':>30s}")
    for m, r in results.items():
        hit = "never" if r["steps_to_1pct"] is None else str(r["steps_to_1pct"])
        print(f"{m:8s} {r['final_error']:12.2e} {hit:>11s} {r['final_misalignment']:19.2e} {r['mean_misalignment']:30.3f}")

    check = None
    if not single:
        check = beta_check(args, torch.Generator().manual_seed(args.seed + 1))
        print(f"\nbeta(p): weight of e_y - pi in each update, {args.arms} arms (wrong arms equally likely)")
        print(f"{'p':>5s} {'method':6s} {'closed form':>12s} {'exact update':>13s} {'Monte Carlo (400k samples)':>27s}")
        for row in check:
            mc = f"{row['monte_carlo']:27.4f}" if "monte_carlo" in row else f"{'':27s}"
            print(f"{row['p']:5.2f} {row['method']:6s} {row['closed_form']:12.4f} {row['exact_update']:13.4f} {mc}")

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"config": {**vars(args), "methods": methods}, "methods": results, "beta_check": check}, f)
    png = os.path.splitext(out)[0] + ".png"
    plot(results, args, png)
    print(f"\nwrote {out} and {png}")
    return results


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def plot(results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m, r in results.items():
        ax_e.plot(r["error_mean"], label=m)
        ax_m.plot(r["misalignment_mean"], label=m)
    ax_e.set(yscale="log", xlabel="step", ylabel="error 1 - pi(y*)", title=f"{args.setting} context: error")
    ax_m.set(xlabel="step", ylabel="1 - cos(g, oracle)", title="misalignment with " + ("exact PG" if args.setting == "single" else "CE"))
    ax_e.axhline(0.01, color="grey", lw=0.5, ls=":")
    ax_e.legend()
    fig.suptitle(f"{args.seeds} seeds, mean", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
