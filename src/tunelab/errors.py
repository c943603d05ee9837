"""Project exception types. The CLI prints these as one readable message, without a traceback."""
from __future__ import annotations


class TunelabError(Exception):
    """An error caused by user input or environment, with a message that says what to fix."""


class ConfigError(TunelabError):
    """A configuration key or value is wrong."""


class DataError(TunelabError):
    """A dataset is missing, unreadable or has invalid records."""


class ModelError(TunelabError):
    """A model, tokenizer or adapter cannot be loaded or does not fit the request."""


class TrainingError(TunelabError):
    """Training stopped because of a problem it detected (e.g. a NaN loss)."""
