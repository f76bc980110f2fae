"""Transformer sequence tasks: section 4 of the TPO paper (Kaddour, 2026, arXiv 2604.06159).

A small causal transformer reads H prompt tokens drawn uniformly from a vocabulary of V
and writes H answer tokens, a fixed function of the prompt (copy, flip x -> V-1-x,
reverse copy, reverse flip). Reward per answer token: bag_of_tokens (1 where right),
sequential (1 up to the first mistake) or terminal (1 everywhere if all is right).

    python token_tasks.py                                       # reverse copy, bag-of-tokens, V=2, H=10 (Tables 1-2)
    python token_tasks.py --V 8                                 # Table 1: V = 2, 4, 8, 16
    python token_tasks.py --reward sequential --target copy     # Table 2, sequential reward
    python token_tasks.py --reward terminal --H 8 --episodes 2000                         # Table 3, prompt-matched
    python token_tasks.py --reward terminal --H 8 --episodes 2000 --matching interaction  # Table 3, interaction-matched
    python token_tasks.py --reward terminal --H 10 --episodes 2000 --methods tpo,tpo_no_anchor,group_pg,grpo_no_kl  # ablations
    python token_tasks.py --reward terminal --H 8 --K 32 --B 256 --episodes 2000 --methods tpo,grpo,grpo_masked    # diagnostics
    python token_tasks.py --methods tpo_token --eta 0.5         # temperature sweep: eta 0.25 ... 4
    python token_tasks.py --benchmark                           # seconds per seed-episode, GFLOP/s
    python token_tasks.py --report runs/token_tasks_terminal_reverse_copy_H8.json   # reprint a saved run's table

The defaults are the paper's settings: V = 2, H = 10, K = 8, B = 100 prompts per episode,
4 gradient epochs per rollout batch (DG and PG: 1), Muon at lr 1e-3, 10 seeds (Table 1:
20), 1,000 episodes (terminal reward: 2,000). The paper's episodes to 1% error:
  Table 1, reverse copy, bag-of-tokens, V = 2/4/8/16: TPO_token 58/74/103/102, GRPO_token
    904/141/124/148, DG 199/273/314/393, PPO 872/181/191/259.
  Table 2, V = 2, copy/flip/reverse copy/reverse flip: bag-of-tokens TPO_token 81/56/55/59,
    GRPO_token 338/104/352/209, DG 219/201/202/200, PPO 170/146/never/143; sequential
    TPO_token 295/321/159/276, DG 439/349/515/309, GRPO_token and PPO never.
  Table 3, terminal reward, reverse copy, final exact-match error % at H = 7/8/9/10:
    prompt-matched TPO 6.9/8.6/6.1/7.4, GRPO 14.5/27.6/30.0/50.4, GRPO no-KL
    66.6/92.5/>95/>95, PPO 12.0/26.3/90.6/>95, DG 33.8/58.8/>95/>95; interaction-matched
    TPO 1.8/2.8/5.3/19.0, GRPO 9.6/23.2/36.2/48.7.
  Ablations at H = 10: TPO 7.4% while TPO without the anchor, Group PG and GRPO without
    KL stay above 99%. Temperature (reverse copy, TPO_token): eta 0.25/0.5/1/2/4 -> 72/67/96/141/260.

The model (2-layer pre-norm decoder) and optimizer (optax's Muon) are the authors',
batched over seeds. A group is K next tokens drawn at each state of one answer
(tpo_token, grpo_token) or K whole answers per prompt (tpo, grpo, their variants,
group_pg); ppo, dg and pg take one answer per prompt. GRPO's KL is taken to the rollout
policy (logp_old), as in the authors' code, not to a frozen reference model. Error is
1 - mean reward of each episode's own training rollouts: there is no held-out set.
"""

import argparse
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import tpo

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--target", choices=["copy", "flip", "reverse_copy", "reverse_flip"], default="reverse_copy",
                    help="answer as a function of the prompt (paper Table 1: reverse_copy; Table 2: all four)")
parser.add_argument("--reward", choices=["bag_of_tokens", "sequential", "terminal"], default="bag_of_tokens")
parser.add_argument("--V", type=int, default=2, help="vocabulary size (paper: 2; Table 1 also 4, 8, 16)")
parser.add_argument("--H", type=int, default=10, help="prompt and answer length (paper: 10; terminal 7-10; diagnostics 8)")
parser.add_argument("--K", type=int, default=8, help="candidates per group (paper: 8; diagnostics 32, sweep 4-64)")
parser.add_argument("--B", type=int, default=100, help="prompts per episode (paper: 100; diagnostics 256)")
parser.add_argument("--episodes", type=int, default=1000, help="rollout batches (paper: 1,000 dense, 2,000 terminal)")
parser.add_argument("--seeds", type=int, default=10,
                    help="independent runs, batched (paper: 10 in Table 2 and the temperature sweep, 20 in Table 1)")
parser.add_argument("--epochs", type=int, default=4, help="gradient epochs per rollout batch for PPO, GRPO, TPO (paper: 4)")
parser.add_argument("--eta", type=float, default=1.0, help="TPO and DG temperature (paper: 1; sweep 0.25-4)")
parser.add_argument("--lr", type=float, default=1e-3, help="Muon and Adam learning rate (paper: 1e-3)")
parser.add_argument("--matching", choices=["prompt", "interaction"], default="prompt",
                    help="terminal reward: interaction gives ppo/dg/pg B*K prompts per step and lr*sqrt(K) (paper: both)")
parser.add_argument("--methods", default=None,
                    help="comma list; default tpo_token,grpo_token,dg,ppo (dense) or tpo,grpo,grpo_no_kl,ppo,dg (terminal)")
parser.add_argument("--optimizer", choices=["muon", "adam"], default="muon",
                    help="muon: Muon on the authors' 2-D tensors, Adam on the rest (paper); adam: Nesterov Adam on all")
