"""Evaluation: exact-match tasks (tasks.py) and efficiency measures (efficiency.py)."""
