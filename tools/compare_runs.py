"""Compare finished llm_rlvr.py runs: one figure and one Markdown table of several run folders (for instance
--loss tpo and grpo at a few seeds), then the mean and standard error over each loss's seeds.

    python tools/compare_runs.py runs/sparse/chain_sum3_*/ --out-dir runs/sparse/compare

A run may also be given as a kept log, X.jsonl, with its run's config.json kept beside it as X.config.json
(how results/llm/ keeps them). A training run never needs this file; it reads each folder's log.jsonl and
config.json and imports the trainer only for its log reader and its one-sentence errors.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llm_rlvr import fail, held_out, read_log, step_seconds  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders of finished llm_rlvr.py runs, or kept logs X.jsonl with X.config.json beside them")
parser.add_argument("--out-dir", default=os.path.join("runs", "compare"), help="where compare.png and compare.json go")
parser.error = lambda message: fail(f"{message} (python tools/compare_runs.py --help)")


def read_run(d):
    """One finished run folder as --compare summarizes it: the curves, the first and last 10 steps' mean
    reward and reply length, and the mean reward of all steps (how soon and how far it rose, in one number)."""
    kept = d.endswith(".jsonl")  # a kept log: X.jsonl with X.config.json beside it
    log_path, config_path = (d, d[:-len(".jsonl")] + ".config.json") if kept else (os.path.join(d, "log.jsonl"), os.path.join(d, "config.json"))
    if not (os.path.exists(log_path) and os.path.exists(config_path)):
        fail(f"{d}: a kept log needs the file and its run's config beside it, {os.path.basename(config_path)}" if kept
             else f"{d} is not a run folder of this script (it needs log.jsonl and config.json)")
    with open(config_path) as f:
        config = json.load(f)
    log = read_log(log_path)
    train, evals = [r for r in log if "reward_mean" in r], [r for r in log if "eval_accuracy" in r]
    if not train:
        fail(f"{d} has no finished step")
    rewards, lengths = [r["reward_mean"] for r in train], [r["completion_len_mean"] for r in train]
    cut = [r["truncated_frac"] for r in train if "truncated_frac" in r]
    # the reply length of the replies that scored and of those that did not, a mean over the steps that had any
    by_reward = {k: [r[f"len_{k}"] for r in train if r.get(f"len_{k}") is not None] for k in ("rewarded", "unrewarded")}
    return {"run": d, "loss": config["loss"], "arm": arm(config), "seed": config["seed"], "steps": train[-1]["step"], "task": config["task"],
            "truncated_all": np.mean(cut) if cut else None, "truncated_last10": np.mean(cut[-10:]) if cut else None,
            "reward_first10": np.mean(rewards[:10]), "reward_last10": np.mean(rewards[-10:]), "reward_all": np.mean(rewards),
            "steps_with_reward": sum(x > 0 for x in rewards),  # where rewards are sparse, how often a group had a signal
            "length_first10": np.mean(lengths[:10]), "length_last10": np.mean(lengths[-10:]),
            **{f"length_{k}": np.mean(xs) if xs else None for k, xs in by_reward.items()},
            "eval_steps": [r["step"] for r in evals], "eval_accuracy": [r["eval_accuracy"] for r in evals],
            "eval_accuracy_strict": [r.get("eval_accuracy_strict") for r in evals],  # None: logged before strict was
            "train_steps": [r["step"] for r in train], "train_reward": rewards, "train_length": lengths,
            "seconds_per_step": np.mean([step_seconds(r) for r in train])}


def arm(config):
    """A run's loss and what else sets its objective: TPO's --seq-logp, GRPO's --grpo-mean, --epochs other than 1
    (just the loss for a config that names none of them)."""
    if "seq_logp" not in config:
        return config["loss"]
    detail = config["seq_logp"] if config["loss"] == "tpo" else config.get("grpo_mean", "token")  # older GRPO runs: token
    return f"{config['loss']} ({detail})" + (f", {config['epochs']} epochs" if config.get("epochs", 1) != 1 else "")


def compare(args):
    """Several finished runs (e.g. --loss tpo and grpo at a few seeds) in one figure and one table.
    The train reward is a mean over only P x K samples a step, so the figure draws its 5-step moving average
    per run and, in a second panel, that average's mean over each loss's seeds with one standard error either
    side; the last two panels are the held-out accuracy and the reply length (a reply cut off at
    --max-new-tokens has no answer, so a drift in length moves the reward). The table gives, per run, the
    steps logged, the mean reward of the first and of the last 10 steps and of all steps, how many steps had
    any reward, the mean reply length of the first and last 10 steps, the held-out accuracy at the first and
    the last evaluation (lenient and, where logged, strict), the mean seconds a step, the share of replies
    cut off and the mean length of the replies that scored and of those that did not (over the steps that
    had such replies; "-" in logs from before it was logged); then, per loss over its seeds, the mean and
    standard error of the all-steps and last-10 reward, the last held-out accuracy, the last 10 steps' reply
    length and share cut off, and the seconds a step.
    A "loss" here is the loss with what else sets its objective (arm): TPO's --seq-logp, GRPO's
    --grpo-mean, --epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [read_run(d) for d in args.run_dirs]
    fig, ((ax_r, ax_m), (ax_e, ax_l)) = plt.subplots(2, 2, figsize=(12, 7.2))
    losses, seeds = sorted({r["arm"] for r in runs}, reverse=True), sorted({r["seed"] for r in runs})
    for r in runs:  # colour = loss (with its objective's settings: arm), line style = seed
        label, color, style = f"{r['arm']}, seed {r['seed']}", f"C{losses.index(r['arm'])}", ("-", "--", ":", "-.")[seeds.index(r["seed"]) % 4]
        ax_r.plot(r["train_steps"], r["train_reward"], color=color, linestyle=style, alpha=0.2)
        ax_r.plot(r["train_steps"], moving_average(r["train_reward"]), color=color, linestyle=style, label=label)
        ax_l.plot(r["train_steps"], moving_average(r["train_length"]), color=color, linestyle=style, label=label)
        if r["eval_steps"]:
            ax_e.plot(r["eval_steps"], r["eval_accuracy"], "o", color=color, linestyle=style, label=label)
            strict = [(s, a) for s, a in zip(r["eval_steps"], r["eval_accuracy_strict"]) if a is not None]
            if strict:
                ax_e.plot(*zip(*strict), "s", color=color, linestyle=style, alpha=0.5, fillstyle="none")  # one legend entry a run
    for loss in losses:
        steps, mean, se, n = mean_over_seeds([r for r in runs if r["arm"] == loss])
        ax_m.plot(steps, mean, color=f"C{losses.index(loss)}", label=f"{loss}, {n} seed{'s' if n > 1 else ''}")
        ax_m.fill_between(steps, mean - se, mean + se, color=f"C{losses.index(loss)}", alpha=0.2)
    ax_r.set(xlabel="step", ylabel="train reward", title=f"{runs[0]['task']}: mean over P x K samples (line: 5-step average)")
    ax_m.set(xlabel="step", ylabel="train reward", title="5-step average: mean over seeds ± standard error")
    ax_e.set(xlabel="step", ylabel="accuracy", title="held-out prompts, greedy (hollow squares: strict)")
    ax_l.set(xlabel="step", ylabel="tokens", title="mean reply length (5-step average)")
    for ax in (ax_r, ax_m, ax_e, ax_l):
        if ax.get_legend_handles_labels()[0]:  # runs without evaluations leave the held-out panel empty
            ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    save_small_png(fig, os.path.join(out_dir, "compare.png"))
    plt.close(fig)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(runs, f, indent=1, default=float)
    print_compare_table(runs)
    print(f"wrote {out_dir}/compare.png and {out_dir}/compare.json")
    return runs


