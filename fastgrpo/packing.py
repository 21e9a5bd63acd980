"""Sequence packing for RL and SFT: token-budget micro-batches, padding-free forward and backward, outputs mapped back.

A GRPO step holds B*G sequences (prompt + completion) whose lengths vary widely. Padding a micro-batch to its
longest sequence computes mostly padding; packing puts the k sequences of a micro-batch back to back in one row
(1, N) and keeps attention inside each sequence with cu_seqlens, so every token computed is a real one.

    lengths = [len(s) for s in sequences]                                   # the step's S = B*G sequences
    plan = plan_micro_batches(lengths, token_budget=8192, num_ranks=world)  # plan[rank][micro-batch] -> indices
    log(PackingStats.from_plan(lengths, plan).as_dict())
    for indices in plan[rank]:
        packed = pack(sequences, indices, prompt_lengths)   # input_ids / position_ids (1, N), cu_seqlens (k+1,)
        hidden = packed_hidden_states(model, packed)                                        # (N, H)
        loss, metrics = fused_linear_grpo_loss(hidden, model.lm_head.weight, packed.targets,
                                               advantages[packed.seq_indices], packed.loss_mask,
                                               packed.gather(old_logp), ..., cu_seqlens=packed.cu_seqlens)

Row t of a packed output is what the unpacked model computes at token t of its sequence, so it predicts token t+1:
`packed.targets` holds that next token and `packed.loss_mask` the rows whose target is a completion token.
Per-token tensors of the step in the per-sequence layout (S, T) in this same convention (entry [s, t] is about
predicting token t+1 of sequence s) go in with `gather` and come back with `scatter_into` / `unpack`; per-token
values of the completions alone (one list per sequence, entry j about completion token j) go straight to the loss's
completion rows with `completion_values`.

Attention never crosses a sequence boundary:
- a model running flash_attention_* (or on CUDA in fp16/bf16 with flash-attn installed) gets transformers'
  padding-free kwargs (cu_seq_lens_q/k, max_length_q/k), which select flash-attn's varlen kernel;
- otherwise `varlen_sdpa_attention`, registered in transformers' AttentionInterface, runs SDPA once per sequence:
  exact, no padding, no N x N mask. Measured on the 2-core CPU (fwd+bwd, N=3890 tokens in 28 sequences, 4 heads of
  64, 1 thread): per-sequence SDPA 54 ms; one SDPA over a dense block-diagonal mask 844 ms (it computes all N^2
  scores); flex attention with a block-causal BlockMask has no backward on CPU in torch 2.13 (forward 39 ms).
"""

from __future__ import annotations

import contextlib
import heapq
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.utils import is_flash_attn_2_available

IGNORE_INDEX = -100  # the label value transformers' and fastgrpo_kernels' cross-entropies skip
VARLEN_SDPA = "fastgrpo_varlen_sdpa"


# ----------------------------------------------------------------------------------------------------------
# Planning: which sequences go into which micro-batch, on which rank.


