"""Case study: DPO on its own samples teaches SmolLM2-135M-Instruct to label a review in one word.

    make real-model && .venv/bin/python -m examples.sentiment_study      (from the repository root)

The pairs are the right label (the judge gives 1) against a wrong answer (the other label, a sentence, a
ramble), sampled on the training reviews of examples/sentiment.py; the held-out pairs for the reward
accuracy are the right label against the other one, on held-out reviews whose words were never trained on.
The stages are examples/case_study.py's; docs/real-model.md reports the run.
"""

from __future__ import annotations

from examples import sentiment
from examples.case_study import Study, arguments, run


def study() -> Study:
    train, heldout = sentiment.split()
    other = {"positive": "Negative", "negative": "Positive"}
    pairs = [{"prompt": sentiment.prompt(r), "chosen": label.capitalize(), "rejected": other[label]}
             for r, label in heldout]
    shown = [({"review": r, "label": label}, sentiment.prompt(r)) for r, label in heldout[:6]]
    return Study("examples.sentiment", [sentiment.prompt(r) for r, _ in train], pairs, shown, max_new_tokens=6)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], out="runs/sentiment", train_prompts=60, samples=8,
                     temperature=1.0, heldout=40, epochs=2, learning_rate=1e-5, beta=0.1)
    run(args, study())


if __name__ == "__main__":
    main()
