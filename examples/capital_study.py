"""Case study (the first one tried): DPO on its own samples teaches SmolLM2-135M-Instruct to answer a
capital in one word.

    make real-model && .venv/bin/python -m examples.capital_study      (from the repository root)

The pairs are a right one-word answer (the judge gives 1) against a wrong one (a sentence, a wrong city, a
ramble), sampled on the training countries of examples/capitals.py; the held-out pairs for the reward
accuracy are the bare capital against the sentence the model tends to give ("The capital of Chile is
Santiago."). The stages are examples/case_study.py's; docs/real-model.md reports the runs.
"""

from __future__ import annotations

from examples import capitals
from examples.case_study import Study, arguments, run


def study() -> Study:
    train, heldout = capitals.split()
    pairs = [{"prompt": capitals.prompt(c), "chosen": capitals.CAPITALS[c],
              "rejected": f"The capital of {c} is {capitals.CAPITALS[c]}."} for c in heldout]
    shown = [({"country": c, "capital": capitals.CAPITALS[c]}, capitals.prompt(c)) for c in heldout[:6]]
    return Study("examples.capitals", [capitals.prompt(c) for c in train], pairs, shown, max_new_tokens=8)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], out="runs/capitals", train_prompts=48, samples=6,
                     temperature=0.7, heldout=32, epochs=3, learning_rate=1e-5, beta=0.1)
    run(args, study())


if __name__ == "__main__":
    main()
