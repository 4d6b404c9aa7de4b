"""The real-model tier: SmolLM2-135M-Instruct (134.5M parameters, a real BPE of 49,152 tokens, the ChatML
template, ``<|im_end|>`` as EOS), loaded from the cache ``make real-model`` builds (tests/conftest.py
``real_model_dir``). Each check is against something independent of dpolab: each sequence run alone through
plain transformers, the tokenizer's own ``apply_chat_template(tokenize=True)``, ln 2, a plain forward pass.
Sequences are short and rows few, and the model is loaded once for the module, to keep the tier in minutes.
"""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpolab
from dpolab.data.batch import make_batch
from dpolab.data.reading import load_records
from dpolab.data.records import parse_row
from dpolab.data.tokenization import Tokenizer, tokenize_records
from dpolab.evaluation.generate import sample
from dpolab.evaluation.metrics import read_metrics
from dpolab.evaluation.pairs import make_pairs
from dpolab.models.loading import load_model, load_tokenizer
from dpolab.models.logps import SequenceLogps

from .conftest import write_jsonl
from .test_layouts import LAYOUT_SETTINGS, alone

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "Answer with one word."}


def chat(*turns):
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


ROWS = [  # conversational with a system prompt and several turns, implicit prompt, plain text
    {"prompt": [SYSTEM, *chat("Capital of Peru?", "Lima.", "And of Chile?")],
     "chosen": [{"role": "assistant", "content": "Santiago."}],
     "rejected": [{"role": "assistant", "content": "The capital of Chile is Santiago."}]},
    {"prompt": chat("What is 2+2?"), "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "Five."}]},
    {"chosen": "The sky is blue today.", "rejected": "The sky is grey and wet."},
    {"prompt": "Paris is the capital of", "chosen": " France.", "rejected": " Spain, I think."},
]


@pytest.fixture(scope="module")
def folder(real_model_dir):
    return str(real_model_dir / "model")


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder).eval()


def records():
    return [parse_row(row, f"rows, line {i + 1}") for i, row in enumerate(ROWS)]


def test_the_model_is_the_one_the_issue_describes(model, tok):
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tok) == 49_152 and model.config.tie_word_embeddings
    assert tok.eos_token == "<|im_end|>" and model.config.eos_token_id == tok.eos_token_id


def test_every_layout_gives_each_sequence_its_log_prob_alone(model, tok):
    examples = tokenize_records(records(), tok, 96, 64)
    assert len(examples) == len(ROWS)
    with torch.no_grad():
        expected = alone(model, examples)
        for layout, row_tokens in LAYOUT_SETTINGS[:4]:  # (the fifth, one long row, is packed's default here)
            b = make_batch(examples, tok.pad_token_id, layout, row_tokens)
            got = SequenceLogps(model, chunk=64)(**b.model_inputs())
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-5, msg=f"{layout} row_tokens={row_tokens}")


def test_chat_prompts_are_the_tokens_of_inference_and_completions_what_follows(tok):
    """The prompt is the tokenizer's own rendering with the generation prompt: for a prompt with no system
    message the template adds its default one, which the prompt alone must carry too."""
    ex = Tokenizer(tok, 512, 256)(records()[1], 0)
    messages = ROWS[1]["prompt"]
    assert ex.prompt_ids == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ex.prompt_ids)
    whole = tok.apply_chat_template(messages + ROWS[1]["chosen"], tokenize=True, return_dict=False)
    assert ex.prompt_ids + ex.completion_ids[0] == whole
    assert tok.decode(ex.completion_ids[0]) == "4<|im_end|>\n"


