"""How often a daemon asks again a peer it cannot reach: one backoff for both sides."""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["backoff"]

#: The first wait, its growth, and its cap, in seconds.
FIRST_S, FACTOR, MAX_S = 0.05, 2.0, 5.0


def backoff() -> Iterator[float]:
    """0.05, 0.1, 0.2 ... seconds, up to 5 s each from then on."""
    delay = FIRST_S
    while True:
        yield delay
        delay = min(delay * FACTOR, MAX_S)
