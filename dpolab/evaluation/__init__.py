"""The evaluation wing: what a model is worth.

- :mod:`~dpolab.evaluation.metrics`: SPEC §3's metrics and ``metrics.jsonl``;
- :mod:`~dpolab.evaluation.heldout`: metrics over a dataset (``dpolab eval``) and one answer's implicit
  reward (``dpolab score``);
- :mod:`~dpolab.evaluation.generate`: sampling answers; :mod:`~dpolab.evaluation.task_eval`: task reward
  and KL; :mod:`~dpolab.evaluation.pairs`: on-policy pairs (``dpolab make-pairs``);
- :mod:`~dpolab.evaluation.plots`: PNG charts.
"""
