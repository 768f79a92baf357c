"""cejax's jobs: what users run for hours on their data, apart from the library.

``training`` (train.py), ``checkpoint`` (the only Orbax code), ``analysis`` with its
``evaluators`` and ``report`` (analyze.py), ``sweep`` (``python -m cejax.jobs.sweep``),
``convert`` (``python -m cejax.jobs.convert``), ``throughput``, the config schema
(``config``) and what every job shares (``common``). ``import cejax`` imports none of
them (nor Orbax, TFDS or matplotlib); import each on its own.
"""
