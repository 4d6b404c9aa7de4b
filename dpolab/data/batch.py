"""Batch layouts: how tokenised examples become model inputs, and which positions are scored.

Every layout produces the same :class:`Batch`. Besides the model inputs it lists the *scored tokens*:
for each completion token, the flat position (row·T + column) whose output predicts it, the token id, and
the sequence it belongs to. Sequence ``s`` is completion ``s % K`` of example ``s // K`` (K = completions
per example; for paired data chosen is k = 0 and rejected k = 1), whatever the rows look like. The
log-prob function sums log-probs of scored tokens per sequence, so prompt and padding never count.

A row is a run of *segments* followed by padding. A segment is one example's tokens, with its own position
ids (from 0) and a branch id per token: 0 for the prompt, k + 1 for completion k. A token sees the earlier
tokens of its own segment that are in the prompt or in its own branch (:func:`visible`), so a completion
never sees another completion, and each segment is exactly the sequences it holds, run alone. A
completion's last token is scored but is not an input (no scored token comes after it), in every layout.

- ``padded``: one row per (example, completion), ``prompt + completion``, right-padded (:func:`collate`).
  The model gets the plain 2D padding mask, so any attention kernel serves.
- ``prefix``: one row per example, ``[prompt | completion_1 | ... | completion_K]``: the prompt is
  processed once, not K times (:func:`collate_prefix`).
- ``packed``: prefix-shared segments packed into rows of at most ``row_tokens`` tokens
  (:func:`collate_packed`); padding remains only at the end of rows.

``prefix`` and ``packed`` carry ``segment_ids`` and ``branch_ids``; :mod:`dpolab.models.logps` turns them into
the attention mask the model's attention implementation takes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from dpolab.errors import ConfigError
from dpolab.data.records import Example

Tensor = torch.Tensor


@dataclass
class Batch:
    input_ids: Tensor  # (N, T) token ids, N rows of length T
    attention_mask: Tensor  # (N, T) 1 for real tokens, 0 for padding
    position_ids: Tensor  # (N, T) restart at 0 in every segment
    score_pos: Tensor  # (M,) flat index into the N·T outputs: the position predicting each scored token
    score_tok: Tensor  # (M,) the scored token ids
    score_seq: Tensor  # (M,) the sequence each scored token belongs to, in [0, S)
    lengths: Tensor  # (S,) completion tokens per sequence
    example_ids: Tensor  # (B,) dataset index of each example
    num_completions: int  # K; S = B·K
    labels: Tensor | None = None  # (B,) bool, unpaired data
    margins: Tensor | None = None  # (B,) float, per-row margin column
    segment_ids: Tensor | None = None  # (N, T) segment of each token within its row, −1 for padding
    branch_ids: Tensor | None = None  # (N, T) 0 for prompt tokens, k + 1 for completion k's
    # (None, None: one sequence per row, and the 2D attention_mask says all)

    @property
    def num_sequences(self) -> int:
        return self.lengths.numel()

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens the model processes; a shared prompt counts once."""
        return int(self.attention_mask.sum())

    def model_inputs(self) -> dict[str, Tensor | int | None]:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids,
                    score_pos=self.score_pos, score_tok=self.score_tok, score_seq=self.score_seq,
                    num_sequences=self.num_sequences, segment_ids=self.segment_ids, branch_ids=self.branch_ids)

    def to(self, device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)


