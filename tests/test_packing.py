"""Packing: planning, layout round trips, and exactness of the packed forward/backward against the unpacked one.

Tiny random models built here (2 layers, hidden 64, vocab 101, fp32, GQA 4 query / 2 KV heads; Qwen2 has q/k/v
biases, Llama none). The reference runs every sequence alone (batch 1, no padding, sdpa), so any leak across a
sequence boundary, a wrong position id or a misplaced output row shows up as a mismatch.
"""

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fastgrpo.packing import (IGNORE_INDEX, VARLEN_SDPA, PackingStats, _sdpa_per_sequence, attention_implementation,
                              completion_rows, completion_values, pack, packed_backward, packed_forward, plan_micro_batches, token_logprobs)

ATOL = 1e-5  # fp32; the packed and unpacked paths differ only in GEMM blocking
LENGTHS = [1, 2, 7, 33, 64, 5, 17, 40, 12, 3]  # one single-token sequence: no target at all


def tiny_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,  # peaked, not uniform
                  attn_implementation="sdpa")
    config = Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)
    model = Qwen2ForCausalLM(config) if kind == "qwen2" else LlamaForCausalLM(config)
    return model.float().eval()


def make_sequences(lengths, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def unpacked_logprobs(model, sequences):
    """Each sequence alone: (L-1,) log p(token t+1 | tokens <= t)."""
    out = []
    for ids in sequences:
        logits = model(input_ids=ids[None]).logits[0, :-1].float()  # (L-1, V)
        out.append(torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0])
    return out


def grpo_like_lengths(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(20, 60) + min(512, max(4, int(rng.lognormvariate(4.5, 0.9)))) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Planning


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_plan_covers_every_sequence_within_budget_and_balanced(num_ranks):
    lengths = grpo_like_lengths(64)
    budget = 2048
    plan = plan_micro_batches(lengths, budget, num_ranks)
    assert len(plan) == num_ranks
    assert len({len(rank) for rank in plan}) == 1  # same micro-batch count on every rank
    flat = sorted(i for rank in plan for mb in rank for i in mb)
    assert flat == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in mb) for rank in plan for mb in rank]
    assert max(loads) <= budget
    assert len(loads) <= max(num_ranks, math.ceil(sum(lengths) / budget) + num_ranks)  # near the minimum count
    assert max(loads) - min(loads) <= max(lengths)  # longest-first greedy: within one sequence
    rank_totals = [sum(sum(lengths[i] for i in mb) for mb in rank) for rank in plan]
    assert max(rank_totals) - min(rank_totals) <= max(lengths)


def test_plan_gives_a_sequence_over_budget_a_micro_batch_of_its_own():
    assert sorted(plan_micro_batches([10, 300], token_budget=256)[0]) == [[0], [1]]
    plan = plan_micro_batches([300, 290, 100, 100, 50], token_budget=256, num_ranks=2)
    micro_batches = [mb for rank in plan for mb in rank]
    assert [0] in micro_batches and [1] in micro_batches  # alone, each
    assert sorted(i for mb in micro_batches for i in mb) == [0, 1, 2, 3, 4]
    assert all(sum([300, 290, 100, 100, 50][i] for i in mb) <= 256 for mb in micro_batches if len(mb) > 1)
    with pytest.raises(ValueError, match="token_budget must be positive"):
        plan_micro_batches([10], token_budget=0)


def test_stats():
    lengths = grpo_like_lengths(64)
    plan = plan_micro_batches(lengths, 2048, num_ranks=2)
    stats = PackingStats.from_plan(lengths, plan)
    assert stats.padding_fraction == 0
    assert sum(stats.tokens_per_micro_batch) == sum(lengths)
    assert stats.num_micro_batches == len(plan[0])
    aligned = PackingStats.from_plan(lengths, plan, pad_to_multiple_of=64)
    assert 0 < aligned.padding_fraction <= 0.02  # the target, with GPU alignment
    assert set(aligned.as_dict()) >= {"packing/padding_fraction", "packing/num_micro_batches"}


# ----------------------------------------------------------------------------------------------------------
# Layout


def test_pack_layout_and_round_trips():
    seqs = make_sequences([3, 1, 4])
    p = pack(seqs, [2, 0, 1], prompt_lengths=[2, 1, 2], pad_to_multiple_of=5)
    assert p.input_ids[0, :8].tolist() == torch.cat([seqs[2], seqs[0], seqs[1]]).tolist()
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 0, 1]]
    assert p.cu_seqlens.tolist() == [0, 4, 7, 8] and p.cu_seqlens.dtype == torch.int32
    assert p.attn_cu_seqlens.tolist() == [0, 4, 7, 8, 10] and p.max_seqlen == 4
    assert p.targets[:3].tolist() == seqs[2][1:].tolist() and p.targets[3] == IGNORE_INDEX
    # completion targets only: seq 2 (prompt 2) rows 1, 2; seq 0 (prompt 2) row 1; seq 1 has no target
    assert p.loss_mask.tolist() == [False, True, True, False, False, True, False, False, False, False]

    per_seq = torch.randn(3, 4, 2)  # (S, T, ...) step layout
    rows = p.gather(per_seq)  # (N, 2)
    assert rows.shape == (10, 2) and (rows[8:] == 0).all()
    assert torch.equal(rows[4:7], per_seq[0, :3])
    back = p.scatter_into(torch.zeros_like(per_seq), rows)
    lengths = torch.tensor([3, 1, 4])
    valid = torch.arange(4) < lengths[:, None]
    assert torch.equal(back[valid], per_seq[valid])
    assert [t.shape[0] for t in p.unpack(rows)] == [4, 3, 1]