parser.add_argument("--d-model", type=int, default=64, help="transformer width (paper: 64); FFN is 4x")
parser.add_argument("--layers", type=int, default=2, help="transformer layers (paper: 2)")
parser.add_argument("--heads", type=int, default=2, help="attention heads (authors' code: 2; paper's text: 4)")
parser.add_argument("--seed", type=int, default=0, help="seed i of a run uses generator seed --seed + i")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model trains (default: cuda when there is a GPU); random draws stay on the CPU, "
                         "so a seed draws the same prompts and uniforms on any device")
parser.add_argument("--threads", type=int, default=0,
                    help="CPU threads (default: one per core that other processes leave idle, judged by their CPU "
                         "time over half a second at start; torch's threads slow down several-fold when one of them shares a core)")
parser.add_argument("--out", default=None,
                    help="JSON path; PNG beside it (default runs/token_tasks_<reward>_<target>, then each other "
                         "setting that is not its default, e.g. _H8_K32_B256; --episodes is left out)")
parser.add_argument("--resume", action="store_true",
                    help="same --out and settings: keep finished methods (also those --methods leaves out), "
                         "continue an interrupted one from its last save, carry finished ones on to a larger --episodes")
parser.add_argument("--overwrite", action="store_true",
                    help="replace the results and training states at --out even if they were run with other settings "
                         "(without it such a run is refused; one with the same settings keeps the methods it does not train)")
parser.add_argument("--report", metavar="JSON", default=None,
                    help="print the table of a finished run's JSON and redraw its PNG, without training")
parser.add_argument("--benchmark", action="store_true",
                    help="time terminal-reward TPO at H=8, V=2, K=8, B=100, 4 epochs with 1 and 8 seeds, then exit")


# ---------------------------------------------------------------------------
# Task: prompts, correct answers, rewards (all [S seeds, N answers, H])
# ---------------------------------------------------------------------------
TARGETS = {
    "copy": lambda x, V: x,
    "flip": lambda x, V: V - 1 - x,
    "reverse_copy": lambda x, V: x.flip(-1),
    "reverse_flip": lambda x, V: V - 1 - x.flip(-1),
}

# correct: bool [..., H], True where the answer token is right -> reward [..., H] in {0, 1}
REWARDS = {
    "bag_of_tokens": lambda correct: correct.float(),
    "sequential": lambda correct: correct.float().cumprod(-1),
    "terminal": lambda correct: correct.all(-1, keepdim=True).float().expand(correct.shape),
}
DENSE = ("bag_of_tokens", "sequential")


def candidate_rewards(reward, correct, cand_correct):
    """Token reward of each next-token candidate at each state of the behaviour answer.

    correct [S, B, H] (behaviour answer), cand_correct [S, B, H, K] -> [S, B, H, K].
    A candidate at position t earns what position t would have earned had it
    been played there; for sequential reward a state after the behaviour's
    first mistake therefore scores every candidate 0.
    """
    if reward == "bag_of_tokens":
        return cand_correct.float()
    if reward == "sequential":
        prefix_ok = F.pad(correct.float().cumprod(-1)[..., :-1], (1, 0), value=1.0)  # all tokens before t right
        return cand_correct.float() * prefix_ok[..., None]
    raise ValueError(f"{reward} reward has no per-token candidate score")


def per_seed(gens, draw, device=None):
    """One draw per seed from its own (CPU) generator, stacked on a leading seed dimension, moved to device."""
    return torch.stack([draw(g) for g in gens]).to(device)


# ---------------------------------------------------------------------------
# Model: S independent transformers as batched weight tensors
# ---------------------------------------------------------------------------
# Weights are stored as in Flax, kernels [S, fan_in, fan_out] and vectors
# [S, 1, n] (so they broadcast over tokens), and the shapes Muon sees are
# Flax's: the q/k/v biases are [S, 3, heads, head_dim].
MUON = ("tok_emb", "pos_emb", "bqkv", "w1", "w2", "w_out")  # name suffixes trained by Muon; the rest by Adam


