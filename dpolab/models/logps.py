"""Per-sequence log-probs: the one place where logits become log-probs.

The decoder runs once over the batch; the LM head is applied only at the scored positions (the ones
that predict a completion token), in chunks of ``chunk`` tokens, so the [N, T, V] fp32 logits never
exist. With gradients on, each chunk is checkpointed: backward recomputes that chunk's logits instead of
keeping every chunk's alive, so peak logits memory is one chunk × V, whatever the sequence length.

Layouts that put several sequences in a row (:mod:`dpolab.data.batch`) describe who sees whom by segment and
branch ids; :data:`ATTENTION_MASKS` turns them into the mask form the model's attention implementation
takes. Transformers passes a 4D mask to the attention function untouched, so the form matters: SDPA takes a
bool mask (True = attend) or a float one that it adds to the scores (the form given it here), eager *adds* the
mask to the scores (a bool mask there would silently attend everywhere), FlexAttention takes a ``BlockMask``
and skips the blocks it masks out.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpolab.data.batch import dense_visible, visible
from dpolab.errors import ConfigError

Tensor = torch.Tensor


def sdpa_mask(segment_ids: Tensor, branch_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, 1, T, T) float: 0 where visible, −inf elsewhere, in the dtype attention computes in (autocast's
    when it is on). That is what SDPA makes of a bool mask, in every layer, keeping each layer's copy for
    backward (30 copies of 3.7 MB for SmolLM2's 8 rows of 349 tokens); made once here, the layers share it."""
    device = segment_ids.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    hidden = ~dense_visible(segment_ids, branch_ids)
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill(hidden, float("-inf"))


def additive_mask(segment_ids: Tensor, branch_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, 1, T, T) float: 0 where visible, the dtype's lowest value elsewhere (eager's form, as
    transformers builds it: finite, so a row's softmax never sees only −inf)."""
    hidden = ~dense_visible(segment_ids, branch_ids)
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill(hidden, torch.finfo(dtype).min)


