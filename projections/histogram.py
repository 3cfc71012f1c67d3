"""A mergeable latency histogram: fixed log-scale buckets, stored sparse as JSON text.

Bucket `i` holds values in (MIN_MS·G^(i-1), MIN_MS·G^i] (bucket 0: everything up to MIN_MS), with
G = 2^(1/4): a percentile read from it is within G^(1/2) ≈ 9 % of the exact one. Because the
buckets are the same for every row, histograms of any days and triggers merge by adding counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import orjson

MIN_MS = 0.01
GROWTH = 2**0.25
MAX_BUCKET = 200  # 0.01 ms · 2^50: far beyond any timeout

Histogram = dict[int, int]


def bucket_of(ms: float) -> int:
    if not ms > MIN_MS:  # also catches NaN and negatives
        return 0
    index = math.ceil(math.log(ms / MIN_MS, GROWTH) - 1e-9)
    return min(max(index, 0), MAX_BUCKET)


def bucket_value(index: int) -> float:
    """The value a bucket stands for: the geometric middle of its bounds."""
    if index <= 0:
        return MIN_MS
    return float(MIN_MS * GROWTH ** (index - 0.5))


def add(histogram: Histogram, ms: float, count: int = 1) -> None:
    index = bucket_of(ms)
    histogram[index] = histogram.get(index, 0) + count


def merge(histograms: Iterable[Mapping[int, int]]) -> Histogram:
    merged: Histogram = {}
    for histogram in histograms:
        for index, count in histogram.items():
            merged[index] = merged.get(index, 0) + count
    return merged


def percentile(histogram: Mapping[int, int], q: float) -> float | None:
    """The nearest-rank `q` quantile (0 < q <= 1), or None for an empty histogram."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= rank:
            return _rounded(bucket_value(index))
    return _rounded(bucket_value(max(histogram)))  # pragma: no cover - rank <= total


def _rounded(ms: float) -> float:
    """To the microsecond, and below a millisecond to four significant digits: rounded to the
    microsecond alone, 0.01834 ms (the middle of the bucket holding 0.02) became 0.018, out of
    the half bucket the estimate promises."""
    return round(ms, max(3, 3 - math.floor(math.log10(ms))))


def dumps(histogram: Mapping[int, int]) -> str:
    return orjson.dumps({str(k): v for k, v in sorted(histogram.items()) if v}).decode()


def loads(text: str | None) -> Histogram:
    if not text:
        return {}
    return {int(k): int(v) for k, v in orjson.loads(text).items()}
