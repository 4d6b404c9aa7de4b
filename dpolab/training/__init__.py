"""The training wing: the step, the loop, checkpoints, resume rules, the run directory, guards and the
multi-process checks.

- :mod:`~dpolab.training.step`: ``train_step`` (one screen) and which examples each step takes;
- :mod:`~dpolab.training.loop`: the run: settings and data checked, models built, the loop, the finish;
- :mod:`~dpolab.training.resume`: every rule of ``--resume`` in one place;
- :mod:`~dpolab.training.checkpoint`, :mod:`~dpolab.training.rundir`, :mod:`~dpolab.training.guard`,
  :mod:`~dpolab.training.distributed`.
"""
