"""The LLM trainer's throughput: tokens per second, model FLOP/s (MFU on a GPU) and peak memory of
llm_rlvr.py's update on random weights of a model's shape (Qwen3-1.7B's by default, so nothing is downloaded).
It takes llm_rlvr.py's flags, which set the batch (--prompts-per-step, --group-size, --max-prompt-tokens,
--max-new-tokens), --lora-rank, --gradient-checkpointing, --dtype and --device.

    python tools/bench_llm_update.py --max-prompt-tokens 256 --max-new-tokens 512 --group-size 16
    python tools/bench_llm_update.py --lora-rank 32 --no-gradient-checkpointing

A training run never needs this file; it imports the trainer and times its own update.
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llm_rlvr import (Completion, check_args, check_resources, library_logs, logprob_pass, model_folder, parser,  # noqa: E402
                      row_attention_name, rollout_batch, sequence_logp, start_ranks, update, with_lora)

QWEN3_1_7B = dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  tie_word_embeddings=True, rope_theta=1000000, rms_norm_eps=1e-6)
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]  # dense bf16, data sheets
BENCH_ITERS = 3  # timed steps, after one warm-up


def bench_model_and_batch(args, device):
    """The benchmark's model (random weights of --model's shape, or Qwen3-1.7B's) and rollout batch: P random
    prompts of --max-prompt-tokens, each with K random replies of --max-new-tokens and random 0/1 scores."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if args.model == parser.get_default("model"):
        shape = dict(QWEN3_1_7B)
        config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    else:
        config = AutoConfig.from_pretrained(model_folder(args.model))
    torch.manual_seed(args.seed)
    model = with_lora(AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=row_attention_name()), args).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    args.kl_coef = 0.0
    P, K, Lp, C = args.prompts_per_step, args.group_size, args.max_prompt_tokens, args.max_new_tokens
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(config.vocab_size, (Lp,), generator=gen).tolist() for _ in range(P)]
    completions = [Completion(torch.randint(config.vocab_size, (C,), generator=gen).tolist(), [0.0] * C, True, "") for _ in range(P * K)]
    scores = torch.randint(0, 2, (P, K), generator=gen).tolist()
    rb = rollout_batch(prompts, completions, scores, args, device)
    return model, config, rb


def benchmark(args):
    """Tokens per second and peak memory of the trainer's phases (the p_old pass under
    --p-old trainer, and the update) on random weights of --model's shape (Qwen3-1.7B's for the default, so
    nothing is downloaded; a local folder's config otherwise), for P groups of one random --max-prompt-tokens
    prompt and K random replies of --max-new-tokens, with --lora-rank and --gradient-checkpointing as given.
    The KL term is off (--kl-coef 0): the frozen reference model's pass, one no-grad forward, is not timed.

    Tokens per second count unique tokens (each prompt once, every reply token). Model FLOPs: a forward costs
    2 N_body per position computed (N_body: the parameters outside the embedding and the output head) plus
    2 d V per reply token for the head, the only positions it runs on; a backward costs two forwards under full
    fine-tuning (the gradients of the activations and of the weights) and one under LoRA (the frozen weights
    get none; the adapters' own matmuls are not counted). The recomputation of gradient checkpointing is not
    counted (as usual for MFU), nor are attention scores. MFU is against the GPU's dense bf16 peak."""
    device = torch.device(args.device)
    model, config, rb = bench_model_and_batch(args, device)
    P, K, Lp, C = args.prompts_per_step, args.group_size, args.max_prompt_tokens, args.max_new_tokens
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    computed = sum(len(rb.prompts[g]) for g, i, j, a, b in rb.rows) + len(rb.seq_of_token)
    unique = P * Lp + P * K * C
    n_body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    backward = 1 if args.lora_rank else 2  # in forwards: activation gradients, and weight gradients unless frozen
    forwards = (args.p_old == "trainer") + (1 + backward) * args.epochs + (args.epochs - 1 if args.loss == "tpo" else 0)
    flops = forwards * (2 * n_body * computed + 2 * config.hidden_size * config.vocab_size * P * K * C)
    times = []
    for it in range(BENCH_ITERS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        lp_old = logprob_pass(model, rb, args) if args.p_old == "trainer" else rb.lp_engine
        update(model, opt, rb._replace(lp_old=lp_old, seq_old=sequence_logp(lp_old, rb, args)), args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
        print(f"iter {it}{' (warm-up)' if it == 0 else ''}: {times[-1]:.2f}s", flush=True)
    sec = sum(times[1:]) / BENCH_ITERS
    result = {"params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in opt.param_groups[0]["params"]),
              "groups": P, "K": K, "prompt_tokens": Lp, "reply_tokens": C, "tokens_unique": unique, "tokens_computed": computed,
              "rows": len(rb.rows), "seconds_per_step": sec, "tokens_per_s": unique / sec, "model_tflops_per_s": flops / sec / 1e12,
              "device": args.device, "dtype": args.dtype, "lora_rank": args.lora_rank, "gradient_checkpointing": args.gradient_checkpointing}
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS if k in name), None)
        result.update(gpu=name, peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
                      mfu=None if peak is None else flops / sec / 1e12 / peak)
    print(json.dumps(result, indent=1))
    return result


def main(argv=None):
    args = parser.parse_args(argv)
    args.benchmark = True
    library_logs(args.verbose)
    check_args(args)
    check_resources(args)
    start_ranks(args)
    return benchmark(args)


if __name__ == "__main__":
    main()
