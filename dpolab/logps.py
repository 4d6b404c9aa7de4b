"""Per-sequence log-probs: the one place where logits become log-probs.

The decoder runs once over the batch; the LM head is applied only at the scored positions (the ones
that predict a completion token), in chunks of ``chunk`` tokens, so the [N, T, V] fp32 logits never
exist. With gradients on, each chunk is checkpointed: backward recomputes that chunk's logits instead of
keeping every chunk's alive, so peak logits memory is one chunk × V, whatever the sequence length.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor


def token_logps(hidden: Tensor, tokens: Tensor, head: nn.Module, softcap: float | None, scale: float | None) -> Tensor:
    """log p(token) for each row of ``hidden`` (M, H) and its target in ``tokens`` (M,) → (M,) fp32."""
    logits = head(hidden).float()  # (M, V)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class SequenceLogps(nn.Module):
    """Wraps a causal LM; ``forward`` returns the per-sequence sums of completion-token log-probs (S,).

    Distributed wrappers (DDP, FSDP) wrap this module, so gradients synchronise through its forward.
    """

    def __init__(self, model: nn.Module, chunk: int = 1024, ld_alpha: float | None = None):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.ld_alpha = ld_alpha  # LD-DPO: weight of tokens past the shorter answer of each pair
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Final hidden states (N, T, H) from the decoder, without the LM head."""
        decoder = self.model.get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, score_pos: Tensor,
                score_tok: Tensor, score_seq: Tensor, num_sequences: int) -> Tensor:
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)  # (N, T, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[score_pos]  # (M, H): only the scored positions
        head = self.model.get_output_embeddings()
        pieces = []
        for i in range(0, hidden.shape[0], self.chunk):
            h, t = hidden[i: i + self.chunk], score_tok[i: i + self.chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                pieces.append(checkpoint(token_logps, h, t, head, self.softcap, self.scale, use_reentrant=False))
            else:
                pieces.append(token_logps(h, t, head, self.softcap, self.scale))
        logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)  # (M,)
        if self.ld_alpha is not None:
            logps = logps * ld_weights(score_seq, num_sequences, self.ld_alpha)
        sums = logps.new_zeros(num_sequences)
        return sums.index_add(0, score_seq, logps)  # (S,)


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

