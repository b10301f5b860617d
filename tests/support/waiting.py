"""Polling helpers: tests wait for a condition with a deadline instead of sleeping a guessed time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from aibot.harness.procs import wait_until

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = "") -> T:
    """Returns the first truthy value of `predicate()`, or fails the test after `timeout` seconds."""
    return wait_until(predicate, timeout, message or str(predicate), interval, error=AssertionError)
