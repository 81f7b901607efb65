"""Exponential backoff with full jitter: the one wait rule of the package's hand-written retries.

The teacher client (a shared pause, Retry-After) and the log writer (retrying until the store is
back) retry by hand, each for a reason its module gives; both wait by this rule, the one botocore's
"standard" mode uses for S3 (whose retries are botocore's alone, see ``core.store``). Full jitter
spreads the retries of many clients that failed together instead of sending them back in a wave.
"""

from __future__ import annotations

import random

# 2**32 times any base is past every cap; the bound keeps a long outage's attempt count from
# overflowing the float.
_MAX_DOUBLINGS = 32


def backoff_delay_s(attempt: int, base_s: float, max_s: float) -> float:
    """A random wait in ``[0, min(max_s, base_s * 2**attempt)]`` before retry ``attempt`` (0 for the first)."""
    return random.uniform(0.0, min(max_s, base_s * 2 ** min(attempt, _MAX_DOUBLINGS)))
