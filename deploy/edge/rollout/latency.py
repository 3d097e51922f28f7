"""An arm's latencies, bounded however long it serves, and their quantiles."""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Collection
from itertools import accumulate

import numpy as np

EXACT_LATENCIES, LATENCY_BIN = 65_536, 1.01  # an arm's latencies kept exactly, then in bins 1 % wide


def quantiles(values: Collection[float]) -> dict[str, float | None]:
    """p50, p90 and p99 of latencies in ms (None each when there are none)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    q = np.percentile(np.fromiter(values, dtype=np.float64, count=len(values)), [50, 90, 99])
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}



class Latencies:
    """An arm's latencies: exact up to `EXACT_LATENCIES` values, then counted in bins 1 % wide (quantiles within
    about 0.5 %), so memory stays bounded however long the arm serves."""

    def __init__(self) -> None:
        self.exact: array | None = array("d")
        self.bins: Counter[int] = Counter()
        self.n = 0

    def add(self, ms: float) -> None:
        self.n += 1
        if self.exact is not None:
            self.exact.append(ms)
            if len(self.exact) <= EXACT_LATENCIES:
                return
            values, self.exact = self.exact, None
            for v in values:
                self.bins[_bin(v)] += 1
            return
        self.bins[_bin(ms)] += 1

    def quantiles(self) -> dict[str, float | None]:
        if self.exact is not None:
            return quantiles(self.exact)
        order = sorted(self.bins)
        cum = list(accumulate(self.bins[b] for b in order))  # the first bin holding the q-th share of the values
        return {name: LATENCY_BIN ** order[bisect_left(cum, q * self.n)] for name, q in (("p50", 0.5), ("p90", 0.9),
                                                                                         ("p99", 0.99))}  # fmt: skip


def _bin(ms: float) -> int:
    return round(math.log(max(ms, 1e-3)) / math.log(LATENCY_BIN))
