"""An example reward function for `dpolab make-pairs --reward examples.my_reward:exact_sum`.

A reward is any Python function ``(prompt, completion) -> float``; dpolab imports it by name (from the
current directory first) and never evaluates text as code.
"""


def exact_sum(prompt: str, completion: str) -> float:
    """1 for the exact sum asked for in 'a+b=', 0.5 for an answer off by ten (a carry slip), else 0."""
    a, b = prompt.rstrip("=").split("+")
    target = int(a) + int(b)
    if not completion.isdigit():
        return 0.0
    if int(completion) == target:
        return 1.0
    return 0.5 if abs(int(completion) - target) == 10 else 0.0
