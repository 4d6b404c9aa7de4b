"""LoRA through PEFT: the policy as base weights plus small trainable adapters, and a reference that
costs no second copy of the model.

Three ways to start (:func:`load_policy`):

- ``lora_r = 0`` and ``--model`` a plain model: full fine-tuning, nothing here applies;
- ``lora_r > 0``: a new LoRA adapter (B = 0, so the policy equals the base at step 0). The reference is
  the same model with its adapters switched off (``disable_adapter()``): exactly the base;
- ``--model`` a PEFT adapter folder (``adapter_config.json``): its base is loaded, the adapter is trained
  further, and the reference is the adapter's *starting* weights. Switching the adapter off would give the
  base, not the starting point, so a frozen copy of the starting adapter is loaded as a second adapter,
  ``"reference"``, and the reference switches to it. An adapter is small (rank r per layer), so the copy
  costs r·(d_in + d_out) numbers per adapted layer, not a model.

``final/`` then holds the adapter; :func:`merge` (``dpolab merge``) folds it into the base weights and
writes a plain Hugging Face model.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from dpolab.data.batch import Batch
from dpolab.errors import ConfigError, DpolabError
from dpolab.models.loading import base_of, is_adapter_dir, load_merged, load_model, load_tokenizer
from dpolab.models.logps import SequenceLogps

log = logging.getLogger("dpolab")
Tensor = torch.Tensor
TRAINED, STARTING = "default", "reference"  # adapter names: the one trained, its frozen starting copy


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def load_policy(name: str, lora_r: int, lora_alpha: float, lora_dropout: float, target_modules: str,
                trust_remote_code: bool = False, allow_pickle: bool = False, load_in_4bit: bool = False,
                attn_implementation: str | None = None) -> torch.nn.Module:
    """The model to train: plain, base + a new LoRA adapter, or base + an existing adapter (see above).
    ``load_in_4bit`` (QLoRA): the base is loaded quantised and prepared for k-bit training first."""
    if is_adapter_dir(name):
        if lora_r:
            raise ConfigError(f"--model {name} is already a LoRA adapter; leave --lora-r unset to train it "
                              "further (its own rank and targets are kept)")
        from peft import PeftModel  # deferred: a heavy import

        base = prepare_base(load_model(base_of(name), trust_remote_code, allow_pickle, load_in_4bit,
                                       attn_implementation), load_in_4bit)
        model = PeftModel.from_pretrained(base, name, adapter_name=TRAINED, is_trainable=True)
        model.load_adapter(name, adapter_name=STARTING, is_trainable=False)
        model.set_adapter(TRAINED)  # trainable again after loading the frozen copy
        return model
    model = prepare_base(load_model(name, trust_remote_code, allow_pickle, load_in_4bit, attn_implementation),
                         load_in_4bit)
    if not lora_r:
        return model
    from peft import LoraConfig, get_peft_model  # deferred: a heavy import

    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config, adapter_name=TRAINED)
    except ValueError as e:  # e.g. target modules not found in the model
        raise ConfigError(f"cannot add LoRA adapters to {name}: {str(e).splitlines()[0]}") from None
    log.info("LoRA r=%d: training %d of %d parameters", lora_r, *trainable_count(model))
    return model


def qlora_unavailable() -> str | None:
    """Why a 4-bit base cannot be loaded here (bitsandbytes' 4-bit kernels need CUDA), or None."""
    missing = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                     ("the bitsandbytes package (pip install bitsandbytes)",
                                      importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
    if not missing:
        return None
    return (f"QLoRA (4-bit base weights) needs {' and '.join(missing)}, which this machine lacks; train LoRA on "
            "the full-precision base instead (drop --load-in-4bit), or run where both are available")


def prepare_base(model, load_in_4bit: bool):
    """A 4-bit base as PEFT wants it for training: norms and head in fp32, inputs that carry gradients.
    Gradient checkpointing stays dpolab's own switch (--gradient-checkpointing)."""
    if not load_in_4bit:
        return model
    from peft import prepare_model_for_kbit_training  # deferred: a heavy import

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def trainable_count(model) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class AdapterReference:
    """The policy model itself as the reference: adapters off (a new LoRA) or the frozen starting adapter
    (training an existing one); eval mode and ``no_grad``, then the policy's state is restored."""

    def __init__(self, model, chunk: int = 256, autocast=nullcontext, ld_alpha: float | None = None):
        self.model = model
        self.logps = SequenceLogps(model, chunk, ld_alpha)  # LD-DPO weights the reference's tokens as the policy's
        self.autocast = autocast

    @contextmanager
    def switched(self):
        if STARTING not in self.model.peft_config:
            with self.model.disable_adapter():
                yield
            return
        self.model.set_adapter(STARTING, inference_mode=True)  # freezes every adapter ...
        try:
            yield
        finally:
            self.model.set_adapter(TRAINED)  # ... and this makes the trained one trainable again

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Tensor:
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference
        try:
            with self.switched(), self.autocast():
                return self.logps(**batch.model_inputs()).float()
        finally:
            self.model.train(was_training)


def save_adapter(model, path: Path, state_dict: dict[str, Tensor] | None = None) -> None:
    """Only the trained adapter (not the frozen starting copy), as a PEFT adapter folder."""
    model.save_pretrained(path, selected_adapters=[TRAINED], safe_serialization=True, state_dict=state_dict)


def merge(adapter: str, output: str, trust_remote_code: bool = False, allow_pickle_weights: bool = False) -> Path:
    """Write the adapter merged into its base as a Hugging Face model folder (with tokenizer and, from a
    dpolab run, ``dpolab.json``), loadable by ``AutoModelForCausalLM.from_pretrained``."""
    if not is_adapter_dir(adapter):
        raise DpolabError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    out = Path(output)
    model = load_merged(adapter, trust_remote_code, allow_pickle_weights)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer_from = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base_of(adapter)
    load_tokenizer(tokenizer_from, trust_remote_code).save_pretrained(out)
    if (Path(adapter) / "dpolab.json").is_file():
        shutil.copy(Path(adapter) / "dpolab.json", out / "dpolab.json")
    log.info("merged %s into %s", adapter, out)
    return out