def flex_block_mask(segment_ids: Tensor, branch_ids: Tensor, dtype: torch.dtype):
    """A FlexAttention ``BlockMask`` from the same rule, evaluated lazily per (query, key) block."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return visible(segment_ids[b, q], branch_ids[b, q], segment_ids[b, kv], branch_ids[b, kv], q, kv)

    N, T = segment_ids.shape
    return create_block_mask(mask_mod, B=N, H=None, Q_LEN=T, KV_LEN=T, device=segment_ids.device)


# The one place an attention implementation name is looked up: its form of a custom mask.
ATTENTION_MASKS = {"sdpa": sdpa_mask, "eager": additive_mask, "flex_attention": flex_block_mask}

# FlexAttention, as transformers compiles it, specialises its kernel to the row length: each new length
# compiles anew (a peer measured 14.7 s a compile on a GPU), and every batch of real data has a new one.
# Rows go in padded to a multiple of its block size instead, so a run sees at most max_length / 128 lengths;
# the added columns are padding (masked, segment −1) and their hidden states are dropped.
FLEX_BUCKET = 128
PADDING = dict(input_ids=0, attention_mask=0, position_ids=0, segment_ids=-1, branch_ids=0)  # as assemble pads


def attention_implementation(config) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def bucket_columns(T: int, tensors: dict[str, Tensor | None], fill: dict[str, int]) -> dict[str, Tensor | None]:
    """Each (N, t) tensor right-padded to T columns with its ``fill`` value (None stays None)."""
    return {k: None if t is None else nn.functional.pad(t, (0, T - t.shape[1]), value=fill[k])
            for k, t in tensors.items()}


def attention_mask_for(config, segment_ids: Tensor, branch_ids: Tensor, position_ids: Tensor,
                       dtype: torch.dtype):
    """The mask for a model with this ``config``; refuses what a custom mask cannot express."""
    impl = attention_implementation(config)
    if impl not in ATTENTION_MASKS:
        raise ConfigError(f"the prefix and packed layouts need an attention implementation that takes a custom "
                          f"mask ({', '.join(ATTENTION_MASKS)}); this model uses {impl}: pass --layout padded")
    window = getattr(config, "sliding_window", None)
    if window is not None and int(position_ids.max()) + 1 >= window:
        raise ConfigError(f"sequences reach the model's sliding window ({window} tokens), which a custom mask "
                          "does not apply: pass --layout padded")
    return ATTENTION_MASKS[impl](segment_ids, branch_ids, dtype)


def token_logps(hidden: Tensor, tokens: Tensor, head: nn.Module, softcap: float | None, scale: float | None,
                sum_sq: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """log p(token) for each row of ``hidden`` (M, H) and its target in ``tokens`` (M,) → (M,) fp32.
    ``sum_sq``: also ``log Σ_v p(v)²`` per row (M,), detached, from the same logits (WPO's alignment)."""
    logits = head(hidden).float()  # (M, V)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    lse = torch.logsumexp(logits, dim=-1)  # (M,)
    logps = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
    if not sum_sq:
        return logps
    with torch.no_grad():
        return logps, torch.logsumexp(2 * logits, dim=-1) - 2 * lse  # log Σ p² = log Σ e^{2z} − 2·log Σ e^z


class SequenceLogps(nn.Module):
    """Wraps a causal LM; ``forward`` returns the per-sequence sums of completion-token log-probs (S,).

    With ``aligned`` (WPO) it returns ``(sums, aligned)``: ``aligned`` (S,), detached, is each sequence's
    Σ_t (log p_t − log Σ_v p_t(v)²), the per-token log-probs "aligned" by the log of the sum of squared
    next-token probabilities (Zhou et al. 2024, eq. 2; TRL 1.16's ``use_weighting``). It is accumulated
    inside the chunked LM-head pass, so no [N, T, V] tensor appears for it either.

    Distributed wrappers (DDP, FSDP) wrap this module, so gradients synchronise through its forward.
    """

    def __init__(self, model: nn.Module, chunk: int = 256, ld_alpha: float | None = None, aligned: bool = False):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.ld_alpha = ld_alpha  # LD-DPO: weight of tokens past the shorter answer of each pair
        self.aligned = aligned
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)
        # rows go to the decoder padded to a multiple of this many columns (FlexAttention: its block size)
        self.bucket = FLEX_BUCKET if attention_implementation(config) == "flex_attention" else 1

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                      segment_ids: Tensor | None = None, branch_ids: Tensor | None = None) -> Tensor:
        """Final hidden states (N, T, H) from the decoder, without the LM head. With segment and branch ids
        the model gets the 4D mask they define instead of the 2D padding mask."""
        T = input_ids.shape[1]
        if T % self.bucket:
            cols = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        segment_ids=segment_ids, branch_ids=branch_ids)
            cols = bucket_columns(-(-T // self.bucket) * self.bucket, cols, PADDING)
            input_ids, attention_mask, position_ids, segment_ids, branch_ids = cols.values()
        if segment_ids is not None:
            attention_mask = attention_mask_for(self.model.config, segment_ids, branch_ids, position_ids,
                                                getattr(self.model, "dtype", torch.float32))
        decoder = self.model.get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state[:, :T]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, score_pos: Tensor,
                score_tok: Tensor, score_seq: Tensor, num_sequences: int, segment_ids: Tensor | None = None,
                branch_ids: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, segment_ids, branch_ids)  # (N, T, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[score_pos]  # (M, H): only the scored positions
        head = self.model.get_output_embeddings()
        pieces, sum_sq = [], []
        for i in range(0, hidden.shape[0], self.chunk):
            h, t = hidden[i: i + self.chunk], score_tok[i: i + self.chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                out = checkpoint(token_logps, h, t, head, self.softcap, self.scale, self.aligned, use_reentrant=False)
            else:
                out = token_logps(h, t, head, self.softcap, self.scale, self.aligned)
            pieces.append(out[0] if self.aligned else out)
            if self.aligned:
                sum_sq.append(out[1])
        logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)  # (M,)
        raw = logps
        if self.ld_alpha is not None:
            logps = logps * ld_weights(score_seq, num_sequences, self.ld_alpha)
        sums = logps.new_zeros(num_sequences).index_add(0, score_seq, logps)  # (S,)
        if not self.aligned:
            return sums
        aligned = (raw.detach() - torch.cat(sum_sq)) if sum_sq else raw.detach()  # (M,)
        return sums, aligned.new_zeros(num_sequences).index_add(0, score_seq, aligned)  # (S,), (S,)


def ld_weights(score_seq: Tensor, num_sequences: int, alpha: float) -> Tensor:
    """LD-DPO token weights (Liu et al. 2024): 1 for a pair's first l_p = min(n_c, n_r) completion tokens,
    α after. Sequences 2i and 2i+1 are a pair; each sequence's scored tokens appear in order.

    >>> ld_weights(torch.tensor([0, 0, 0, 1, 1]), 2, 0.5).tolist()
    [1.0, 1.0, 0.5, 1.0, 1.0]
    """
    n = torch.bincount(score_seq, minlength=num_sequences)  # (S,) tokens per sequence
    public = torch.minimum(n[0::2], n[1::2]).repeat_interleave(2)  # (S,) l_p of each sequence's pair
    order = torch.argsort(score_seq, stable=True)
    starts = torch.cumsum(n, 0) - n  # first sorted slot of each sequence
    rank = torch.empty_like(score_seq)
    rank[order] = torch.arange(score_seq.numel(), device=score_seq.device) - starts[score_seq[order]]
    ones = torch.ones(score_seq.shape, device=score_seq.device)
    return torch.where(rank < public[score_seq], ones, ones * alpha)

