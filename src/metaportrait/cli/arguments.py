"""argparse value types shared by several subcommands."""

from __future__ import annotations

import argparse


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def reference_frame(text: str) -> str | int:
    """argparse type of ``--reference``: ``auto``, ``first``, ``running`` or a frame number (0 is the first)."""
    if text in ("auto", "first", "running"):
        return text
    if not text.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"not auto, first, running or a frame number: {text!r}")
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
