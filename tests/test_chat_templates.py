"""Chat templates as people use them (SPEC §4 step 2): ``tools`` and ``chat_template_kwargs`` reach the
template for the prompt and for prompt + completion; a prompt that is not a prefix of the whole is an
error naming the row and the first differing token (``warn`` keeps the fallback); in multi-turn rows only the
completion's turn is scored. Every expected token list is the tokenisation of a string written out by hand."""

import pytest
from transformers import AutoTokenizer

from dpolab.data.records import parse_row
from dpolab.data.tokenization import tokenize_records
from dpolab.errors import DataError
from tests.test_tokenization import UNSTABLE

# Prints the tools' names and a line when thinking is switched off, as Qwen3-style templates do.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    "<|end|>{% endif %}{% if enable_thinking is defined and not enable_thinking %}<|system|>no think<|end|>"
    "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOL = {"type": "function", "function": {"name": "get_colour", "parameters": {"type": "object"}}}
USER = [{"role": "user", "content": "what is red?"}]


def say(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def tools_tok(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = TOOLS_TEMPLATE
    return tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tools_and_thinking_kwargs_reach_the_template_for_prompt_and_whole(tools_tok):
    row = {"prompt": USER, "chosen": say("good red"), "rejected": say("bad red"), "tools": [TOOL],
           "chat_template_kwargs": {"enable_thinking": False}}
    ex = tokenize_records([parse_row(row, "d.jsonl, line 1")], tools_tok, 512, 256)[0]
    prompt = "<s><|system|>tools: get_colour<|end|><|system|>no think<|end|><|user|>what is red?<|end|><|assistant|>"
    assert ex.prompt_ids == ids(tools_tok, prompt)
    assert ex.completion_ids == [ids(tools_tok, "good red<|end|>"), ids(tools_tok, "bad red<|end|>")]
    plain = tokenize_records([parse_row({k: row[k] for k in ("prompt", "chosen", "rejected")}, "l2")],
                             tools_tok, 512, 256)[0]
    assert plain.prompt_ids == ids(tools_tok, "<s><|user|>what is red?<|end|><|assistant|>")


def test_tools_as_json_text_as_parquet_and_csv_hold_them(tools_tok):
    row = {"prompt": USER, "chosen": say("good"), "rejected": say("bad"), "tools": '[{"type": "function", '
           '"function": {"name": "get_colour"}}]', "chat_template_kwargs": '{"enable_thinking": true}'}
    ex = tokenize_records([parse_row(row, "d.csv, row 0")], tools_tok, 512, 256)[0]
    assert ex.prompt_ids == ids(tools_tok, "<s><|system|>tools: get_colour<|end|><|user|>what is red?<|end|>"
                                           "<|assistant|>")


def test_template_columns_are_refused_where_they_cannot_apply():
    with pytest.raises(DataError, match="d.jsonl, line 3, field 'tools': only conversational rows"):
        parse_row({"prompt": "q", "chosen": "a", "rejected": "b", "tools": [TOOL]}, "d.jsonl, line 3")
    with pytest.raises(DataError, match="'add_generation_prompt' is set by dpolab itself"):
        parse_row({"prompt": USER, "chosen": say("a"), "rejected": say("b"),
                   "chat_template_kwargs": {"add_generation_prompt": False}}, "d.jsonl, line 4")
    with pytest.raises(DataError, match="field 'tools': expected a list of tool definitions"):
        parse_row({"prompt": USER, "chosen": say("a"), "rejected": say("b"), "tools": {"x": 1}}, "l")


def test_a_template_whose_prompt_is_not_a_prefix_is_an_error_naming_row_and_token(tok):
    unstable = AutoTokenizer.from_pretrained(tok.name_or_path)
    unstable.chat_template = UNSTABLE  # renders "what is red?!<|end|>" before the answer "good red"
    rows = [parse_row({"prompt": USER, "chosen": say("good red"), "rejected": say("good blue")}, "d.jsonl, line 7")]
    with pytest.raises(DataError) as e:
        tokenize_records(rows, unstable, 512, 256)
    # the renderings agree up to "<s><|user|>what is red?", then the prompt has <|end|> and the whole "!"
    n = len(ids(unstable, "<s><|user|>what is red?"))
    text = str(e.value)
    assert text.startswith("d.jsonl, line 7: the chat template does not render the prompt as a prefix")
    assert f"first differ at token {n}: the prompt has '<|end|>'" in text and "--template-mismatch warn" in text
    assert "\n" not in text
    ex = tokenize_records(rows, unstable, 512, 256, template_mismatch="warn")[0]  # today's fallback, on request
    assert ex.prompt_ids == ids(unstable, "<s><|user|>what is red?")


def test_multi_turn_rows_score_the_last_assistant_turn_only(tok):
    """Earlier turns, the assistant's included, are the prompt (context, never scored); the completion is the
    final assistant turn, whether the row names a prompt or leaves it implicit (the shared leading turns)."""
    history = [{"role": "user", "content": "what is red?"}, *say("a colour"), {"role": "user", "content": "and blue?"}]
    explicit = parse_row({"prompt": history, "chosen": say("good blue"), "rejected": say("bad blue")}, "l1")
    implicit = parse_row({"chosen": history + say("good blue"), "rejected": history + say("bad blue")}, "l2")
    prompt = "<s><|user|>what is red?<|end|><|assistant|>a colour<|end|><|user|>and blue?<|end|><|assistant|>"
    for ex in tokenize_records([explicit, implicit], tok, 512, 256):
        assert ex.prompt_ids == ids(tok, prompt)
        assert ex.completion_ids == [ids(tok, "good blue<|end|>"), ids(tok, "bad blue<|end|>")]