def test_completion_values_land_on_the_rows_that_predict_them():
    # sequences of prompt + completion; completion token j of sequence s is predicted by row prompt_len + j - 1
    prompts, completions = [[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [10, 11], [12]]
    seqs = [p + c for p, c in zip(prompts, completions)]
    per_completion = [[float(100 * s + j) for j in range(len(c))] for s, c in enumerate(completions)]
    p = pack(seqs, [2, 0, 1], prompt_lengths=[len(x) for x in prompts], pad_to_multiple_of=4)
    rows, _ = completion_rows(p)
    values = completion_values(p, per_completion)
    # the same values through the (S, T) layout: entry [s, t] is about predicting token t + 1
    per_seq = torch.zeros(3, 5)
    for s, (prompt, vals) in enumerate(zip(prompts, per_completion)):
        per_seq[s, len(prompt) - 1: len(prompt) - 1 + len(vals)] = torch.tensor(vals)
    assert torch.equal(values, p.gather(per_seq)[rows])
    assert torch.equal(p.targets[rows], torch.tensor([12, 7, 8, 9, 10, 11]))
    with pytest.raises(ValueError, match="one value per completion token"):
        completion_values(p, [v[:-1] for v in per_completion])


# ----------------------------------------------------------------------------------------------------------
# Exactness against the unpacked model


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_packed_logprobs_equal_unpacked(kind):
    model = tiny_model(kind)
    seqs = make_sequences(LENGTHS)
    assert attention_implementation(model) == VARLEN_SDPA
    with torch.no_grad():
        expected = unpacked_logprobs(model, seqs)
        for indices in plan_micro_batches(LENGTHS, token_budget=96)[0]:
            p = pack(seqs, indices, pad_to_multiple_of=8)
            logp = token_logprobs(packed_forward(model, p).logits, p)  # (N,)
            assert logp.shape == (p.input_ids.shape[1],)
            for i, got in zip(indices, p.unpack(logp)):
                torch.testing.assert_close(got[:-1], expected[i], atol=ATOL, rtol=0)
                assert got[-1] == 0  # no target after the last token
    assert model.config._attn_implementation == "sdpa"  # restored for generation


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_packed_step_gradients_equal_unpacked(kind, checkpointing):
    """With gradient checkpointing the backward recomputes the layers: packed_backward keeps their attention."""
    seqs = make_sequences(LENGTHS, seed=1)
    prompt_lengths = [max(1, n // 3) for n in LENGTHS]
    weights = torch.randn(len(seqs), max(LENGTHS))  # (S, T) per-token loss weights, like advantages / counts

    model = tiny_model(kind)
    for s, (ids, logp) in enumerate(zip(seqs, unpacked_logprobs(model, seqs))):
        rows = torch.arange(len(ids) - 1)
        completion = (rows + 1 >= prompt_lengths[s]).float()
        (weights[s, : len(ids) - 1] * completion * logp).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}

    model = tiny_model(kind)
    if checkpointing:
        model.train().gradient_checkpointing_enable()
    for indices in plan_micro_batches(LENGTHS, token_budget=96)[0]:  # gradient accumulation over micro-batches
        p = pack(seqs, indices, prompt_lengths)
        logp = token_logprobs(packed_forward(model, p).logits, p)
        packed_backward(model, (p.gather(weights) * p.loss_mask * logp).sum())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=ATOL, rtol=1e-4, msg=name)


def test_flash_attention_path_gets_varlen_kwargs(monkeypatch):
    """The CUDA path, run on CPU: transformers' flash_attention_2 integration with a stand-in for flash-attn's
    varlen kernel. Checks that our kwargs select the varlen branch with our cu_seqlens, and the result is exact."""
    fa_utils = pytest.importorskip("transformers.modeling_flash_attention_utils")
    if not all(hasattr(fa_utils, name) for name in ("_lazy_imports", "_loaded_implementation")):
        pytest.skip("this transformers version loads flash-attn differently")
    calls = []

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
               causal=False):  # flash-attn layout: (N, H, D)
        calls.append((cu_seqlens_q.tolist(), max_seqlen_q))
        lengths = cu_seqlens_q.diff().tolist()
        out = _sdpa_per_sequence(*(x.transpose(0, 1)[None] for x in (q, k, v)), lengths, softmax_scale, causal)
        return out[0].transpose(0, 1)

    def not_here(*args, **kwargs):
        raise AssertionError("packed rows must take the varlen kernel")

    monkeypatch.setattr(fa_utils, "_lazy_imports", lambda *a, **k: (not_here, varlen, None, not_here, not_here))
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)

    model = tiny_model("qwen2")
    model.config._attn_implementation = "flash_attention_2"  # what a CUDA model loaded with flash-attn has
    assert attention_implementation(model) == "flash_attention_2"
    seqs = make_sequences(LENGTHS)
    p = pack(seqs, list(range(len(seqs))))
    with torch.no_grad():
        logp = token_logprobs(packed_forward(model, p).logits, p)
        model.config._attn_implementation = "sdpa"
        expected = unpacked_logprobs(model, seqs)
    assert calls and calls[0] == (p.cu_seqlens.tolist(), max(LENGTHS))
    for got, want in zip(p.unpack(logp), expected):
        torch.testing.assert_close(got[:-1], want, atol=ATOL, rtol=0)


def test_varlen_attention_refuses_unpacked_calls():
    model = tiny_model("llama")
    model.config._attn_implementation = VARLEN_SDPA
    with pytest.raises(ValueError, match="packed rows only"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