def init_params(args, gens):
    d, V, L, nh = args.d_model, args.V, args.layers, args.heads

    def lecun(g, fan_in, *shape):  # truncated normal at 2 std with variance 1/fan_in (Flax's default kernel init)
        std = 1 / math.sqrt(fan_in) / 0.87962566103423978
        return torch.nn.init.trunc_normal_(torch.empty(*shape), std=std, a=-2 * std, b=2 * std, generator=g)

    def one_seed(g):
        # Flax's nn.Embed default is N(0, 1/d) for the token table; the authors draw the position table from
        # N(0, 0.02^2). The position scale decides how fast every method learns per episode (0.125 instead of
        # 0.02 makes their code reach 1% three times sooner), so it is the authors' value, not 1/sqrt(d).
        p = {"tok_emb": torch.randn(V, d, generator=g) / math.sqrt(d),
             "pos_emb": 0.02 * torch.randn(2 * args.H, d, generator=g)}  # the last position is never an input
        for l in range(L):
            p |= {f"{l}.ln1_g": torch.ones(1, d), f"{l}.ln1_b": torch.zeros(1, d),
                  f"{l}.wqkv": lecun(g, d, d, 3 * d), f"{l}.bqkv": torch.zeros(3, nh, d // nh),
                  f"{l}.wo": lecun(g, d, d, d), f"{l}.bo": torch.zeros(1, d),
                  f"{l}.ln2_g": torch.ones(1, d), f"{l}.ln2_b": torch.zeros(1, d),
                  f"{l}.w1": lecun(g, d, d, 4 * d), f"{l}.b1": torch.zeros(1, 4 * d),
                  f"{l}.w2": lecun(g, 4 * d, 4 * d, d), f"{l}.b2": torch.zeros(1, d)}
        return p | {"lnf_g": torch.ones(1, d), "lnf_b": torch.zeros(1, d),
                    "w_out": lecun(g, d, d, V), "b_out": torch.zeros(1, V)}

    seeds = [one_seed(g) for g in gens]
    return {k: torch.stack([s[k] for s in seeds]).to(args.device).requires_grad_(True) for k in seeds[0]}


def n_layers(P):
    return sum(k.endswith(".wqkv") for k in P)


def layer_norm(h, g, b):
    return torch.addcmul(b, F.layer_norm(h, h.shape[-1:], eps=1e-6), g)


def block(P, l, h, attend):
    """One pre-norm layer on h [S, M rows, d]; attend(l, qkv) mixes the rows."""
    S = h.shape[0]
    a = layer_norm(h, P[f"{l}.ln1_g"], P[f"{l}.ln1_b"])
    qkv = torch.baddbmm(P[f"{l}.bqkv"].view(S, 1, -1), a, P[f"{l}.wqkv"])
    h = h + torch.baddbmm(P[f"{l}.bo"], attend(l, qkv), P[f"{l}.wo"])
    a = layer_norm(h, P[f"{l}.ln2_g"], P[f"{l}.ln2_b"])
    a = F.gelu(torch.baddbmm(P[f"{l}.b1"], a, P[f"{l}.w1"]), approximate="tanh")  # Flax's nn.gelu default
    return h + torch.baddbmm(P[f"{l}.b2"], a, P[f"{l}.w2"])


def split_heads(qkv, T, nh):
    """[S, n*T, 3d] (n sequences of T positions) -> q, k, v, each [S*n, heads, T, head_dim]."""
    return qkv.reshape(-1, T, 3, nh, qkv.shape[-1] // (3 * nh)).permute(2, 0, 3, 1, 4)


def merge_heads(o, S):
    return o.transpose(1, 2).reshape(S, -1, o.shape[1] * o.shape[3])  # [S*n, heads, T, hd] -> [S, n*T, d]


def embed(P, tokens, pos):
    # tokens [S, n, T] at positions pos [T] -> [S, n*T, d]
    S, n, T = tokens.shape
    h = P["tok_emb"][torch.arange(S, device=tokens.device).view(S, 1, 1), tokens] + P["pos_emb"][:, None, pos]
    return h.view(S, n * T, -1)


def head(P, h):
    return torch.baddbmm(P["b_out"], layer_norm(h, P["lnf_g"], P["lnf_b"]), P["w_out"])


def answer_logprobs(P, x, y):
    """Teacher forcing: log pi(. | x, y_<t) at every answer position t, in one pass.

    x [S, B, H] prompts, y [S, B*K, H] answers (a prompt's K answers adjacent)
    -> [S, B*K, H, V]. Attention is causal and a prompt's K answers share it,
    so each prompt and its answers are packed into one row of H + K(H-1)
    positions (the last answer token is never an input): the prompt, then
    each answer, with a mask that lets an answer see the prompt and its own
    earlier tokens only. The prompt is encoded once instead of K times.
    """
    S, B, H = x.shape
    K, dev = y.shape[1] // B, x.device
    answer_of = torch.cat([torch.full((H,), -1, device=dev), torch.arange(K, device=dev).repeat_interleave(H - 1)])
    T = len(answer_of)  # -1 above: the prompt
    pos = torch.cat([torch.arange(H, device=dev), torch.arange(H, 2 * H - 1, device=dev).repeat(K)])
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    allowed = causal & ((answer_of[None, :] == -1) | (answer_of[None, :] == answer_of[:, None]))
    mask = torch.zeros(T, T, device=dev).masked_fill(~allowed, float("-inf"))  # additive: faster than bool on the CPU
    nh = P["0.bqkv"].shape[-2]

    def attend(l, qkv):
        q, k, v = split_heads(qkv, T, nh)
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), S)

    h = embed(P, torch.cat([x, y[..., :-1].reshape(S, B, K * (H - 1))], -1), pos)  # [S, B*T, d]
    for l in range(n_layers(P)):
        h = block(P, l, h, attend)
    # answer k's token t is predicted at the prompt's last position (t = 0) or at its own token t-1
    rows = torch.cat([torch.full((K, 1), H - 1, device=dev),
                      H + (H - 1) * torch.arange(K, device=dev)[:, None] + torch.arange(H - 1, device=dev)], 1)
    h = h.view(S, B, T, -1)[:, :, rows.flatten()].view(S, B * K * H, -1)
    return torch.log_softmax(head(P, h), -1).view(S, B * K, H, -1)


# ---------------------------------------------------------------------------
# Rollout: sample answers with a key/value cache, score them
# ---------------------------------------------------------------------------

@torch.no_grad()
def sample(P, x, gens, n_answers=1, n_draws=1):
    """n_answers answers per prompt, with n_draws tokens drawn at every state.

    x [S, B, H] -> draws [S, B*n_answers, H, n_draws] (a prompt's answers
    adjacent) and lp [S, B*n_answers, H, V], the log-probs the tokens were
    drawn from. Draw 0 is played: the answer continues with it. All n_draws
    draws of a state, the played one included, are its token-level group, as
    in the authors' code (K draws per state in all). The prompt is encoded
    once, its keys and values are copied to its answers' caches, then each
    step feeds one token.
    """
    S, B, H = x.shape
    N, L, nh = B * n_answers, n_layers(P), P["0.bqkv"].shape[-2]
    cache = [None] * L

    def prefill(l, qkv):
        q, k, v = split_heads(qkv, H, nh)
        cache[l] = [torch.cat([t.repeat_interleave(n_answers, 0), t.new_empty(N * S, nh, H - 1, t.shape[-1])], 2)
                    for t in (k, v)]  # [S*N, heads, 2H-1, head_dim]
        return merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True), S)

    def decode(pos):
        def attend(l, qkv):
            q, k, v = split_heads(qkv, 1, nh)
            cache[l][0][:, :, pos], cache[l][1][:, :, pos] = k[:, :, 0], v[:, :, 0]
            return merge_heads(F.scaled_dot_product_attention(q, cache[l][0][:, :, :pos + 1], cache[l][1][:, :, :pos + 1]), S)
        return attend

    h = embed(P, x, torch.arange(H, device=x.device))
    for l in range(L):
        h = block(P, l, h, prefill)
    logits = head(P, h.view(S, B, H, -1)[:, :, -1]).repeat_interleave(n_answers, 1)  # [S, N, V]
    draws = torch.empty(S, N, H, n_draws, dtype=torch.long, device=x.device)
    lp = torch.empty(S, N, H, logits.shape[-1], device=x.device)
    for t in range(H):
        lp[:, :, t] = logits.log_softmax(-1)
        cdf = lp[:, :, t].exp().cumsum(-1)
        u = per_seed(gens, lambda g: torch.rand(N, n_draws, generator=g), x.device)
        draws[:, :, t] = (u[..., None] > cdf[:, :, None, :]).sum(-1).clamp(max=cdf.shape[-1] - 1)  # inverse CDF
        if t < H - 1:
            h = embed(P, draws[:, :, t:t + 1, 0], torch.tensor([H + t], device=x.device))
            for l in range(L):
                h = block(P, l, h, decode(H + t))
            logits = head(P, h)
    return draws, lp


