"""Inference shared by evaluation and serving: log-prob scoring and generation.

Never imports `fspo.train` or `fspo.eval` (checked by tests/test_layering.py).
"""