def plan_micro_batches(lengths: list[int], token_budget: int, num_ranks: int = 1) -> list[list[list[int]]]:
    """Split S sequences into num_ranks x M micro-batches of at most `token_budget` tokens (or one longer sequence).

    Returns plan[rank][micro_batch] = sorted sequence indices. Every rank gets the same M (data-parallel ranks run
    their forwards and backwards in lockstep), M as small as the budget allows. Tokens are balanced over all
    R*M micro-batches with longest-first greedy (each sequence to the lightest micro-batch), then the
    micro-batches are dealt heaviest first to the lightest rank, so both the micro-batches and the ranks' totals
    end up within about one short sequence of each other. A micro-batch is empty only when S < R*M. A sequence
    longer than the budget gets a micro-batch of its own (the budget bounds activation memory; one sequence is
    the least a forward can hold).

    >>> plan_micro_batches([5, 3, 3, 2, 1], token_budget=8)
    [[[0, 3], [1, 2, 4]]]
    >>> plan_micro_batches([12, 3, 2], token_budget=8)
    [[[0], [1, 2]]]
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    if any(n <= 0 for n in lengths):
        raise ValueError("every sequence needs at least one token")
    total = sum(lengths)
    longest_first = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    # At least a micro-batch per sequence over the budget, and enough for the others' tokens.
    over = [n for n in lengths if n > token_budget]
    least = len(over) + math.ceil((total - sum(over)) / token_budget)
    per_rank = max(1, math.ceil(least / num_ranks))
    # Greedy may not fit at the minimum count (bins near the budget); one more per rank until it does, at most S.
    while (bins := _longest_first_fit(lengths, longest_first, num_ranks * per_rank, token_budget)) is None:
        per_rank += 1
    loads = [sum(lengths[i] for i in b) for b in bins]
    ranks: list[list[list[int]]] = [[] for _ in range(num_ranks)]
    rank_heap = [(0, r) for r in range(num_ranks)]  # (tokens, rank); a rank leaves the heap once it holds M
    for b in sorted(range(len(bins)), key=lambda b: (-loads[b], b)):
        load, r = heapq.heappop(rank_heap)
        ranks[r].append(sorted(bins[b]))
        if len(ranks[r]) < per_rank:
            heapq.heappush(rank_heap, (load + loads[b], r))
    return ranks


def _longest_first_fit(lengths, longest_first, num_bins, budget) -> list[list[int]] | None:
    """Each sequence, longest first, into the lightest bin; None when the lightest bin cannot take it (an empty bin
    takes any sequence, over budget or not)."""
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    heap = [(0, b) for b in range(num_bins)]  # (tokens, bin)
    for i in longest_first:
        load, b = heapq.heappop(heap)
        if load and load + lengths[i] > budget:
            return None
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins


@dataclass
class PackingStats:
    """What one step's packing computed; log `as_dict()` every step."""

    padding_fraction: float  # of all token rows computed, the share that is padding (alignment only)
    tokens_per_micro_batch: list[int]  # rows computed per micro-batch, padding included, rank-major
    num_micro_batches: int  # per rank

    @classmethod
    def from_plan(cls, lengths: list[int], plan: list[list[list[int]]], pad_to_multiple_of: int = 1):
        real = [sum(lengths[i] for i in mb) for rank in plan for mb in rank]
        rows = [_round_up(n, pad_to_multiple_of) for n in real]
        return cls(padding_fraction=1 - sum(real) / max(sum(rows), 1), tokens_per_micro_batch=rows,
                   num_micro_batches=len(plan[0]))

    def as_dict(self) -> dict[str, float]:
        t = self.tokens_per_micro_batch
        return {"packing/padding_fraction": self.padding_fraction,
                "packing/num_micro_batches": float(self.num_micro_batches),
                "packing/tokens_per_micro_batch_mean": sum(t) / max(len(t), 1),
                "packing/tokens_per_micro_batch_max": float(max(t, default=0)),
                "packing/tokens_per_micro_batch_min": float(min(t, default=0))}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------------------------
# Packing one micro-batch, and mapping per-token tensors between the packed and per-sequence layouts.