def test_a_boundary_that_merges_keeps_the_prompt_as_seen_at_inference(tok):
    """"Paris is the capi" + "tal" is tokenised whole as ... " capital"; the prompt keeps its own tokens (what
    the model sees when asked to continue it) and the completion is its text alone, EOS once."""
    row = parse_row({"prompt": "Paris is the capi", "chosen": "tal of France", "rejected": "tal of Spain"}, "r")
    ex = Tokenizer(tok, 512, 256)(row, 0)
    whole = tok("Paris is the capital of France")["input_ids"]
    assert ex.prompt_ids + ex.completion_ids[0][:-1] != whole  # the merge crosses the boundary
    assert ex.prompt_ids == tok("Paris is the capi")["input_ids"]
    assert ex.completion_ids[0] == tok("tal of France", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.completion_ids[0].count(tok.eos_token_id) == 1


def test_generation_stops_at_im_end(model, tok):
    prompts = [[SYSTEM, *chat("Say hi.")]]
    drawn = sample(model, tok, prompts, num_samples=4, temperature=1.0, seed=0, max_new_tokens=24)
    ended = [ids for ids in drawn.token_ids[0] if ids[-1] == tok.eos_token_id]
    assert ended, drawn.completions
    for ids, text in zip(drawn.token_ids[0], drawn.completions[0]):
        assert tok.eos_token_id not in ids[:-1] and "<|im_end|>" not in text
        assert text == tok.decode(ids[:-1] if ids[-1] == tok.eos_token_id else ids, skip_special_tokens=True)


def shortest(prompt, answer: str) -> float:
    """A reward for make-pairs here: shorter answers are better."""
    return -float(len(answer))


def test_make_pairs_with_the_chat_template(folder, tok, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [SYSTEM, *chat(f"Capital of {c}?")]}
                                                        for c in ("Peru", "Japan")])
    n = make_pairs(folder, str(prompts), "tests.test_real_model:shortest", str(tmp_path / "pairs.jsonl"),
                   num_samples=3, max_new_tokens=10, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert n == len(rows) >= 1
    for row in rows:  # chat prompts get their answers as assistant messages, which training reads
        chosen, rejected = (row[k][0]["content"] for k in ("chosen", "rejected"))
        assert row["score_chosen"] == -len(chosen) > row["score_rejected"] == -len(rejected)
        assert "<|im_end|>" not in chosen + rejected
    assert [r.conversational for r in load_records(str(tmp_path / "pairs.jsonl"))] == [True] * n


def plain_logp(model, tok, messages, answer) -> float:
    """Independent: the answer's log-prob after the rendered prompt, by one plain forward pass."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    whole = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True,
                                    return_dict=False)
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([whole])).logits.log_softmax(-1)[0]  # (T, V)
    n = len(prompt)
    return float(sum(logps[t - 1, whole[t]] for t in range(n, len(whole))))


def test_score_against_the_gguf_reference(folder, real_model_dir, model, tok):
    """The folder and the GGUF file it was converted from are the same weights: reward 0, and the log-prob is
    the plain forward pass's."""
    messages = [SYSTEM, *chat("Capital of France?")]
    out = dpolab.score(folder, messages, [{"role": "assistant", "content": "Paris."}],
                       ref_model=str(real_model_dir / "model.gguf"))
    assert out["logp"] == pytest.approx(plain_logp(model, tok, messages, "Paris."), abs=1e-3)
    assert out["reward"] == pytest.approx(0.0, abs=1e-6)


def test_eval_reports_the_plain_log_probs(folder, model, tok, tmp_path):
    rows = [r for r in ROWS if isinstance(r.get("prompt"), list)]
    metrics = dpolab.evaluate(folder, str(write_jsonl(tmp_path / "eval.jsonl", rows)), ref_model=folder,
                              progress=False)
    expected = sum(plain_logp(model, tok, r["prompt"], r["chosen"][0]["content"]) for r in rows) / len(rows)
    assert metrics["eval/logps/chosen"] == pytest.approx(expected, abs=1e-3)
    assert metrics["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["full from the GGUF file", "lora"])
def test_a_few_steps_start_at_ln2_and_change_the_weights(kind, real_model_dir, folder, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS[:2])  # the chat rows (a file holds one style)
    lora = kind == "lora"
    model = folder if lora else str(real_model_dir / "model.gguf")
    out = tmp_path / "run"
    dpolab.train(model=model, data=str(data), output_dir=str(out), batch_size=2, max_steps=2, eval_split=0.0,
                 learning_rate=1e-3 if lora else 1e-5, lora_r=8 if lora else 0, save_every=0, progress=False,
                 warmup_ratio=0.0, lr_scheduler="constant", max_length=96, max_prompt_length=64)
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    if lora:
        from safetensors.torch import load_file

        adapter = load_file(out / "final" / "adapter_model.safetensors")
        assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 0  # B starts at 0
        return
    trained = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)  # a plain folder
    assert getattr(trained.config, "quantization_config", None) is None
    start = load_model(folder)
    delta = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), start.parameters()))
    assert delta > 0
