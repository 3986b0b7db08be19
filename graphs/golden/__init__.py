"""Golden step graphs of a tiny model, one JSON file per schedule and phase, plus pictures.

Regenerate with ``python -m graphs.golden.regen`` (see :mod:`graphs.golden.regen`);
``tests/graphs/test_golden.py`` fails when a builder's output drifts from these files.
"""
