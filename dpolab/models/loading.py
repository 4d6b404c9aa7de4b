"""Loading models and tokenizers: Hugging Face folders or hub names, weights from safetensors only unless the
user allows pickle files, no model code unless the user trusts it, PEFT adapter folders merged into
their base, and GGUF files (``path/to/model.gguf``, llama.cpp's format) dequantised to fp32 and rebuilt as a
plain model, so that everything after loading (training, ``save_pretrained`` of ``final/``) sees an
ordinary Hugging Face model. Every failure is one paragraph naming the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpolab.errors import DpolabError


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_adapter_dir(name: str | None) -> bool:
    return name is not None and (Path(name) / "adapter_config.json").is_file()


def base_of(adapter_dir: str) -> str:
    """The base model an adapter folder was trained on."""
    base = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise DpolabError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    return base


def is_gguf(name: str | None) -> bool:
    return name is not None and name.lower().endswith(".gguf")


def gguf_source(name: str) -> dict:
    """``from_pretrained`` arguments for a GGUF file: its folder and, as ``gguf_file``, its name."""
    path = Path(name)
    if not path.is_file():
        raise DpolabError(f"cannot load {name}: no such GGUF file")
    return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}


def _source(name: str) -> dict:
    return gguf_source(name) if is_gguf(name) else {"pretrained_model_name_or_path": name}


def gguf_failure(name: str, e: Exception) -> DpolabError:
    """One paragraph for a GGUF file transformers cannot read: truncated, or an architecture or a
    quantisation it does not dequantise."""
    return DpolabError(f"cannot load the GGUF file {name}: {first_line(e)} — dpolab reads GGUF through "
                       "transformers and the gguf package, which dequantise the common llama.cpp types "
                       "(F32, F16, BF16, Q4_0 to Q8_0, the K-quants) for the architectures transformers lists "
                       "(Llama, Mistral, Qwen2, ...); a truncated or partly downloaded file fails here too: "
                       "download it again, or convert the model to a Hugging Face folder")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer  # deferred: transformers is a heavy import

    try:
        tok = AutoTokenizer.from_pretrained(**_source(name), trust_remote_code=trust_remote_code)
    except Exception as e:  # a GGUF reader fails in many ways (struct, numpy, KeyError): all one paragraph
        if is_gguf(name):
            raise gguf_failure(name, e) from None
        if not isinstance(e, (OSError, ValueError)):
            raise
        raise DpolabError(f"cannot load the tokenizer of {name}: {first_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out; any id serves
    return tok


def load_model(name: str, trust_remote_code: bool = False, allow_pickle: bool = False,
               load_in_4bit: bool = False, attn_implementation: str | None = None) -> torch.nn.Module:
    """A causal LM in fp32 (bf16 runs under autocast), from safetensors weights unless ``allow_pickle``.
    A PEFT adapter folder gives its base with the adapter merged in. ``load_in_4bit``: the weights are
    quantised to NF4 by bitsandbytes on this process's GPU (QLoRA; the builder refuses it elsewhere).
    ``attn_implementation``: the attention kernel (transformers' name); None keeps the model's default."""
    if is_adapter_dir(name):
        model = load_merged(name, trust_remote_code, allow_pickle)
    elif is_gguf(name):
        model = load_gguf(name)
    else:
        model = _load_pretrained(name, trust_remote_code, allow_pickle, load_in_4bit)
    if attn_implementation:
        try:
            model.set_attn_implementation(attn_implementation)
        except (ImportError, ValueError) as e:
            raise DpolabError(f"cannot run {name} with attn_implementation={attn_implementation}: "
                              f"{first_line(e)}") from None
    return model


def _load_pretrained(name: str, trust_remote_code: bool, allow_pickle: bool, load_in_4bit: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # deferred: heavy imports
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    quantized = {}
    if load_in_4bit:
        quantized = dict(device_map={"": torch.cuda.current_device()}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32,
                                                     use_safetensors=None if allow_pickle else True,
                                                     trust_remote_code=trust_remote_code, **quantized)
    except (OSError, ValueError) as e:
        msg = first_line(e)
        if "custom code" in msg or "trust_remote_code" in msg:
            msg += (" — dpolab runs no code from a model folder or the hub unless you pass --trust-remote-code "
                    "(do so only for a source you trust)")
        if "safetensors" in msg or ".bin" in msg:
            msg += (" — dpolab loads weights from safetensors only, because pickle files can run code; "
                    "convert the checkpoint with save_pretrained(safe_serialization=True), or pass "
                    "--allow-pickle-weights if you trust its source")
        raise DpolabError(f"cannot load the model {name}: {msg}") from None
    model.config.use_cache = False
    return model


def load_gguf(name: str) -> torch.nn.Module:
    """A GGUF file dequantised to fp32, rebuilt as a plain model of its architecture: transformers marks a
    GGUF-loaded model as quantised and refuses to ``save_pretrained`` it, so the class is built again from the
    config without ``quantization_config`` and the dequantised weights are loaded into it."""
    from transformers import AutoModelForCausalLM  # deferred: a heavy import
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(**gguf_source(name), dtype=torch.float32)
    except DpolabError:
        raise
    except Exception as e:  # the GGUF reader fails in many ways (struct, numpy, KeyError): all one paragraph
        raise gguf_failure(name, e) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.config.use_cache = False
    return model


def load_merged(adapter_dir: str, trust_remote_code: bool = False, allow_pickle: bool = False) -> torch.nn.Module:
    """Base + adapter, merged into plain weights (the base from safetensors unless ``allow_pickle``)."""
    from peft import PeftModel  # deferred: a heavy import

    base = load_model(base_of(adapter_dir), trust_remote_code, allow_pickle)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