def rollout(P, kind, args, gens, n_prompts):
    """One episode's rollout batch: prompts x [S, B, H], answers y, their token rewards r [S, N, H]."""
    b = SimpleNamespace(K=args.K if kind == "group" else 1)
    b.x = per_seed(gens, lambda g: torch.randint(args.V, (n_prompts, args.H), generator=g), args.device)
    correct = TARGETS[args.target](b.x, args.V).repeat_interleave(b.K, 1)  # the correct answer, per answer
    draws, _ = sample(P, b.x, gens, n_answers=b.K, n_draws=args.K if kind == "token" else 1)
    b.y = draws[..., 0]
    b.r = REWARDS[args.reward](b.y == correct)
    if kind == "token":
        b.cand = draws  # [S, B, H, K]: the played token and K - 1 more draws from the same state, with replacement
        b.cand_r = candidate_rewards(args.reward, b.y == correct, b.cand == correct[..., None])
    if kind == "group":
        b.scores = grouped(b.r.mean(-1), b.K)  # [S, B, K]; terminal: 1 for an exact answer
    return b


def grouped(t, K):
    """[S, B*K, ...] -> [S, B, K, ...]: a prompt's K answers side by side."""
    return t.view(t.shape[0], -1, K, *t.shape[2:])


# ---------------------------------------------------------------------------
# Update: one loss per method. lp [S, N, H, V] current log-probs; b.lp_old the
# same at rollout time (frozen on the first epoch). Losses are means, as in
# tpo.py: TPO's over groups, GRPO's, PPO's, DG's and PG's over tokens
# ---------------------------------------------------------------------------

def token_logp(lp, y):
    return lp.gather(-1, y[..., None])[..., 0]  # [S, N, H]


def seq_logp(lp, b):
    return grouped(token_logp(lp, b.y).sum(-1), b.K)  # a candidate's log-prob is the sum over its tokens: [S, B, K]


def tpo_token(lp, b, args):
    # all K candidates of a state share its logits: [S, B, H, K]
    return tpo.tpo_loss(lp.gather(-1, b.cand), b.lp_old.gather(-1, b.cand), b.cand_r, eta=args.eta)


def grpo_token(lp, b, args):
    return tpo.grpo_loss(lp.gather(-1, b.cand), b.lp_old.gather(-1, b.cand), tpo.group_advantages(b.cand_r))


def seed_mean(loss, *tensors):
    """The mean over seeds of loss(seed s's slice of every tensor), each a mean over that seed's own entries.

    For the masked methods: a masked mean over the whole [S, ...] tensor pools every seed's informative
    groups, so a seed's step would shrink or grow with how many its neighbours happen to have.
    """
    return torch.stack([loss(*(t[s] for t in tensors)) for s in range(tensors[0].shape[0])]).mean()


def tpo_seq(lp, b, args, anchor=True, masked=False):
    logp, logp_old = seq_logp(lp, b), seq_logp(b.lp_old, b)
    if not masked:
        return tpo.tpo_loss(logp, logp_old, b.scores, eta=args.eta, anchor=anchor)
    mask = tpo.informative_groups(b.scores)[..., None].expand_as(b.scores)
    return seed_mean(lambda *t: tpo.tpo_loss(*t[:3], eta=args.eta, anchor=anchor, mask=t[3]),
                     logp, logp_old, b.scores, mask)


def tpo_no_anchor(lp, b, args):
    return tpo_seq(lp, b, args, anchor=False)


def tpo_masked(lp, b, args):
    # not in the paper: on epochs 2+ a group scored all alike pulls p back to p_old (there q = p_old);
    # masking such groups shows how much that pull slows the escape from an all-fail start
    return tpo_seq(lp, b, args, masked=True)


def grpo_seq(lp, b, args, beta=0.04, masked=False):
    # token-level ratio and KL, every token carrying its answer's group advantage: [S, B, K, H]. The KL is
    # taken to the rollout policy (logp_old), as in the authors' code, not to a frozen reference model as in
    # DeepSeekMath's GRPO: it holds each epoch's step near the policy that sampled the batch.
    logp, logp_old = grouped(token_logp(lp, b.y), b.K), grouped(token_logp(b.lp_old, b.y), b.K)
    A = tpo.group_advantages(b.scores)[..., None].expand_as(logp)
    if not masked:
        return tpo.grpo_loss(logp, logp_old, A, beta=beta)
    mask = tpo.informative_groups(b.scores)[..., None, None].expand_as(logp)
    return seed_mean(lambda *t: tpo.grpo_loss(*t[:3], beta=beta, mask=t[3]), logp, logp_old, A, mask)


def grpo_no_kl(lp, b, args):
    return grpo_seq(lp, b, args, beta=0.0)


def grpo_masked(lp, b, args):
    return grpo_seq(lp, b, args, masked=True)


def group_pg(lp, b, args):
    return tpo.group_pg_loss(seq_logp(lp, b), b.scores) * b.K  # x K: a sum over each group, as TPO's cross-entropy


def batch_advantage(b):
    return b.r - b.r.mean(1, keepdim=True)  # each position's reward minus its mean over the seed's batch: no critic


def ppo(lp, b, args):
    return tpo.ppo_loss(token_logp(lp, b.y), token_logp(b.lp_old, b.y), batch_advantage(b))


