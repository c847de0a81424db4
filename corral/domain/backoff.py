"""Exponential backoff with jitter, and attempt caps. Pure: randomness is passed in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base: float = 30.0
    factor: float = 2.0
    maximum: float = 3600.0
    jitter: float = 0.2  # fraction of the delay that is randomised (0..1)

    def __post_init__(self) -> None:
        if self.base <= 0 or self.factor < 1 or self.maximum < self.base:
            raise ValueError("backoff needs base > 0, factor >= 1, maximum >= base")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")

    def ceiling(self, failures: int) -> float:
        """The un-jittered delay after `failures` consecutive failures (>= 1)."""
        if failures < 1:
            return 0.0
        # cap the exponent before computing to avoid overflow on long outages
        exp = min(failures - 1, 64)
        return min(self.maximum, self.base * self.factor**exp)

    def delay(self, failures: int, rand: float) -> float:
        """Delay after `failures` failures; `rand` in [0, 1) picks the jitter.
        Always within [ceiling * (1 - jitter), ceiling]."""
        if not 0 <= rand < 1:
            raise ValueError("rand must be in [0, 1)")
        top = self.ceiling(failures)
        return top * (1 - self.jitter) + top * self.jitter * rand


# A client told to retry after R seconds waits R plus up to this share of R, at random:
# a Retry-After is whole seconds, so every client refused in one burst is told the same
# few, and coming back exactly then would re-form the burst.
RETRY_AFTER_SPREAD = 0.5


def after_retry_after(seconds: float, rand: float) -> float:
    """How long to wait when told Retry-After `seconds` (`rand` in [0, 1))."""
    return seconds * (1 + RETRY_AFTER_SPREAD * rand)