@dataclass
class PackedBatch:
    """k sequences back to back in one row of N = num_tokens (+ alignment padding) tokens."""

    input_ids: torch.Tensor  # (1, N) long
    position_ids: torch.Tensor  # (1, N) long, restarting at 0 for every sequence (and for the padding tail)
    cu_seqlens: torch.Tensor  # (k+1,) int32 starts of the k sequences, ending at num_tokens: what the loss takes
    attn_cu_seqlens: torch.Tensor  # (k+1,) or (k+2,) int32: cu_seqlens plus the padding tail as its own segment
    max_seqlen: int  # longest segment of attn_cu_seqlens
    seq_indices: torch.Tensor  # (k,) long: which of the step's sequences, in packed order
    targets: torch.Tensor  # (N,) long: the next token of the same sequence; IGNORE_INDEX at each last token
    loss_mask: torch.Tensor  # (N,) bool: the rows whose target is a completion token
    num_tokens: int  # real tokens; rows num_tokens.. are alignment padding
    seq_of_token: torch.Tensor  # (num_tokens,) long: the step's sequence index of each real row

    def gather(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """(S, T, ...) per-sequence layout of the whole step -> (N, ...) packed rows; padding rows are 0."""
        out = per_sequence.new_zeros((self.input_ids.shape[1], *per_sequence.shape[2:]))
        out[: self.num_tokens] = per_sequence[self.seq_of_token, self.position_ids[0, : self.num_tokens]]
        return out

    def scatter_into(self, per_sequence: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """Write packed rows (N, ...) into the step's (S, T, ...) buffer at their sequences; returns the buffer."""
        per_sequence[self.seq_of_token, self.position_ids[0, : self.num_tokens]] = packed[: self.num_tokens]
        return per_sequence

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """(N, ...) -> k tensors (L_i, ...), in packed order (sequence seq_indices[i] first)."""
        return list(packed[: self.num_tokens].split(self.cu_seqlens.diff().tolist()))

    def to(self, device) -> PackedBatch:
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        return PackedBatch(**moved)


def pack(sequences: list[torch.Tensor | list[int]], indices: list[int], prompt_lengths=None,
         pad_to_multiple_of: int = 1, pad_token_id: int = 0) -> PackedBatch:
    """Pack sequences[i] for i in `indices` (prompt + completion token ids, no padding) into one row.

    prompt_lengths (S,) (list or tensor), when given, restricts loss_mask to completion targets. pad_to_multiple_of
    rounds N up (e.g. 64 on GPUs, for tensor-core shapes and fewer torch.compile recompiles); the tail is its own
    segment, so it attends only to itself, and is masked out of the loss.

    >>> p = pack([[5, 6, 7], [8, 9]], [0, 1], prompt_lengths=[1, 1])
    >>> p.input_ids.tolist(), p.position_ids.tolist(), p.cu_seqlens.tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]], [0, 3, 5])
    >>> p.targets.tolist(), p.loss_mask.tolist()
    ([6, 7, -100, 9, -100], [True, True, False, True, False])
    """
    if not indices:
        raise ValueError("cannot pack an empty micro-batch")
    seqs = [torch.as_tensor(sequences[i], dtype=torch.long) for i in indices]
    device = seqs[0].device
    lengths = torch.tensor([len(s) for s in seqs], device=device)  # (k,)
    n = int(lengths.sum())
    padded_n = _round_up(n, pad_to_multiple_of)
    starts = torch.cumsum(lengths, 0) - lengths  # (k,)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)  # (k+1,)
    seq_indices = torch.tensor(list(indices), dtype=torch.long, device=device)
    local_seq = torch.repeat_interleave(torch.arange(len(seqs), device=device), lengths)  # (n,)
    positions = torch.arange(n, device=device) - starts[local_seq]  # (n,)

    ids = torch.cat(seqs)  # (n,)
    has_next = positions < lengths[local_seq] - 1  # (n,) False at each sequence's last token
    targets = torch.full((padded_n,), IGNORE_INDEX, dtype=torch.long, device=device)
    targets[:n] = torch.where(has_next, ids.roll(-1), IGNORE_INDEX)
    loss_mask = torch.zeros(padded_n, dtype=torch.bool, device=device)
    loss_mask[:n] = has_next
    if prompt_lengths is not None:
        # Row t predicts token t+1: a completion target means t+1 >= prompt length.
        prompt = torch.as_tensor(prompt_lengths, device=device)[seq_indices][local_seq]  # (n,)
        loss_mask[:n] &= positions + 1 >= prompt

    tail = padded_n - n
    input_ids = F.pad(ids, (0, tail), value=pad_token_id)  # (N,)
    position_ids = torch.cat([positions, torch.arange(tail, device=device)])  # (N,)
    attn_cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([padded_n])]) if tail else cu_seqlens
    return PackedBatch(input_ids=input_ids[None], position_ids=position_ids[None], cu_seqlens=cu_seqlens,
                       attn_cu_seqlens=attn_cu_seqlens, max_seqlen=int(attn_cu_seqlens.diff().max()),
                       seq_indices=seq_indices, targets=targets, loss_mask=loss_mask, num_tokens=n,
                       seq_of_token=seq_indices[local_seq])


def completion_rows(packed):
    """Rows of `packed` whose target is a completion token, and their cu_seqlens (k+1,): what the loss takes."""
    rows = packed.loss_mask.nonzero().squeeze(1)  # (n,)
    counts = torch.bincount(torch.searchsorted(packed.cu_seqlens[1:], rows, right=True),
                            minlength=len(packed.seq_indices))  # (k,) completion tokens per sequence
    return rows, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def completion_values(packed: PackedBatch, per_completion: list) -> torch.Tensor:
    """Per-completion-token values of the step's sequences -> (n,) fp32 on the completion rows of `packed`, in
    `completion_rows` order: the rollout's sampling log-probs, or per-token advantages.

    per_completion[s][j] is about completion token j of sequence s, which the row before it predicts (row
    prompt length + j - 1); the completion rows of a packed batch are its sequences' completion tokens in packed
    order, so the values are those lists concatenated in seq_indices order.
    """
    values = torch.cat([torch.as_tensor(per_completion[s], dtype=torch.float32) for s in packed.seq_indices.tolist()])
    rows = int(packed.loss_mask.sum())
    if values.numel() != rows:
        raise ValueError(f"{values.numel()} per-token values for the {rows} completion tokens of the micro-batch "
                         f"(sequences {packed.seq_indices.tolist()}): one value per completion token is needed")
    return values.to(packed.input_ids.device)


