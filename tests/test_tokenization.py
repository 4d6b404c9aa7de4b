"""Tokenisation rules of SPEC §4 on a real fast tokenizer with a chat template."""

import pytest
from transformers import AutoTokenizer

from dpolab.data.records import Record, parse_row
from dpolab.data.tokenization import Tokenizer, tokenize_records
from dpolab.errors import DataError


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def record(row):
    return parse_row(row, "test, line 1")


def test_chat_prompt_tokens_equal_apply_chat_template(tok):
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "what is the cat?"}]
    row = {"prompt": messages, "chosen": [{"role": "assistant", "content": "the cat is good"}],
           "rejected": [{"role": "assistant", "content": "the cat is bad"}]}
    ex = Tokenizer(tok, 512, 256)(record(row), 0)
    assert ex.prompt_ids == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    # The completion is what follows the rendered prompt in the whole conversation, closed by the template.
    whole = tok.apply_chat_template(messages + row["chosen"], tokenize=True, return_dict=False)
    assert ex.prompt_ids + ex.completion_ids[0] == whole
    assert tok.decode(ex.completion_ids[0]) == "the cat is good<|end|>"


def test_plain_text_gets_bos_on_prompt_and_eos_exactly_once(tok):
    ex = Tokenizer(tok, 512, 256)(record({"prompt": "what is red?", "chosen": " red is good",
                                          "rejected": " red is bad</s>"}), 0)
    assert ex.prompt_ids == tok("what is red?")["input_ids"] and ex.prompt_ids[0] == tok.bos_token_id
    for ids in ex.completion_ids:
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert ex.completion_ids[0][:-1] == tok(" red is good", add_special_tokens=False)["input_ids"]


def test_truncation_cuts_prompt_left_and_completions_right(tok):
    prompt = " ".join(["the cat"] * 30)
    rec = record({"prompt": prompt, "chosen": " " + "good " * 40, "rejected": " bad"})
    full = Tokenizer(tok, 10_000, 10_000)(rec, 0)
    ex = Tokenizer(tok, 32, 12)(rec, 0)
    assert ex.prompt_ids == full.prompt_ids[-12:]  # left truncation keeps the end of the prompt
    assert ex.completion_ids[0] == full.completion_ids[0][:20]  # 12 + 20 = max_length
    assert ex.completion_ids[1] == full.completion_ids[1]  # short enough already


def test_rows_left_empty_are_dropped_and_counted(tok, caplog):
    recs = [record({"prompt": "the cat " * 50, "chosen": " good", "rejected": " bad"}),
            record({"prompt": "hi", "chosen": " good", "rejected": " bad"})]
    out = tokenize_records(recs, tok, max_length=40, max_prompt_length=39)
    assert len(out) == 2  # prompt cut to 39 leaves room 1: one completion token each
    out = tokenize_records(recs, tok, max_length=5, max_prompt_length=5)
    assert len(out) == 1 and "dropped 1 row" in caplog.text


def test_implicit_prompt_is_longest_common_prefix():
    rec = record({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"})
    assert rec.prompt == "Q: sky? A: " and rec.completions == ["blue", "green"]
    msgs = lambda a: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]
    rec = record({"chosen": msgs("good"), "rejected": msgs("bad")})
    assert rec.prompt == msgs("x")[:1] and rec.completions == [msgs("good")[1:], msgs("bad")[1:]]


def test_conversational_rows_need_a_chat_template(tok):
    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match="chat template"):
        Tokenizer(bare, 64, 32)(record(row), 0)


# An unstable template: the user turn is rendered differently when an assistant answer follows, and where it
# differs depends on the answer (a leading "!" before an answer starting with "b", a trailing "!" otherwise).
UNSTABLE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'user' and not loop.last and messages[loop.index0 + 1]['content'].startswith('b') %}!"
    "{% endif %}{{ m['content'] }}"
    "{% if m['role'] == 'user' and not loop.last and not messages[loop.index0 + 1]['content'].startswith('b') %}!"
    "{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_unstable_template_splits_every_completion_at_one_common_prefix(tok, caplog):
    """SPEC §4 step 2. With chosen "good ..." the rendered prompt and the whole part after "what is red?";
    with rejected "bad ..." right after "<s><|user|>". The shared prompt must be the prefix common to all
    three token lists, [<s>, <|user|>], and each completion the rest of its own conversation, so that
    prompt + completion is exactly the rendered conversation (splitting per completion would let the chosen
    keep prompt tokens the rejected dropped)."""
    unstable = AutoTokenizer.from_pretrained(tok.name_or_path)
    unstable.chat_template = UNSTABLE
    user = [{"role": "user", "content": "what is red?"}]
    answers = [[{"role": "assistant", "content": "good red"}], [{"role": "assistant", "content": "bad red"}]]
    rows = [record({"prompt": user, "chosen": answers[0], "rejected": answers[1]}),
            parse_row({"prompt": user, "chosen": answers[0], "rejected": answers[1]}, "test, line 2")]
    with caplog.at_level("WARNING", logger="dpolab"):
        examples = tokenize_records(rows, unstable, 512, 256, template_mismatch="warn")
    warnings = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("test, line 1")  # once, naming the first row
    ex = examples[0]
    assert ex.prompt_ids == [unstable.bos_token_id, unstable.convert_tokens_to_ids("<|user|>")]
    for answer, ids in zip(answers, ex.completion_ids):
        whole = unstable(unstable.apply_chat_template(user + answer, tokenize=False), add_special_tokens=False)
        assert ex.prompt_ids + ids == whole["input_ids"]
    # the stable template keeps the rendered prompt whole (the fallback is not taken)
    stable = tokenize_records(rows[:1], tok, 512, 256)[0]
    assert stable.prompt_ids == tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)
