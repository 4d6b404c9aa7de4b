"""The chunked log-prob function against the plain full log_softmax + gather."""

import types

import torch
from transformers import AutoModelForCausalLM

from dpolab.data.batch import collate
from dpolab.data.records import Example
from dpolab.models.logps import SequenceLogps


def full_logps(model, examples):
    """Independent: one right-padded row per whole sequence (prompt + completion, built here, not by the
    collator), the whole [N, T, V] log_softmax, then gather the completion tokens row by row."""
    seqs = [(ex.prompt_ids, c) for ex in examples for c in ex.completion_ids]
    T = max(len(p) + len(c) for p, c in seqs)
    input_ids = torch.tensor([p + c + [0] * (T - len(p) - len(c)) for p, c in seqs])
    attention_mask = torch.tensor([[1] * (len(p) + len(c)) + [0] * (T - len(p) - len(c)) for p, c in seqs])
    logps = model(input_ids=input_ids, attention_mask=attention_mask).logits.float().log_softmax(-1)  # (N, T, V)
    out = []
    for i, (p, c) in enumerate(seqs):
        out.append(logps[i, len(p) - 1: len(p) + len(c) - 1].gather(-1, torch.tensor(c)[:, None]).sum())
    return torch.stack(out)


def examples():
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(10, 300, (n,), generator=g).tolist()
    return [Example(0, rand(5), [rand(3), rand(7)]), Example(1, rand(9), [rand(4), rand(2)]),
            Example(2, rand(2), [rand(6), rand(6)])]


def test_matches_full_log_softmax(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = collate(examples(), pad_id=0)
    expected = full_logps(model, examples())
    for chunk in (1, 4, 1024):
        got = SequenceLogps(model, chunk)(**batch.model_inputs())
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gradients_match_full_log_softmax(tiny_model):
    """The checkpointed chunks give the same parameter gradients as the plain computation."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = collate(examples(), pad_id=0)
    weights = torch.linspace(-1, 1, 6)
    (full_logps(model, examples()) * weights).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (SequenceLogps(model, chunk=3)(**batch.model_inputs()) * weights).sum().backward()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, atol=1e-5, rtol=1e-4)


def test_padding_and_prompt_labels_do_not_count(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    logps = SequenceLogps(model, 4)
    base = logps(**collate(examples(), pad_id=0).model_inputs())
    # Other pad ids and extra padding on every row: nothing moves.
    padded = collate(examples(), pad_id=7)
    wider = collate(examples() + [Example(3, [11] * 20, [[12] * 20, [13]])], pad_id=3)
    torch.testing.assert_close(logps(**padded.model_inputs()), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(logps(**wider.model_inputs())[:6], base, atol=1e-5, rtol=0)
    # Padding token values inside the batch itself (not only the pad id the collator wrote): nothing moves.
    batch = collate(examples(), pad_id=0)
    pad = batch.attention_mask == 0
    assert pad.any()
    batch.input_ids[pad] = torch.randint(10, 300, (int(pad.sum()),), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logps(**batch.model_inputs()), base, atol=1e-5, rtol=0)


class Bigram(torch.nn.Module):
    """A stand-in LM whose logits at position t depend on token t alone: a completion's log-probs then depend
    on the prompt only through its LAST token, and every prompt token's own log-prob depends on the one
    before it. So a function that wrongly counted prompt tokens would move when earlier prompt tokens move."""

    def __init__(self, vocab: int = 40, hidden: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, hidden, generator=g))
            self.head.weight.copy_(torch.randn(vocab, hidden, generator=g))
        self.config = types.SimpleNamespace()

    def get_decoder(self):
        return lambda input_ids, **kwargs: types.SimpleNamespace(last_hidden_state=self.embed(input_ids))

    def get_output_embeddings(self):
        return self.head

    def by_hand(self, prompt: list[int], completion: list[int]) -> float:
        """Σ_j log softmax(head(embed(previous token)))[token_j] over the completion tokens only."""
        with torch.no_grad():
            logp = self.head(self.embed.weight).log_softmax(-1)  # (V, V): row = previous token
        previous = [prompt[-1]] + completion[:-1]
        return sum(logp[a, b].item() for a, b in zip(previous, completion))


def test_prompt_and_padding_count_only_where_they_must():
    """On the bigram model: the sums equal the hand computation over completion tokens; changing any prompt
    token but the last, or the padding, leaves them exactly where they were; changing the last prompt token
    (the context of the first completion token) or a completion token moves them by the hand-computed amount."""
    model = Bigram()
    logps = SequenceLogps(model, chunk=3)

    def run(exs, pad_id=0):
        return logps(**collate(exs, pad_id=pad_id).model_inputs()).double()

    def hand(exs):
        return torch.tensor([model.by_hand(ex.prompt_ids, c) for ex in exs for c in ex.completion_ids],
                            dtype=torch.float64)

    exs = [Example(0, [1, 2, 3, 4], [[5, 6], [7, 8, 9]]), Example(1, [10, 11], [[12], [13, 14, 15, 16]])]
    base = run(exs)
    torch.testing.assert_close(base, hand(exs), atol=1e-5, rtol=0)
    # every prompt token but the last: no change at all (each has its own, different, log-prob)
    other_prompts = [Example(0, [30, 31, 32, 4], [[5, 6], [7, 8, 9]]), Example(1, [33, 11], [[12], [13, 14, 15, 16]])]
    torch.testing.assert_close(run(other_prompts), base, atol=1e-5, rtol=0)
    assert abs(model.by_hand([0], [1, 2, 3, 4]) - model.by_hand([0], [30, 31, 32, 4])) > 0.1  # they would count
    # padding: another pad id, and rows padded much longer by a long extra example
    torch.testing.assert_close(run(exs, pad_id=39), base, atol=1e-5, rtol=0)
    longer = run(exs + [Example(2, [1] * 12, [[2] * 9, [3]])])
    torch.testing.assert_close(longer[:4], base, atol=1e-5, rtol=0)
    # the last prompt token is the first completion token's context: every completion of that row moves
    last = [Example(0, [1, 2, 3, 20], [[5, 6], [7, 8, 9]]), exs[1]]
    moved = run(last)
    torch.testing.assert_close(moved, hand(last), atol=1e-5, rtol=0)
    assert (moved[:2] - base[:2]).abs().min() > 1e-3 and torch.equal(moved[2:], base[2:])
    # a completion token moves its own sequence only
    tail = [exs[0], Example(1, [10, 11], [[12], [13, 14, 15, 25]])]
    moved = run(tail)
    torch.testing.assert_close(moved, hand(tail), atol=1e-5, rtol=0)
    assert abs(moved[3] - base[3]) > 1e-3 and torch.equal(moved[:3], base[:3])
