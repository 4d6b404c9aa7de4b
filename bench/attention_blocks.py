"""Does skipping the masked blocks of a prefix-shared row pay without a block-sparse kernel?

Given a mask, SDPA's CPU flash kernel computes every (query, key) pair; in a ``[prompt | chosen | rejected]``
row about half are above the diagonal. This times one attention call of SmolLM2-135M's shape (8 rows, 9
heads of 64), forward and backward, whole against split into blocks of queries that each meet only the keys
up to their block's end (the upper triangle beyond the diagonal blocks never computed), and checks that
both give the same output and query gradient.

    python bench/attention_blocks.py            # rows of 349 and 600 tokens (the two real-model shapes)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def prefix_mask(N: int, T: int) -> torch.Tensor:
    """(N, 1, T, T) additive mask of rows [prompt (72 %) | chosen | rejected], rejected not seeing chosen."""
    P = int(T * 0.72)
    A = (T - P) // 2
    col = torch.arange(T)
    seg = torch.where(col < P, 0, torch.where(col < P + A, 1, 2))
    seen = (col[None, :] <= col[:, None]) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
    return torch.zeros(T, T).masked_fill(~seen, float("-inf")).expand(N, 1, T, T).contiguous()


def attention(q, k, v, mask, block: int | None):
    if block is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    T = q.shape[2]
    return torch.cat([F.scaled_dot_product_attention(q[:, :, a:a + block], k[:, :, :a + block], v[:, :, :a + block],
                                                     attn_mask=mask[:, :, a:a + block, :a + block])
                      for a in range(0, T, block)], dim=2)


def timed(q, k, v, mask, grad, block, repeats: int = 5) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Median forward and forward+backward seconds; the output and q's gradient."""
    times = []
    for _ in range(repeats + 1):
        q.grad = None
        t0 = time.perf_counter()
        out = attention(q, k, v, mask, block)
        t1 = time.perf_counter()
        out.backward(grad)
        times.append((t1 - t0, time.perf_counter() - t0))
    times = sorted(times[1:], key=lambda t: t[1])  # the first call warms up
    return *times[len(times) // 2], out.detach(), q.grad.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, action="append", help="row length (default: 349 and 600)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N, H, D = 8, 9, 64
    for T in args.tokens or [349, 600]:
        mask = prefix_mask(N, T)
        q, k, v = (torch.randn(N, H, T, D, requires_grad=True) for _ in range(3))
        grad = torch.randn(N, H, T, D)
        fwd, whole, out, dq = timed(q, k, v, mask, grad, None)
        print(f"{T} tokens, the whole row at once: {whole * 1e3:6.1f} ms forward+backward (forward {fwd * 1e3:.1f} ms)")
        for block in (32, 64, 128):
            fwd, both, o, g = timed(q, k, v, mask, grad, block)
            err = max((o - out).abs().max().item(), (g - dq).abs().max().item())
            print(f"  query blocks of {block:3}: {both * 1e3:6.1f} ms ({both / whole:.2f}×; forward {fwd * 1e3:.1f} ms)"
                  f"  max |difference| {err:.1e}")


if __name__ == "__main__":
    main()
