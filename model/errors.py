"""Errors that ``dmft`` reports in one line, importable without torch so every command can catch them."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where it happened."""