def dg(lp, b, args):
    return tpo.dg_loss(token_logp(lp, b.y), batch_advantage(b), eta=args.eta)


def pg(lp, b, args):
    return tpo.pg_loss(token_logp(lp, b.y), batch_advantage(b))


# name: (loss, rollout, multi_epoch). rollout "token": one behaviour answer per
# prompt plus K next-token candidates at each of its states; "group": K answers
# per prompt; "single": one answer per prompt. multi_epoch: --epochs gradient
# steps per rollout batch, else one.
METHODS = {
    "tpo_token": (tpo_token, "token", True),
    "grpo_token": (grpo_token, "token", True),
    "tpo": (tpo_seq, "group", True),
    "tpo_no_anchor": (tpo_no_anchor, "group", True),
    "tpo_masked": (tpo_masked, "group", True),
    "grpo": (grpo_seq, "group", True),
    "grpo_no_kl": (grpo_no_kl, "group", True),
    "grpo_masked": (grpo_masked, "group", True),
    "group_pg": (group_pg, "group", True),
    "ppo": (ppo, "single", True),
    "dg": (dg, "single", False),
    "pg": (pg, "single", False),
}


# ---------------------------------------------------------------------------
# Optimizer: optax's Muon batched over the seed dimension, Nesterov Adam on the rest.
# torch.optim.Muon is not used: it has no bias correction, decays weights by
# default and refuses the leading seed dimension
# ---------------------------------------------------------------------------

def nesterov_moment(m, g, beta, t):
    """optax's bias-corrected Nesterov first moment at optimizer step t = 1, 2, ...

        m <- beta m + (1 - beta) g                                (in place)
        returns  beta m / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t)

    The bias correction matters early: at t = 1 the step follows g at full
    size instead of 5% of it (torch.optim.Muon has no correction).
    """
    m.lerp_(g, 1 - beta)
    return m * (beta / (1 - beta ** (t + 1))) + g * ((1 - beta) / (1 - beta ** t))


def newton_schulz(G, steps=5, coeffs=(3.4445, -4.775, 2.0315), eps=1e-8):
    """Approximately orthogonalise each matrix G[..., m, n] (optax's iteration, batched, in float32)."""
    a, b, c = coeffs
    wide = G.shape[-2] <= G.shape[-1]
    X = G if wide else G.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT


@torch.no_grad()
def muon_step(params, momenta, lr, t, beta=0.95):
    """optax.contrib.muon's update (no weight decay), kernels stored [.., fan_in, fan_out] as in Flax."""
    for p, m in zip(params, momenta):
        update = newton_schulz(nesterov_moment(m, p.grad, beta, t))
        p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.shape[-1] / p.shape[-2])))


@torch.no_grad()
def adam_step(params, moments, lr, t, b1=0.9, b2=0.999, eps=1e-8):
    """optax.adamw(nesterov=True, weight_decay=0): the branch optax's Muon gives non-matrix tensors."""
    for p, (m, v) in zip(params, moments):
        v.lerp_(p.grad.square(), 1 - b2)
        p.addcdiv_(nesterov_moment(m, p.grad, b1, t), (v / (1 - b2 ** t)).sqrt_().add_(eps), value=-lr)


# ---------------------------------------------------------------------------
# Main loop: rollout -> update (--epochs steps) -> log, all seeds of one method at once
# ---------------------------------------------------------------------------

def all_fail_fraction(kind, b):
    """Fraction of a seed's groups in which every candidate scored 0: [S], or None without groups."""
    scores = {"token": getattr(b, "cand_r", None), "group": getattr(b, "scores", None)}.get(kind)
    return None if scores is None else (scores.amax(-1) <= 0).float().flatten(1).mean(1)


def target_mass(method, b, args):
    """Mean over groups with a success of the TPO target's mass on successful candidates: [S]."""
    if method not in ("tpo_token", "tpo", "tpo_no_anchor", "tpo_masked"):
        return None
    if method == "tpo_token":
        logp_old, scores = b.lp_old.gather(-1, b.cand), b.cand_r
    else:
        logp_old, scores = seq_logp(b.lp_old, b), b.scores
    prior = torch.zeros_like(logp_old) if method == "tpo_no_anchor" else logp_old
    q = tpo.tpo_target(prior, tpo.standardize(scores), args.eta)
    success = scores >= 1  # token reward 1, or every token rewarded (terminal: exact match)
    mass, has = (q * success).sum(-1).flatten(1), success.any(-1).flatten(1)
    return (mass * has).sum(1) / has.sum(1).clamp(min=1)


