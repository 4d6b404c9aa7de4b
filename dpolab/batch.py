"""Batch layouts: how tokenised examples become model inputs, and which positions are scored.

Every layout produces the same :class:`Batch`. Besides the model inputs it lists the *scored tokens*:
for each completion token, the flat position (row·T + column) whose output predicts it, the token id, and
the sequence it belongs to. Sequence ``s`` is completion ``s % K`` of example ``s // K`` (K = completions
per example; for paired data chosen is k = 0 and rejected k = 1). The log-prob function sums log-probs
of scored tokens per sequence, so prompt and padding never count, whatever the layout.

``padded``: one row per (example, completion), ``prompt + completion``, right-padded. All rows of the
batch go through one forward pass.

>>> ex = Example(0, prompt_ids=[5, 6], completion_ids=[[7, 2], [8, 9, 2]])
>>> b = collate([ex], pad_id=0)
>>> b.input_ids.tolist()
[[5, 6, 7, 2, 0], [5, 6, 8, 9, 2]]
>>> b.score_pos.tolist(), b.score_tok.tolist(), b.score_seq.tolist()
([1, 2, 6, 7, 8], [7, 2, 8, 9, 2], [0, 0, 1, 1, 1])
>>> b.lengths.tolist()
[2, 3]
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dpolab.tokenization import Example

Tensor = torch.Tensor


@dataclass
class Batch:
    input_ids: Tensor  # (N, T) token ids, N rows of length T
    attention_mask: Tensor  # (N, T) 1 for real tokens, 0 for padding
    position_ids: Tensor  # (N, T)
    score_pos: Tensor  # (M,) flat index into the N·T outputs: the position predicting each scored token
    score_tok: Tensor  # (M,) the scored token ids
    score_seq: Tensor  # (M,) the sequence each scored token belongs to, in [0, S)
    lengths: Tensor  # (S,) completion tokens per sequence
    example_ids: Tensor  # (B,) dataset index of each example
    num_completions: int  # K; S = B·K
    labels: Tensor | None = None  # (B,) bool, unpaired data
    margins: Tensor | None = None  # (B,) float, per-row margin column

    @property
    def num_sequences(self) -> int:
        return self.lengths.numel()

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens the model processes."""
        return int(self.attention_mask.sum())

    def model_inputs(self) -> dict[str, Tensor | int]:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids,
                    score_pos=self.score_pos, score_tok=self.score_tok, score_seq=self.score_seq,
                    num_sequences=self.num_sequences)

    def to(self, device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)


def collate(examples: list[Example], pad_id: int) -> Batch:
    """The padded layout (see the module docstring)."""
    K = len(examples[0].completion_ids)
    rows = [ex.prompt_ids + c for ex in examples for c in ex.completion_ids]  # N = B·K rows
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    score_pos, score_tok, score_seq, lengths = [], [], [], []
    for s, row in enumerate(rows):
        input_ids[s, : len(row)] = torch.tensor(row)
        attention_mask[s, : len(row)] = 1
        p = len(examples[s // K].prompt_ids)
        n = len(row) - p
        score_pos.extend(range(s * T + p - 1, s * T + len(row) - 1))  # position t−1 predicts token t
        score_tok.extend(row[p:])
        score_seq.extend([s] * n)
        lengths.append(n)
    position_ids = torch.arange(T).expand(len(rows), T).clone()
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        score_pos=torch.tensor(score_pos),
        score_tok=torch.tensor(score_tok),
        score_seq=torch.tensor(score_seq),
        lengths=torch.tensor(lengths),
        example_ids=torch.tensor([ex.index for ex in examples]),
        num_completions=K,
        labels=torch.tensor([bool(ex.label) for ex in examples]) if examples[0].label is not None else None,
        margins=torch.tensor([ex.margin or 0.0 for ex in examples], dtype=torch.float32)
        if any(ex.margin is not None for ex in examples) else None,
    )
