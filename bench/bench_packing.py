"""Packed vs padded micro-batches, and shared-prompt prefixes, for one GRPO step's forward + backward.

    python bench/bench_packing.py [--prompts 4] [--group 8] [--budget 2048] [--threads 2] [--repeats 2]

Inputs: `prompts` prompts of U(20, 60) tokens, `group` completions each of lognormal(4.5, 0.9) tokens clipped to
[4, 512] (high variance, as GRPO completions have); a random Qwen2 of 4 layers, hidden 256, 4 query / 2 KV heads,
MLP 1024, vocab 2048, fp32. One step = every micro-batch's forward and backward (gradient accumulation) of the
sum of completion-token log-probs; the harness (bench/harness.py) runs each case in a fresh process, so its
"forward" clock covers the whole step and peak memory is the step's RSS high-water mark above the resting model.

Cases:
  padded          fixed `mb_seqs` sequences per micro-batch in rollout order, right-padded to the longest, sdpa
  padded_sorted   the same after sorting by length (the usual cheap fix)
  packed          fastgrpo.packing: token-budget micro-batches, per-sequence attention, no padding
  group_full      one packed micro-batch per prompt group: G full sequences (the prompt computed G times)
  group_kv_cache  per group: the prompt once with a KV cache, then each completion against it (G+1 forwards)
  group_shared    per group: one packed row [prompt, c_1, ..., c_G], each c_i attending to the prompt and itself
                  (the prompt computed once, one forward); logp checked equal to group_full's at build time
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM

from fastgrpo.packing import PackingStats, pack, packed_forward, plan_micro_batches, token_logprobs
from harness import Step, environment, run_case

VOCAB = 2048
CASES = ("padded", "padded_sorted", "packed", "group_full", "group_kv_cache", "group_shared")


def make_rollout(prompts: int, group: int, seed: int = 0):
    """prompt ids per group, completion ids per sequence (group-major), both as 1-D long tensors."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    prompt_ids = [torch.randint(0, VOCAB, (rng.randint(20, 60),), generator=g) for _ in range(prompts)]
    completion_ids = [torch.randint(0, VOCAB, (min(512, max(4, int(rng.lognormvariate(4.5, 0.9)))),), generator=g)
                      for _ in range(prompts * group)]
    return prompt_ids, completion_ids