def save_small_png(fig, path):
    """The figure as a 256-colour PNG: a dozen runs' faint per-step lines give it hundreds of thousands of
    colours, three times the bytes for no difference a reader can see."""
    import io
    from PIL import Image  # matplotlib's own dependency
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)


def moving_average(xs, w=5):
    """y_j = mean(x_{j-w+1}, ..., x_j), over fewer points for the first w - 1."""
    return [np.mean(xs[max(0, j - w + 1):j + 1]) for j in range(len(xs))]


def mean_over_seeds(runs):
    """The mean over runs (one loss, several seeds) of their train reward's moving average and its standard
    error std(ddof=1) / sqrt(n), 0 for one run, over the steps that all of them reached."""
    n_steps = min(len(r["train_reward"]) for r in runs)
    curves = np.array([moving_average(r["train_reward"])[:n_steps] for r in runs])
    se = curves.std(0, ddof=1) / len(runs) ** 0.5 if len(runs) > 1 else np.zeros(n_steps)
    return runs[0]["train_steps"][:n_steps], curves.mean(0), se, len(runs)


def print_compare_table(runs):
    """--compare's Markdown tables: one row per run, then one row per arm (a loss with what else sets its
    objective), each figure its mean ± standard error over the arm's runs (seeds)."""
    print("| run | loss | seed | steps | train reward, steps 1-10 -> last 10 (all steps) | steps with a reward | "
          "reply tokens, steps 1-10 -> last 10 | held-out accuracy (strict), first -> last | s per step | cut off, all steps | "
          "reply tokens, rewarded / not |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        held = " -> ".join(f"{held_out(r['eval_accuracy'][j], r['eval_accuracy_strict'][j])} (step {r['eval_steps'][j]})"
                           for j in (0, -1)) if r["eval_steps"] else "not evaluated"
        cut = "-" if r.get("truncated_all") is None else f"{r['truncated_all']:.0%}"
        by_reward = " / ".join("-" if r.get(k) is None else f"{r[k]:.0f}" for k in ("length_rewarded", "length_unrewarded"))
        print(f"| {r['run']} | {r['arm']} | {r['seed']} | {r['steps']} | {r['reward_first10']:.3f} -> {r['reward_last10']:.3f} "
              f"({r['reward_all']:.3f}) | {r['steps_with_reward']} | {r['length_first10']:.0f} -> {r['length_last10']:.0f} | {held} "
              f"| {r['seconds_per_step']:.0f} | {cut} | {by_reward} |")
    print()
    print("| arm | runs | train reward, all steps | train reward, last 10 steps | held-out accuracy, last evaluation | "
          "reply tokens, last 10 steps | cut off, last 10 steps | s per step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for loss in sorted({r["arm"] for r in runs}, reverse=True):  # over its seeds: mean +- standard error
        of = [r for r in runs if r["arm"] == loss]
        last = [r["eval_accuracy"][-1] for r in of if r["eval_steps"]]
        cut = [r["truncated_last10"] for r in of if r.get("truncated_last10") is not None]
        cells = [mean_se([r["reward_all"] for r in of]), mean_se([r["reward_last10"] for r in of]), mean_se(last),
                 mean_se([r["length_last10"] for r in of], "{:.0f}"), mean_se([100 * c for c in cut], "{:.0f}%"),
                 mean_se([r["seconds_per_step"] for r in of], "{:.0f}")]
        print(f"| {loss} | {len(of)} | " + " | ".join(cells) + " |")


def mean_se(xs, fmt="{:.3f}"):
    """"mean ± standard error" (std(ddof=1) / sqrt(n)) of one arm's runs; the value alone for one run, "-" for none."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(np.mean(xs))} ± {fmt.format(np.std(xs, ddof=1) / len(xs) ** 0.5)}".replace("% ±", " ±")


def main(argv=None):
    return compare(parser.parse_args(argv))


if __name__ == "__main__":
    main()