def visible(seg_q: Tensor, branch_q: Tensor, seg_kv: Tensor, branch_kv: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    """May the token at column ``q`` attend to the one at column ``kv`` of the same row? Elementwise, so it
    serves both as a dense mask (broadcast) and as a FlexAttention ``mask_mod``. Padding (segment −1) sees
    only padding, so no query row is fully masked (that gives NaN in some attention kernels)."""
    return (kv <= q) & (seg_q == seg_kv) & ((branch_kv == 0) | (branch_kv == branch_q))


def dense_visible(segment_ids: Tensor, branch_ids: Tensor) -> Tensor:
    """(N, T) ids → (N, 1, T, T) bool, True where a query (dim 2) may attend to a key (dim 3)."""
    cols = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    return visible(segment_ids[:, :, None], branch_ids[:, :, None], segment_ids[:, None, :], branch_ids[:, None, :],
                   cols[:, None], cols[None, :])[:, None]


class Segment(NamedTuple):
    """One run of tokens that sees only itself, with its scored tokens as offsets into it."""

    tokens: list[int]
    positions: list[int]
    branches: list[int]
    score_at: list[int]  # offset of the position predicting each scored token
    score_tok: list[int]
    score_seq: list[int]


def shared_segment(ex: Example, first_seq: int) -> Segment:
    """``[prompt | completion_1[:-1] | ... | completion_K[:-1]]``: each completion's positions restart at the
    prompt's end, and its first token is predicted by the prompt's last token. A completion's last token is
    only ever a target (nothing scored follows it), so it is not an input: a causal model's outputs at the
    other positions do not depend on it, and leaving it out saves one token per completion."""
    P = len(ex.prompt_ids)
    tokens, positions, branches = list(ex.prompt_ids), list(range(P)), [0] * P
    score_at, score_tok, score_seq = [], [], []
    for k, c in enumerate(ex.completion_ids):
        start = len(tokens)
        score_at += [P - 1] + list(range(start, start + len(c) - 1))
        score_tok += c
        score_seq += [first_seq + k] * len(c)
        tokens += c[:-1]
        positions += range(P, P + len(c) - 1)
        branches += [k + 1] * (len(c) - 1)
    return Segment(tokens, positions, branches, score_at, score_tok, score_seq)


def assemble(rows: list[list[Segment]], examples: list[Example], pad_id: int, masked: bool) -> Batch:
    """Right-pad the rows of segments to the longest and flatten their scored tokens. ``masked``: attach
    segment and branch ids (needed whenever a row holds more than one sequence)."""
    T = max(sum(len(s.tokens) for s in row) for row in rows)
    N = len(rows)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((N, T), dtype=torch.long)
    position_ids = torch.zeros((N, T), dtype=torch.long)  # padding: 0, inside any position table
    segment_ids = torch.full((N, T), -1, dtype=torch.long)
    branch_ids = torch.zeros((N, T), dtype=torch.long)
    score_pos, score_tok, score_seq = [], [], []
    for r, row in enumerate(rows):
        col = 0
        for j, s in enumerate(row):
            span = slice(col, col + len(s.tokens))
            input_ids[r, span] = torch.tensor(s.tokens)
            attention_mask[r, span] = 1
            position_ids[r, span] = torch.tensor(s.positions)
            segment_ids[r, span] = j
            branch_ids[r, span] = torch.tensor(s.branches)
            score_pos += [r * T + col + o for o in s.score_at]
            score_tok += s.score_tok
            score_seq += s.score_seq
            col += len(s.tokens)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        score_pos=torch.tensor(score_pos),
        score_tok=torch.tensor(score_tok),
        score_seq=torch.tensor(score_seq),
        lengths=torch.tensor([len(c) for ex in examples for c in ex.completion_ids]),
        example_ids=torch.tensor([ex.index for ex in examples]),
        num_completions=len(examples[0].completion_ids),
        labels=torch.tensor([bool(ex.label) for ex in examples]) if examples[0].label is not None else None,
        margins=torch.tensor([ex.margin or 0.0 for ex in examples], dtype=torch.float32)
        if any(ex.margin is not None for ex in examples) else None,
        segment_ids=segment_ids if masked else None,
        branch_ids=branch_ids if masked else None,
    )


def collate(examples: list[Example], pad_id: int) -> Batch:
    """The padded layout: one row per (example, completion), right-padded; rows in sequence order.

    >>> ex = Example(0, prompt_ids=[5, 6], completion_ids=[[7, 2], [8, 9, 2]])
    >>> b = collate([ex], pad_id=0)
    >>> b.input_ids.tolist()
    [[5, 6, 7, 0], [5, 6, 8, 9]]
    >>> b.score_pos.tolist(), b.score_tok.tolist(), b.score_seq.tolist()
    ([1, 2, 5, 6, 7], [7, 2, 8, 9, 2], [0, 0, 1, 1, 1])
    >>> b.lengths.tolist(), b.segment_ids
    ([2, 3], None)
    """
    K = len(examples[0].completion_ids)
    rows = [[shared_segment(Example(ex.index, ex.prompt_ids, [c]), b * K + k)]
            for b, ex in enumerate(examples) for k, c in enumerate(ex.completion_ids)]
    return assemble(rows, examples, pad_id, masked=False)


def collate_prefix(examples: list[Example], pad_id: int) -> Batch:
    """The prefix-sharing layout: one row per example, ``[prompt | completion_1 | ... | completion_K]``.

    >>> ex = Example(0, prompt_ids=[5, 6], completion_ids=[[7, 2], [8, 9, 2]])
    >>> b = collate_prefix([ex], pad_id=0)
    >>> b.input_ids.tolist(), b.position_ids.tolist(), b.branch_ids.tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 2, 2, 3]], [[0, 0, 1, 2, 2]])
    >>> b.score_pos.tolist(), b.score_tok.tolist(), b.score_seq.tolist()
    ([1, 2, 1, 3, 4], [7, 2, 8, 9, 2], [0, 0, 1, 1, 1])
    >>> dense_visible(b.segment_ids, b.branch_ids)[0, 0, 3].tolist()  # the rejected's 1st token: not 7
    [True, True, False, True, False]
    """
    K = len(examples[0].completion_ids)
    return assemble([[shared_segment(ex, b * K)] for b, ex in enumerate(examples)], examples, pad_id, masked=True)