def full_sequences(prompt_ids, completion_ids, group):
    seqs = [torch.cat([prompt_ids[s // group], c]) for s, c in enumerate(completion_ids)]
    prompt_lengths = [len(prompt_ids[s // group]) for s in range(len(completion_ids))]
    return seqs, prompt_lengths


def padded_plan(lengths, mb_seqs, sort):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort else list(range(len(lengths)))
    return [order[i: i + mb_seqs] for i in range(0, len(order), mb_seqs)]


def make_model(seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).float().train()


# ----------------------------------------------------------------------------------------------------------
# One micro-batch's loss per case: the sum of completion-token log-probs (negated), over all the step's tokens.


def padded_loss(model, seqs, prompt_lengths, indices, scale):
    lengths = torch.tensor([len(seqs[i]) for i in indices])
    T = int(lengths.max())
    ids = torch.stack([F.pad(seqs[i], (0, T - len(seqs[i]))) for i in indices])  # (b, T)
    attention_mask = (torch.arange(T) < lengths[:, None]).long()  # (b, T)
    logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1].float()  # (b, T-1, V)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # (b, T-1)
    t = torch.arange(T - 1)
    prompt = torch.tensor([prompt_lengths[i] for i in indices])
    mask = (t + 1 < lengths[:, None]) & (t + 1 >= prompt[:, None])
    return -(logp * mask).sum() / scale


def packed_loss(model, seqs, prompt_lengths, indices, scale):
    p = pack(seqs, indices, prompt_lengths)
    logp = token_logprobs(packed_forward(model, p).logits, p)  # (N,)
    return -(logp * p.loss_mask).sum() / scale


def kv_cache_loss(model, prompt, completions, scale):
    """The prompt once with a cache; each completion then attends to it; the cache is cropped back after each."""
    P = len(prompt)
    out = model(input_ids=prompt[None], use_cache=True)
    cache, last = out.past_key_values, out.logits[0, -1].float()  # last prompt row predicts each c_i[0]
    total = 0.0
    for c in completions:
        logits = model(input_ids=c[None], past_key_values=cache, use_cache=True,
                       position_ids=torch.arange(P, P + len(c))[None]).logits[0, :-1].float()  # (L-1, V)
        logits = torch.cat([last[None], logits])  # (L, V): row j predicts c[j]
        total = total - torch.log_softmax(logits, -1).gather(-1, c[:, None]).sum()
        cache.crop(-len(c))  # back to the prompt alone
    return total / scale


SHARED = "bench_shared_prefix_sdpa"


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, cu_seq_lens_q=None, **kwargs):
    """One row [prompt, c_1, ..., c_G]: the prompt causal on itself, each c_i on the prompt then causally on itself.
    query (1, Hq, N, D) -> (1, N, Hq, D). cu_seq_lens_q's first segment is the prompt."""
    lengths = cu_seq_lens_q.diff().tolist()
    P = lengths[0]
    qs, ks, vs = (x.split(lengths, 2) for x in (query, key, value))
    sdpa = dict(scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    outs = [F.scaled_dot_product_attention(qs[0], ks[0], vs[0], is_causal=True, **sdpa)]
    for q, k, v in zip(qs[1:], ks[1:], vs[1:]):
        L = q.shape[2]
        mask = torch.arange(P + L)[None, :] <= torch.arange(L)[:, None] + P  # (L, P+L) lower-right causal
        outs.append(F.scaled_dot_product_attention(q, torch.cat([ks[0], k], 2), torch.cat([vs[0], v], 2),
                                                   attn_mask=mask, **sdpa))
    return torch.cat(outs, 2).transpose(1, 2), None


AttentionInterface.register(SHARED, shared_prefix_attention)


def shared_row_loss(model, prompt, completions, scale):
    P = len(prompt)
    lengths = torch.tensor([P] + [len(c) for c in completions])
    cu = F.pad(lengths.cumsum(0), (1, 0)).int()
    ids = torch.cat([prompt, *completions])[None]  # (1, P + sum L)
    positions = torch.cat([torch.arange(P)] + [torch.arange(P, P + len(c)) for c in completions])[None]
    previous, model.config._attn_implementation = model.config._attn_implementation, SHARED
    try:
        logits = model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, use_cache=False).logits[0].float()
    finally:
        model.config._attn_implementation = previous
    logp_rows = torch.log_softmax(logits, -1)  # (N, V)
    # c_i[0] is predicted by the prompt's last row, c_i[j] by c_i's row j-1
    starts = cu[1:-1].long()  # (G,) first row of each completion
    targets = torch.cat(completions)
    rows = torch.arange(P, ids.shape[1]) - 1  # row predicting each completion token
    first = torch.zeros(ids.shape[1] - P, dtype=torch.bool)
    first[starts - P] = True
    rows = torch.where(first, P - 1, rows)
    return -logp_rows[rows, targets].sum() / scale


# ----------------------------------------------------------------------------------------------------------
# The harness's builder and the report


def micro_batches(case, prompts, group, budget, mb_seqs, seed=0):
    """The case's micro-batches: lists of sequence indices (or of group indices for group_*)."""
    prompt_ids, completion_ids = make_rollout(prompts, group, seed)
    seqs, prompt_lengths = full_sequences(prompt_ids, completion_ids, group)
    lengths = [len(s) for s in seqs]
    if case == "packed":
        return plan_micro_batches(lengths, budget)[0]
    if case.startswith("padded"):
        return padded_plan(lengths, mb_seqs, sort=case == "padded_sorted")
    return [list(range(g * group, (g + 1) * group)) for g in range(prompts)]


def build(case, prompts, group, budget, mb_seqs, threads, seed=0, device="cpu"):
    torch.set_num_threads(threads)
    prompt_ids, completion_ids = make_rollout(prompts, group, seed)
    seqs, prompt_lengths = full_sequences(prompt_ids, completion_ids, group)
    model = make_model(seed)
    plan = micro_batches(case, prompts, group, budget, mb_seqs, seed)
    scale = float(sum(len(c) for c in completion_ids))  # completion tokens of the step

    def loss_of(indices):
        if case.startswith("padded"):
            return padded_loss(model, seqs, prompt_lengths, indices, scale)
        if case in ("packed", "group_full"):
            return packed_loss(model, seqs, prompt_lengths, indices, scale)
        prompt, completions = prompt_ids[indices[0] // group], [completion_ids[i] for i in indices]
        return (kv_cache_loss if case == "group_kv_cache" else shared_row_loss)(model, prompt, completions, scale)

    if case.startswith("group_") and case != "group_full":  # exactness of the prefix-sharing variants
        reference = sum(packed_loss(model, seqs, prompt_lengths, mb, scale) for mb in plan)
        got = sum(loss_of(mb) for mb in plan)
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)

    def step():
        total = torch.zeros(())
        for indices in plan:
            loss = loss_of(indices)
            loss.backward()  # per micro-batch: only one micro-batch's activations live at a time
            total += loss.detach()
        return total

    params = list(model.parameters())
    real_tokens = sum(len(s) for s in seqs)
    n_params = sum(p.numel() for p in params)
    return Step(forward=step, backward=lambda _: None, params=params, flops=6.0 * n_params * real_tokens,
                min_bytes=0.0, tokens=real_tokens)


def computed_tokens(case, prompts, group, budget, mb_seqs, seed=0):
    """Token rows the case computes: padding included; a shared prompt counted once."""
    prompt_ids, completion_ids = make_rollout(prompts, group, seed)
    seqs, _ = full_sequences(prompt_ids, completion_ids, group)
    plan = micro_batches(case, prompts, group, budget, mb_seqs, seed)
    if case.startswith("padded"):
        return sum(len(mb) * max(len(seqs[i]) for i in mb) for mb in plan)
    if case in ("group_kv_cache", "group_shared"):
        return sum(len(p) for p in prompt_ids) + sum(len(c) for c in completion_ids)
    return sum(len(s) for s in seqs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--budget", type=int, default=2048, help="packed: tokens per micro-batch")
    p.add_argument("--mb-seqs", type=int, default=4, help="padded: sequences per micro-batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    env = environment()
    params = dict(prompts=args.prompts, group=args.group, budget=args.budget, mb_seqs=args.mb_seqs,
                  threads=args.threads)
    prompt_ids, completion_ids = make_rollout(args.prompts, args.group)
    seqs, _ = full_sequences(prompt_ids, completion_ids, args.group)
    lengths = [len(s) for s in seqs]
    stats = PackingStats.from_plan(lengths, plan_micro_batches(lengths, args.budget))

    print(f"# Packing benchmark: one GRPO step's forward + backward\n")
    print(f"Machine: {env['cpu']}, {env['cores']} cores, {args.threads} torch threads, gpu {env['gpu']}  ")
    print(f"Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + f"  \nCommit: {env['commit']}")
    print(f"\nRollout: {args.prompts} prompts x G={args.group} = {len(seqs)} sequences, {sum(lengths)} tokens "
          f"(lengths {min(lengths)}..{max(lengths)}, mean {sum(lengths) / len(lengths):.0f}); packed budget "
          f"{args.budget} tokens: {stats.num_micro_batches} micro-batches of {stats.tokens_per_micro_batch} tokens.\n")
    print("| case | micro-batches | tokens computed | padding | step s | real tokens/s | peak extra MiB | loss |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for case in args.cases.split(","):
        row = run_case("bench_packing", "build", dict(params, case=case), warmup=1, repeats=args.repeats)
        n_mb = len(micro_batches(case, args.prompts, args.group, args.budget, args.mb_seqs))
        computed = computed_tokens(case, args.prompts, args.group, args.budget, args.mb_seqs)
        padding = 1 - sum(lengths) / computed if case.startswith(("padded", "packed")) else float("nan")
        if "total_s" not in row:
            print(f"| {case} | {n_mb} | {computed} | | | | | {row} |", flush=True)
            continue
        pad = "—" if padding != padding else f"{padding:.1%}"
        print(f"| {case} | {n_mb} | {computed} | {pad} | {row['total_s']:.2f} | {row['tokens_per_s']:.0f} | "
              f"{row['peak_extra_mib']:.0f} | {row['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
