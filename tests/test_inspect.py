"""`dpolab inspect`: planted duplicates, contradictions and identical pairs counted exactly; truncation and length
counts worked out by hand on the bundled character-level tokenizer; the reference's per-token log-probs
against a plain forward pass; the advice against the method-selection table."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from dpolab.evaluation.advice import advise, learning_rates
from dpolab.evaluation.inspect import inspect_data
from tests import hand
from tests.conftest import write_jsonl


def sums(n: int, start: int = 10) -> list[dict]:
    """n distinct addition pairs: the right sum chosen, the sum + 1 rejected (same length unless a carry)."""
    return [{"prompt": f"{a}+{a + 1}=", "chosen": str(2 * a + 1), "rejected": str(2 * a + 3)}
            for a in range(start, start + n)]


def test_planted_duplicates_contradictions_and_identical_pairs_are_counted_exactly(tmp_path):
    rows = sums(20)
    planted = ([rows[0], rows[1], rows[1]]  # 3 duplicates (rows[1] twice more)
               + [{**rows[2], "chosen": rows[2]["rejected"], "rejected": rows[2]["chosen"]},  # 2 contradictions
                  {**rows[3], "chosen": rows[3]["rejected"], "rejected": rows[3]["chosen"]}]
               + [{**rows[i], "rejected": rows[i]["chosen"]} for i in (4, 5, 6, 7)])  # 4 identical pairs
    data = write_jsonl(tmp_path / "d.jsonl", rows + planted)
    report = inspect_data(str(data), output=str(tmp_path / "out"), progress=False)
    assert (report["rows"], report["formats"]) == (29, {"standard": 29})
    assert (report["duplicates"], report["contradictions"], report["identical"]) == (3, 2, 4)
    saved = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert (saved["duplicates"], saved["contradictions"], saved["identical"]) == (3, 2, 4)
    assert (tmp_path / "out" / "lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_truncation_and_length_bias_by_hand(tmp_path):
    """Character-level tokens: prompt "12+13=" is BOS + 6 = 7 tokens; "25" + EOS is 3. With max_prompt_length 6
    every prompt is cut; with max_length 9 the room left is 9 − 6 = 3, so "25" fits and "1000" (5 tokens) is cut,
    losing its EOS."""
    rows = [{"prompt": "12+13=", "chosen": "25", "rejected": "1000"},  # chosen shorter, rejected cut
            {"prompt": "12+14=", "chosen": "26", "rejected": "27"},  # equal lengths
            {"prompt": "12+15=", "chosen": "27777", "rejected": "2"},  # chosen longer (and cut)
            {"prompt": "12+16=", "chosen": "288", "rejected": "2"}]  # chosen longer, fits (4 tokens > 3: cut)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = inspect_data(str(data), max_length=9, max_prompt_length=6, output=str(tmp_path / "o"), progress=False)
    assert r["prompts_too_long"] == 4
    assert (r["truncated"], r["eos_lost"], r["dropped"]) == (3, 3, 0)
    assert (r["chosen_longer_fraction"], r["chosen_shorter_fraction"]) == (0.5, 0.25)
    assert r["mean_token_gap"] == pytest.approx(((3 - 5) + 0 + (6 - 2) + (4 - 2)) / 4)
    assert r["lengths"] == {"chosen": [3, 3, 6, 4], "rejected": [5, 3, 2, 2]}
    assert r["boundary_merges"] == 0 and r["unstable_template"] == 0  # characters never merge


def test_bpe_merges_across_the_boundary_are_counted(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    whole, split = "good great", ("good gr", "eat")
    assert tok(whole)["input_ids"] != tok(split[0])["input_ids"] + tok(split[1], add_special_tokens=False)["input_ids"]
    rows = [{"prompt": split[0], "chosen": split[1], "rejected": "een"},  # "good gr|eat": a merge
            {"prompt": "good", "chosen": " great", "rejected": " bad"}]  # a clean boundary at the space
    assert tok("good great")["input_ids"] == tok("good")["input_ids"] + tok(" great", add_special_tokens=False)[
        "input_ids"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = inspect_data(str(data), model=str(tiny_model), output=str(tmp_path / "o"), progress=False)
    assert r["boundary_merges"] == 1


def test_reference_log_probs_per_token_match_a_plain_forward_pass(tiny_model, tmp_path):
    rows = [{"prompt": "what is the best colour", "chosen": " blue", "rejected": " the worst red dog"},
            {"prompt": "pick one animal", "chosen": " a cat", "rejected": " moon"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = inspect_data(str(data), model=str(tiny_model), output=str(tmp_path / "o"), progress=False,
                     alarm_ref_token_logp=-1.0)
    per_token = [[hand.token_logps(tiny_model, row["prompt"], row[side]).mean().item() for row in rows]
                 for side in ("chosen", "rejected")]
    ref = r["reference"]
    assert ref["chosen_token_logp"] == pytest.approx(sum(per_token[0]) / 2, abs=1e-5)
    assert ref["rejected_token_logp"] == pytest.approx(sum(per_token[1]) / 2, abs=1e-5)
    assert ref["low_probability_chosen"] == sum(v < -1.0 for v in per_token[0])  # a random tiny model: ≈ −6
    assert ref["num_parameters"] == sum(p.numel() for p in hand.load(str(tiny_model)).parameters())


def test_advice_follows_the_method_selection_table():
    assert advise("paired", 5000)["loss"] == "sigmoid"  # a large amount of pairs → DPO
    assert advise("unpaired", 5000)["loss"] == "kto"  # only thumbs up/down → KTO
    assert advise("paired", 300)["loss"] == "ipo"  # a few hundred pairs → IPO
    tight = advise("paired", 5000, num_parameters=7_000_000_000, memory_available=64 * 2**30)
    assert tight["loss"] == "simpo" and tight["beta"] == 2.0  # 7B × 20 bytes = 130 GiB > 0.8 × 64 GiB → SimPO
    roomy = advise("paired", 5000, num_parameters=7_000_000_000, memory_available=1024 * 2**30)
    assert roomy["loss"] == "sigmoid" and roomy["learning_rate"] == [5e-7, 1e-6]  # the DPO recipes' 5e-7 for 7B
    biased = advise("paired", 5000, chosen_longer_fraction=0.7, chosen_shorter_fraction=0.2)
    assert biased["loss"] == "rdpo"  # 0.7 − 0.2 = 0.5 > 0.2: a length bias
    few_biased = advise("paired", 300, chosen_longer_fraction=0.7, chosen_shorter_fraction=0.2)
    assert few_biased["loss"] == "ipo" and any("rdpo" in a for a in few_biased["also"])
    assert advise("paired", 5000, chosen_longer_fraction=0.3, chosen_shorter_fraction=0.2)["loss"] == "sigmoid"
    off = advise("paired", 5000, ref_token_logp=-3.0)
    assert any("dpolab iterate" in a for a in off["also"])  # off-policy pairs → on-policy ones
    assert not any("iterate" in a for a in advise("paired", 5000, ref_token_logp=-0.5)["also"])
    assert "fix the data first" in advise("paired", 5000, problems=3)["also"][0]
    assert learning_rates(864_384) == (5e-5, 2e-4)  # docs/default-task.md: 1e-4 to 2e-4 on the bundled model


def test_inspect_advises_kto_for_thumbs_and_ipo_for_few_pairs_from_the_files(tmp_path):
    thumbs = [{"prompt": f"{a}+1=", "completion": str(a + 1), "label": a % 2 == 0} for a in range(10, 40)]
    got = inspect_data(str(write_jsonl(tmp_path / "u.jsonl", thumbs)), output=str(tmp_path / "o"), progress=False)
    assert got["advice"]["loss"] == "kto" and got["formats"] == {"unpaired": 30}
    few = inspect_data(str(write_jsonl(tmp_path / "p.jsonl", sums(40))), output=str(tmp_path / "o"), progress=False)
    assert few["advice"]["loss"] == "ipo"


def test_the_command_prints_one_json_object(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sums(12) + sums(2))  # 2 duplicates
    out = subprocess.run([sys.executable, "-m", "dpolab.cli", "inspect", "--data", str(data), "--output",
                          str(tmp_path / "o"), "--json"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["duplicates"] == 2 and report["advice"]["loss"] == "ipo" and "lengths" not in report


def test_an_unstable_chat_template_is_counted(tiny_model, tmp_path):
    """A template that renders the generation prompt only when asked: the prompt alone ends in <|assistant|>,
    the whole conversation does not contain it, so the prompt is no prefix of the whole."""
    import shutil

    user, yes, no = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                     {"role": "assistant", "content": "no"})
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [user], "chosen": [yes], "rejected": [no]}] * 2)
    stable = inspect_data(str(data), model=str(tiny_model), output=str(tmp_path / "o"), progress=False)
    assert (stable["unstable_template"], stable["formats"], stable["duplicates"]) == (0, {"conversational": 2}, 1)
    model = tmp_path / "unstable"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((model / "tokenizer_config.json").read_text()).items() if k != "chat_template"}))
    unstable = inspect_data(str(data), model=str(model), output=str(tmp_path / "o"), progress=False)
    assert unstable["unstable_template"] == 2
