"""The models wing: loading models and tokenizers, LoRA adapters, the one log-prob function, the reference
strategies, and what a trained ``final/`` folder records.

- :mod:`~dpolab.models.loading`: models (safetensors only unless asked), tokenizers, adapter folders;
- :mod:`~dpolab.models.adapters`: LoRA through PEFT, the adapter reference, merging;
- :mod:`~dpolab.models.logps`: per-sequence log-probs, the LM head only where scored;
- :mod:`~dpolab.models.reference`: the reference strategies (SPEC §5) and the choice among them;
- :mod:`~dpolab.models.record`: ``final/dpolab.json``, the run's reference and objective.
"""