def token_logprobs(logits: torch.Tensor, packed: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """(N, V) or (1, N, V) logits -> (N,) fp32 log-probs of packed.targets; 0 where there is no target.

    A plain reference (it holds (N, V) fp32 log-softmax); fastgrpo_kernels' selective_logprobs and fused-linear ops
    compute the same from the packed layout without it.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float() / temperature  # (N, V)
    valid = packed.targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, packed.targets.clamp(min=0)[:, None])[:, 0]  # (N,)
    return logp * valid


# ----------------------------------------------------------------------------------------------------------
# The forward and backward: attention chosen per device, kept inside each sequence.


def _sdpa_per_sequence(query, key, value, lengths: list[int], scale, causal: bool, dropout: float = 0.0):
    """query (1, Hq, N, D), key / value (1, Hkv, N, D) -> (1, Hq, N, D), attention within each segment only."""
    gqa = query.shape[1] != key.shape[1]
    outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=gqa)
            for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outs, dim=2)


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          sliding_window=None, cu_seq_lens_q=None, is_causal=None, **kwargs):
    """transformers attention function (AttentionInterface) for packed rows: SDPA per cu_seq_lens_q segment.

    query (1, Hq, N, D), key / value (1, Hkv, N, D) -> ((1, N, Hq, D), None). attention_mask is None: this name has
    no mask function registered, so transformers builds no mask for it.
    """
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(f"attention '{VARLEN_SDPA}' runs packed rows only (batch 1, no KV cache, cu_seq_lens_q): "
                         "call the model through fastgrpo.packing.packed_forward")
    lengths = cu_seq_lens_q.diff().tolist()
    if sliding_window is not None and max(lengths) > sliding_window:
        raise NotImplementedError("sliding-window layers are not supported by the packed SDPA path")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention softcap / sinks are not supported by the packed SDPA path")
    causal = module.is_causal if is_causal is None else is_causal
    out = _sdpa_per_sequence(query, key, value, lengths, scaling, causal, dropout)  # (1, Hq, N, D)
    return out.transpose(1, 2), None  # (1, N, Hq, D)


# Registered for attention only: transformers skips mask creation for a name its mask interface does not know.
AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)


def attention_implementation(model) -> str:
    """The attention a packed forward of `model` uses: flash-attn varlen on CUDA, exact per-sequence SDPA otherwise."""
    current = model.config._attn_implementation or ""
    if current.startswith("flash_attention"):
        return current
    param = next(model.parameters())
    if param.is_cuda and param.dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return VARLEN_SDPA


@contextlib.contextmanager
def _attention(config, implementation: str):
    # The attention modules read config._attn_implementation at call time, so switching it for one forward changes
    # the kernel and nothing else; the user's setting (e.g. sdpa for generation) comes back afterwards.
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed_forward(model, packed: PackedBatch, **kwargs):
    """Run a transformers decoder (a *ForCausalLM, or its base model for hidden states) on a packed batch.

    Returns the model's output unchanged: logits (1, N, V) or last_hidden_state (1, N, H); row t of sequence i is
    what the model computes for sequence i alone at position t.
    """
    varlen = dict(cu_seq_lens_q=packed.attn_cu_seqlens, cu_seq_lens_k=packed.attn_cu_seqlens,
                  max_length_q=packed.max_seqlen, max_length_k=packed.max_seqlen)
    with _attention(model.config, attention_implementation(model)):
        # use_cache=False: a cache would keep every layer's K/V of the whole row for nothing during training.
        return model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False, **varlen,
                     **kwargs)


def packed_hidden_states(model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Final (normed) hidden states (N, H) of a packed micro-batch, through the root module's forward.

    Under FSDP2 the root's forward is what gathers the embeddings, final norm and LM head (calling
    `model.base_model` directly would see shards); an empty `logits_to_keep` makes the LM head compute no logits,
    since the fused loss computes them chunk by chunk from these hidden states.
    """
    out = packed_forward(model, packed, output_hidden_states=True,
                         logits_to_keep=torch.empty(0, dtype=torch.long, device=packed.input_ids.device))
    return out.hidden_states[-1][0]  # (N, H)


def packed_backward(model: torch.nn.Module, loss: torch.Tensor) -> None:
    """loss.backward() for a loss computed from a packed forward (`packed_forward`, `packed_hidden_states`).

    With gradient checkpointing the backward recomputes each decoder layer, after packed_forward has switched the
    attention back to the model's own: without the packed attention switched on here too, the recomputation would
    run another attention and fail torch's check that it saved what the forward saved.
    """
    with _attention(model.config, attention_implementation(model)):
        loss.backward()
