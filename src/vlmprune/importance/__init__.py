"""Importance criteria: pure functions of collected statistics and weights (see calibrate for the hooks)."""