def train(method, args, seeds, progress=False, ckpt=None, config=None):
    """Train one method for every seed in `seeds` at once; curves [S, episodes] and the training seconds.

    ckpt: a path where the whole training state is saved every tenth of the
    run and at its end; training continues from it if it exists, as the run
    that was never stopped, bit for bit.
    """
    loss_fn, kind, multi_epoch = METHODS[method]
    S = len(seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    P = init_params(args, gens)
    single_interaction = kind == "single" and args.matching == "interaction"
    n_prompts = args.B * args.K if single_interaction else args.B
    lr = args.lr * math.sqrt(args.K) if single_interaction else args.lr
    on_muon = lambda k: args.optimizer == "muon" and k.split(".")[-1] in MUON
    muon = [p for k, p in P.items() if on_muon(k)]
    adam = [p for k, p in P.items() if not on_muon(k)]
    momenta = [torch.zeros_like(p) for p in muon]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in adam]
    t = 0  # optimizer steps taken, for the bias corrections
    log = {"error": [], "grad_norm": [], "all_fail": [], "target_mass": []}
    start, before = 0, 0.0  # episodes and seconds already trained before an interruption
    state_tensors = list(P.values()) + momenta + [x for mv in moments for x in mv]
    if ckpt and os.path.exists(ckpt):
        try:
            state = torch.load(ckpt, weights_only=False, map_location=args.device)  # this script's own file: tensors, lists, numbers
        except Exception as e:
            fail(f"cannot resume {method} from {ckpt}: it is not a training state of this script ({e})")
        changed = sorted(k for k in config if k != "episodes" and state["config"].get(k) != config[k])
        if changed:
            fail(f"cannot resume {method} from {ckpt}: it was run with other settings ({', '.join(changed)})")
        if state["episode"] > args.episodes:
            fail(f"cannot resume {method} from {ckpt}: it has {state['episode']} episodes, more than --episodes")
        with torch.no_grad():
            for dst, src in zip(state_tensors, state["tensors"]):
                dst.copy_(src)
        for g, s in zip(gens, state["gens"]):
            g.set_state(s.cpu())
        t, log, start, before = state["t"], state["log"], state["episode"], state["seconds"]
        print(f"  {method}: continuing from episode {start} of {ckpt}", flush=True)
    t0, every = time.time(), max(1, args.episodes // 10)
    for episode in range(start, args.episodes):
        b = rollout(P, kind, args, gens, n_prompts)
        for epoch in range(args.epochs if multi_epoch else 1):
            lp = answer_logprobs(P, b.x, b.y)
            if epoch == 0:
                b.lp_old = lp.detach()  # the rollout policy: parameters have not moved since sampling
            # every loss is the mean over seeds of each seed's own mean (equal counts, or seed_mean): x S makes
            # it their sum, so each seed's parameters get exactly the gradient of its own loss
            loss = loss_fn(lp, b, args) * S
            for p in P.values():
                p.grad = None
            loss.backward()
            if epoch == 0:
                grad_norm = torch.stack([p.grad.flatten(1).square().sum(1) for p in P.values()]).sum(0).sqrt()
            t += 1
            muon_step(muon, momenta, lr, t)
            adam_step(adam, moments, lr, t)
        reward = b.r[..., 0] if args.reward == "terminal" else b.r  # exact match, or per token
        log["error"].append(1 - reward.flatten(1).mean(1))
        log["grad_norm"].append(grad_norm)
        log["all_fail"].append(all_fail_fraction(kind, b))
        log["target_mass"].append(target_mass(method, b, args))
        if progress and (episode + 1) % every == 0:
            print(f"  {method} episode {episode + 1}/{args.episodes}: error {float(log['error'][-1].mean()):.4f} "
                  f"(mean over {S} seeds), {time.time() - t0:.0f}s", flush=True)
        if ckpt and ((episode + 1) % every == 0 or episode + 1 == args.episodes):
            state = {"config": config, "episode": episode + 1, "t": t, "log": log, "seconds": before + time.time() - t0,
                     "gens": [g.get_state() for g in gens], "tensors": state_tensors}
            torch.save(state, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)  # a run killed while saving keeps the previous save
    curves = {k: torch.stack(v, 1) if v[0] is not None else None for k, v in log.items()}
    return curves | {"seconds": before + time.time() - t0}


# ---------------------------------------------------------------------------
# Report: what a run keeps of each method, and the table on stdout
# ---------------------------------------------------------------------------

def summarise(log, args):
    err, S = log["error"], log["error"].shape[0]
    last = max(1, round(0.05 * args.episodes))
    final = err[:, -last:].mean(1)  # [S]
    se = lambda t: (t.std(0) / math.sqrt(S)).tolist() if S > 1 else None
    mean = lambda t: None if t is None else t.mean(0).tolist()
    return {
        "error_mean": mean(err), "error_se": se(err),
        "grad_norm_mean": mean(log["grad_norm"]),
        "all_fail_fraction_mean": mean(log["all_fail"]),
        "target_mass_success_mean": mean(log["target_mass"]),
        "final_error": float(final.mean()), "final_error_se": float(final.std() / math.sqrt(S)) if S > 1 else None,
        "final_error_per_seed": final.tolist(),
        "steps_to_1pct": tpo.steps_to_threshold(err.mean(0), 0.01),
        "seconds": log["seconds"],
    }


def report(results, args):
    """The table on stdout: final error, episodes to 1%, how the first-epoch gradient norm and the share
    of all-fail groups moved from the first to the last 5% of episodes, and the first episode whose share
    of all-fail groups is below 90% (when learning leaves an all-fail start)."""
    unit = "exact-match error" if args.reward == "terminal" else "token error"
    print(f"\n{args.target}, {args.reward} reward, V={args.V}, H={args.H}, K={args.K}, B={args.B}, "
          f"{args.matching}-matched, {args.seeds} seeds, {args.episodes} episodes")
    print(f"({unit} = 1 - mean reward of the episode's own rollouts; final = mean of the last 5% of episodes, "
          "mean ± standard error over seeds; episodes to 1% = first episode (from 0) whose seed-mean error is below 0.01; "
          "grad norm and all-fail groups: seed mean, first 5% -> last 5% of episodes; all-fail < 90%: first episode "
          "whose seed-mean share of all-fail groups is below 0.9)")
    print(f"{'method':14s} {'final error':>20s} {'episodes to 1%':>15s} {'grad norm':>18s} {'all-fail groups':>16s} "
          f"{'all-fail < 90%':>15s}")
    n = max(1, round(0.05 * args.episodes))
    ends = lambda c: "" if c is None else f"{sum(c[:n]) / n:.3g} -> {sum(c[-n:]) / n:.3g}"
    for m, r in results.items():
        se = f" ± {r['final_error_se']:.4f}" if r["final_error_se"] is not None else ""
        hit = "never" if r["steps_to_1pct"] is None else str(r["steps_to_1pct"])
        fails = r["all_fail_fraction_mean"]
        left = "" if fails is None else tpo.steps_to_threshold(fails, 0.9)
        print(f"{m:14s} {r['final_error']:11.4f}{se:9s} {hit:>15s} {ends(r['grad_norm_mean']):>18s} "
              f"{ends(fails):>16s} {'never' if left is None else left:>15}")


# ---------------------------------------------------------------------------
# Run: argument checks, result files (--resume, --overwrite), every method in turn
# ---------------------------------------------------------------------------

def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def where(args):
    """The device a run trains on, in words (saved with its results)."""
    if torch.device(args.device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(args.device))
    return f"{torch.get_num_threads()} CPU thread(s)"


def check_args(args):
    dense = args.reward in DENSE
    args.methods = args.methods or ("tpo_token,grpo_token,dg,ppo" if dense else "tpo,grpo,grpo_no_kl,ppo,dg")
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        fail(f"unknown method(s) {bad}; choose from {sorted(METHODS)}")
    token = [m for m in methods if METHODS[m][1] == "token"]
    if token and not dense:
        fail(f"{','.join(token)} score each next-token candidate by its own token reward, which terminal reward "
             "does not give; use the sequence-level tpo or grpo")
    if args.matching == "interaction" and dense:
        fail("--matching interaction is for --reward terminal: in the dense runs ppo/dg/pg already follow the "
             "token methods' behaviour trajectories")
    if args.H < 2:
        fail("--H must be at least 2")
    for name in ("B", "episodes", "seeds", "epochs", "d_model", "layers", "heads"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.V < 2 or args.K < 2:
        fail("--V and --K must be at least 2")
    if args.d_model % args.heads:
        fail("--d-model must be a multiple of --heads")
    if not (args.eta > 0 and args.lr > 0):
        fail("--eta and --lr must be positive")
    if args.resume and args.overwrite:
        fail("--resume keeps what --out holds and --overwrite replaces it: choose one")
    return methods


def default_out(config):
    """runs/token_tasks_<reward>_<target>, then every setting that differs from its default, in the order of
    the arguments: e.g. runs/token_tasks_terminal_reverse_copy_H8_K32_B256.json. --episodes is left out, so a
    longer run of the same settings finds the shorter one (--resume carries it on)."""
    name = ["token_tasks", config["reward"], config["target"]]
    for k, v in config.items():
        if k in ("reward", "target", "episodes") or v == parser.get_default(k):
            continue
        name.append(v if isinstance(v, str) else k.replace("_", "-") + (f"{v:g}" if isinstance(v, float) else str(v)))
    return os.path.join("runs", "_".join(name) + ".json")


def changed_settings(old, config):
    return sorted(k for k in config if old.get(k) != config[k])


def read_results(out, what_now):
    """(methods, config) of a results file of this script, refused in one sentence if it is not one."""
    try:
        with open(out) as f:
            saved = json.load(f)
        return saved["methods"], saved["config"]
    except (OSError, ValueError, KeyError) as e:
        fail(f"{out} is not a results file of this script ({e}); {what_now}")


def load_finished(out, config):
    """--resume: the methods already in `out`, refused in one sentence if it was run with other settings."""
    if not os.path.exists(out):
        return {}
    finished, old = read_results(out, "cannot resume from it")
    changed = [k for k in changed_settings(old, config) if k != "episodes"]  # more episodes: carried on
    if changed:
        fail(f"cannot resume from {out}: it was run with other settings ({', '.join(changed)}); use another --out")
    return finished


def start_fresh(out, ckpt_dir, config, methods, overwrite):
    """A run without --resume: the methods of `out` it keeps. Results or training states of other settings
    are refused in one sentence before the first step, unless --overwrite: a default run must lose nothing."""
    ckpts = {m: os.path.join(ckpt_dir, f"{m}.pt") for m in METHODS}
    if overwrite:
        for path in ckpts.values():
            if os.path.exists(path):
                os.remove(path)  # a later --resume must not pick up a state of the replaced run
        return {}
    finished = {}
    if os.path.exists(out):
        finished, old = read_results(out, "choose another --out or pass --overwrite")
        changed = changed_settings(old, config)
        if changed:
            longer = changed == ["episodes"] and old["episodes"] < config["episodes"]
            hint = " (--resume carries it on to more episodes)" if longer else ""
            fail(f"{out} holds a run with other settings ({', '.join(changed)}){hint}; "
                 "choose another --out or pass --overwrite to replace it")
    for m in methods:  # a state without results: a run stopped before its first method finished
        if os.path.exists(ckpts[m]):
            try:
                old = torch.load(ckpts[m], weights_only=False, map_location="cpu")["config"]
            except Exception:
                continue  # not a training state of this script: nothing to lose
            changed = changed_settings(old, config)
            if changed:
                fail(f"{ckpts[m]} holds the training state of a run with other settings ({', '.join(changed)}); "
                     "continue it with --resume, choose another --out or pass --overwrite to replace it")
    return {m: r for m, r in finished.items() if m not in methods}


def main(argv=None):
    args = parser.parse_args(argv)
    if args.report:
        return reprint(args.report)
    torch.set_num_threads(args.threads or min(torch.get_num_threads(), tpo.idle_cores(os.cpu_count() or 1)))
    try:  # before --benchmark too, which trains on it
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        fail(f"--device {args.device} is not usable here ({str(e).splitlines()[0]})")
    if args.benchmark:
        return benchmark(args.device)
    methods = check_args(args)
    torch.manual_seed(args.seed)  # nothing should draw from the global generator; this makes sure it is fixed if it does

    not_settings = ("methods", "resume", "overwrite", "threads", "device", "out", "benchmark", "report")  # device: rounding only
    config = {k: v for k, v in vars(args).items() if k not in not_settings}
    out = args.out or default_out(config)
    ckpt_dir = os.path.splitext(out)[0] + ".ckpt"  # one training state per method
    results = load_finished(out, config) if args.resume else start_fresh(out, ckpt_dir, config, methods, args.overwrite)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    print(f"{args.target}, {args.reward} reward, V={args.V}, H={args.H}: {', '.join(methods)}, {args.seeds} seeds x "
          f"{args.episodes} episodes on {where(args)}, to {out}", flush=True)
    os.makedirs(ckpt_dir, exist_ok=True)
    for i, m in enumerate(methods):
        ckpt = os.path.join(ckpt_dir, f"{m}.pt")
        done = len(results[m]["error_mean"]) if m in results else 0
        if done == args.episodes:
            print(f"[{i + 1}/{len(methods)}] {m}: kept from {out}", flush=True)
            continue
        if done > args.episodes or (done and not os.path.exists(ckpt)):
            fail(f"cannot resume {m} from {out}: it ran {done} episodes and "
                 + ("--episodes asks for fewer" if done > args.episodes else f"its training state {ckpt} is gone"))
        if not args.resume and os.path.exists(ckpt):
            os.remove(ckpt)  # a fresh run must not pick up an old one's state
        log = train(m, args, range(args.seed, args.seed + args.seeds), progress=True, ckpt=ckpt, config=config)
        results[m] = summarise(log, args)
        print(f"[{i + 1}/{len(methods)}] {m}: {args.episodes} episodes x {args.seeds} seeds in {log['seconds']:.1f}s, "
              f"final error {results[m]['final_error']:.4f}", flush=True)
        with open(out, "w") as f:  # the finished methods; an interrupted one continues from its training state
            json.dump({"config": config, "device": where(args), "methods": results}, f)
    # --resume with fewer --methods keeps the file's other methods of the same length; one of another length
    # would be mislabelled by this run's settings, so it is dropped and named
    others = [m for m in results if m not in methods]
    dropped = [m for m in others if len(results[m]["error_mean"]) != args.episodes]
    if dropped:
        print(f"left out of {out}: {', '.join(dropped)} (run for another number of episodes)", flush=True)
    methods += [m for m in others if m not in dropped]
    results = {m: results[m] for m in methods}

    report(results, args)
    with open(out, "w") as f:
        json.dump({"config": config | {"methods": methods}, "device": where(args), "methods": results}, f)
    png = os.path.splitext(out)[0] + ".png"
    plot(results, args, png)
    print(f"\nwrote {out} and {png}")
    return results


# ---------------------------------------------------------------------------
# --- tools: not needed to train ---
# the PNG of a run, --report and --benchmark
# ---------------------------------------------------------------------------

def plot(results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("error_mean", "exact-match error" if args.reward == "terminal" else "token error", "log"),
              ("grad_norm_mean", "first-epoch gradient L2 norm", "log"),
              ("all_fail_fraction_mean", "fraction of all-fail groups", "linear"),
              ("target_mass_success_mean", "target mass on successful candidates", "linear")]
    w = max(1, args.episodes // 50)  # single episodes are noisy (the gradient norm spans decades): a moving average

    def smooth(curve):
        c = torch.tensor(curve, dtype=torch.float64).cumsum(0)
        return torch.cat([c[:w] / torch.arange(1, min(w, len(c)) + 1), (c[w:] - c[:-w]) / w]).tolist()

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (key, label, scale) in zip(axes, panels):
        for i, (m, r) in enumerate(results.items()):
            if r[key] is not None:  # a method keeps its colour in every panel, even where another has no curve
                ax.plot(smooth(r[key]), label=m, lw=1, color=f"C{i}")
        ax.set(xlabel="episode", ylabel=label)
        ax.set_yscale(scale, **({"nonpositive": "mask"} if scale == "log" else {}))  # an exact 0 leaves a gap
    axes[0].axhline(0.01, color="grey", lw=0.5, ls=":")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{args.target}, {args.reward} reward, V={args.V}, H={args.H}, K={args.K}, B={args.B}, "
                 f"{args.matching}-matched: mean over {args.seeds} seeds"
                 + (f", moving average over {w} episodes" if w > 1 else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reprint(path):
    """--report: the table and PNG of a saved run."""
    try:
        with open(path) as f:
            saved = json.load(f)
        args = parser.parse_args([])
        for k, v in saved["config"].items():
            setattr(args, k, v)
        results = saved["methods"]
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot read {path} as a results file of this script ({e})")
    report(results, args)
    png = os.path.splitext(path)[0] + ".png"
    plot(results, args, png)
    print(f"\nredrew {png}")
    return results


def model_flops(args, tokens):
    """Forward FLOPs of `tokens` positions (2 per multiply-add): the matmuls, and attention over 2H-1 keys."""
    d, T = args.d_model, 2 * args.H - 1
    per_token = args.layers * (2 * (3 * d * d + d * d + 8 * d * d) + 4 * T * d) + 2 * d * args.V
    return tokens * per_token


def benchmark(device, episodes=5):
    """Terminal-reward TPO at H=8, V=2, K=8, B=100, 4 epochs, with 1 and 8 seeds.

    GFLOP per seed-episode is the standard model count: the rollout as one
    forward over all B*K*(2H-1) positions, and each epoch as forward +
    backward = 3 forwards. The script does about 0.6 of that work, since it
    encodes each prompt once for its K answers (rollout and update alike),
    so GFLOP/s here is the standard count per second, as for the authors' code.
    """
    args = parser.parse_args(["--reward", "terminal", "--target", "reverse_copy", "--H", "8", "--V", "2", "--K", "8",
                              "--B", "100", "--epochs", "4", "--methods", "tpo", "--episodes", "1", "--device", device])
    flops = model_flops(args, args.B * args.K * (2 * args.H - 1)) * (1 + 3 * args.epochs)
    print(f"terminal-reward TPO, H={args.H}, V={args.V}, K={args.K}, B={args.B}, {args.epochs} epochs: "
          f"{flops / 1e9:.1f} GFLOP per seed-episode (standard count); {where(args)}")
    rows = []
    for S in (1, 8):
        train("tpo", args, range(S))  # warm-up: allocator, thread pool
        args.episodes = episodes
        t0 = time.perf_counter()
        train("tpo", args, range(S))
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()  # kernels still queued belong to the timed episodes
        sec = (time.perf_counter() - t0) / (episodes * S)
        args.episodes = 1
        rows.append({"seeds": S, "seconds_per_seed_episode": sec, "gflop_per_s": flops / sec / 1e9})
        print(f"{S} seed(s): {sec:.3f} s per seed-episode, {flops / sec / 1e9:.1f} GFLOP/s "
              f"(wall clock, mean over {episodes} episodes after one warm-up episode)", flush=True)
    return rows


if __name__ == "__main__":
    main()
