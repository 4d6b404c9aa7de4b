"""The chunked log-prob function against the plain full log_softmax + gather."""

import torch
from transformers import AutoModelForCausalLM

from dpolab.batch import collate
from dpolab.logps import SequenceLogps
from dpolab.tokenization import Example


def full_logps(model, input_ids, attention_mask, prompt_lens):
    """Independent: the whole [N, T, V] log_softmax, then gather the completion tokens row by row."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (N, T, V)
    logps = logits.log_softmax(-1)
    out = []
    for i, p in enumerate(prompt_lens):
        n = int(attention_mask[i].sum())
        targets = input_ids[i, p:n]
        out.append(logps[i, p - 1: n - 1].gather(-1, targets[:, None]).sum())
    return torch.stack(out)


def examples():
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(10, 300, (n,), generator=g).tolist()
    return [Example(0, rand(5), [rand(3), rand(7)]), Example(1, rand(9), [rand(4), rand(2)]),
            Example(2, rand(2), [rand(6), rand(6)])]


def test_matches_full_log_softmax(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = collate(examples(), pad_id=0)
    prompt_lens = [len(ex.prompt_ids) for ex in examples() for _ in range(2)]
    expected = full_logps(model, batch.input_ids, batch.attention_mask, prompt_lens)
    for chunk in (1, 4, 1024):
        got = SequenceLogps(model, chunk)(**batch.model_inputs())
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gradients_match_full_log_softmax(tiny_model):
    """The checkpointed chunks give the same parameter gradients as the plain computation."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = collate(examples(), pad_id=0)
    prompt_lens = [len(ex.prompt_ids) for ex in examples() for _ in range(2)]
    weights = torch.linspace(-1, 1, 6)
    (full_logps(model, batch.input_ids, batch.attention_mask, prompt_lens) * weights).sum().backward()
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
    # The sum covers exactly the completion tokens: adding the prompt tokens' own log-probs changes it.
    batch = collate(examples(), pad_id=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.log_softmax(-1)
    first_prompt_token_logp = logits[0, 0, batch.input_ids[0, 1]]  # the prompt's 2nd token, not scored
    assert abs(first_prompt_token_logp.item()) > 1e-3
    assert batch.lengths.tolist() == [3, 7, 4, 2, 6, 6]
