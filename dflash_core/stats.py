"""The percentile every benchmark reports (engine, serving and load test alike): linear
interpolation between the closest ranks, numpy's default, so p50 of [1, 2] is 1.5."""
from __future__ import annotations

import math
from typing import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """q in [0, 100]; None for no values."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def rep_order(modes: list, rep: int) -> list:
    """The order rep (0-based) of an A/B runs its modes in: as given in even reps, reversed
    in odd ones, so neither mode always runs first on a machine that drifts."""
    return list(modes) if rep % 2 == 0 else list(modes)[::-1]


def on_off(on: dict, off: dict) -> dict:
    """Throughputs by rep of two modes ({rep: tokens/s}, reps of one level) -> the median of
    each (p50 above), their ratio (None where either median is 0 or missing) and each rep's
    own ratio (`rep_ratios`, over the reps both ran, in rep order, skipping zeros)."""
    med_on, med_off = percentile(on.values(), 50), percentile(off.values(), 50)
    reps = sorted(set(on) & set(off))
    return {"median_on": med_on, "median_off": med_off,
            "ratio": med_on / med_off if med_on and med_off else None,
            "rep_ratios": [on[k] / off[k] for k in reps if on[k] and off[k]]}