def fill_rows(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped into rows of total ≤ ``budget`` (an item larger than the budget gets a
    row of its own). First-fit decreasing finds few rows (within 11/9 of the fewest); the items are then
    dealt, largest first, to the emptiest of that many rows, which evens their lengths, so the rectangle
    (rows × the longest row) holds little padding. The even deal is kept only if it respects the budget.

    >>> fill_rows([6, 5, 4, 3, 2], budget=16)  # first fit alone: rows of 15 and 5 tokens
    [[0, 3, 4], [1, 2]]
    >>> fill_rows([6, 5, 4, 3, 2], budget=10)  # an even deal (11 + 9) would overflow: first fit
    [[0, 2], [1, 3, 4]]
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    first_fit: list[list[int]] = []
    room: list[int] = []
    for i in order:
        r = next((r for r in range(len(first_fit)) if room[r] >= sizes[i]), None)
        if r is None:
            first_fit.append([])
            room.append(budget)
            r = len(first_fit) - 1
        first_fit[r].append(i)
        room[r] -= sizes[i]
    even: list[list[int]] = [[] for _ in first_fit]
    load = [0] * len(even)
    for i in order:
        r = load.index(min(load))
        even[r].append(i)
        load[r] += sizes[i]
    return even if max(load) <= max(budget, max(sizes)) else first_fit


def collate_packed(examples: list[Example], pad_id: int, row_tokens: int = 0) -> Batch:
    """The packed layout: prefix-shared segments packed by :func:`fill_rows` into rows of at most
    max(``row_tokens``, the longest segment) tokens; ``row_tokens`` = 0 makes rows as long as the batch's
    longest example. Computed: N rows × T columns, T the fullest row; the only padding is each row's tail
    up to T (none when the whole batch fits one row). Sequence ids keep the order of ``examples``.

    >>> a = Example(0, prompt_ids=[5, 6], completion_ids=[[7, 2], [8, 2]])
    >>> b = Example(1, prompt_ids=[9], completion_ids=[[3], [4, 2]])
    >>> batch = collate_packed([a, b], pad_id=0, row_tokens=16)
    >>> batch.input_ids.tolist(), batch.segment_ids.tolist()
    ([[5, 6, 7, 8, 9, 4]], [[0, 0, 0, 0, 1, 1]])
    >>> batch.position_ids.tolist()
    [[0, 1, 2, 2, 0, 1]]
    >>> batch.score_pos.tolist(), batch.score_seq.tolist()
    ([1, 2, 1, 3, 4, 4, 5], [0, 0, 1, 1, 2, 3, 3])
    """
    K = len(examples[0].completion_ids)
    segments = [shared_segment(ex, b * K) for b, ex in enumerate(examples)]
    sizes = [len(s.tokens) for s in segments]
    rows = fill_rows(sizes, max(row_tokens, max(sizes)))
    return assemble([[segments[i] for i in row] for row in rows], examples, pad_id, masked=True)


# The one place a layout name is looked up: name → (examples, pad_id, row_tokens) → Batch.
LAYOUTS = {
    "padded": lambda examples, pad_id, row_tokens: collate(examples, pad_id),
    "prefix": lambda examples, pad_id, row_tokens: collate_prefix(examples, pad_id),
    "packed": collate_packed,
}
DEFAULT_LAYOUT = "packed"
DEFAULT_ROW_TOKENS = 0


def make_batch(examples: list[Example], pad_id: int, layout: str = DEFAULT_LAYOUT,
               row_tokens: int = DEFAULT_ROW_TOKENS) -> Batch:
    """``examples`` in the named layout (``row_tokens`` is the packed layout's row budget)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return LAYOUTS[layout](examples, pad_id, row_tokens)


@dataclass(frozen=True)
class Collate:
    """The collate function of a run, built once: examples → :class:`Batch` in its layout, with its pad id
    and packed-row budget."""

    pad_id: int
    layout: str = DEFAULT_LAYOUT
    row_tokens: int = DEFAULT_ROW_TOKENS

    def __call__(self, examples: list[Example]) -> Batch:
        return make_batch(examples, self.pad_id, self.layout, self.row_tokens)
