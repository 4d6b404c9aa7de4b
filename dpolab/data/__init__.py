"""The data wing: what a pair of answers is before any model sees it.

- :mod:`~dpolab.data.reading`: rows from files, saved datasets and hub datasets, with where each came from;
- :mod:`~dpolab.data.records`: every row validated into a :class:`~dpolab.data.records.Record`, and the
  tokenised :class:`~dpolab.data.records.Example` contract the other wings consume;
- :mod:`~dpolab.data.tokenization`: SPEC §4, records → examples;
- :mod:`~dpolab.data.batch`: the batch layouts (padded, prefix, packed), examples → one :class:`Batch`.
"""
