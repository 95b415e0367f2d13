"""Exceptions with messages that name the problem and the fix."""


class VlmpruneError(Exception):
    """Base class: every error vlmprune raises on purpose."""


class UnsupportedModelError(VlmpruneError):
    """The model's family has no adapter."""


class PlanError(VlmpruneError):
    """A pruning plan is malformed or does not fit the model."""


class DataError(VlmpruneError):
    """Training or calibration data is missing, malformed or does not fit the processor."""
