"""Each method's training-step cost above the frozen-base floor, deltatune's as a fraction of peft's, resolved
step by step (``python -m benchmarks.run --workloads excess``).

The ``train`` workload times every variant for a few steps per round, so the floor and a method's two libraries
are tens of seconds apart, and on a shared machine the load drifts between them by more than an adapter's
whole cost. Here, for each method, ``--pairs`` groups of adjacent single steps -- the floor, deltatune's, peft's
(and for DoRA the ``floor-dora`` bound) -- are timed back to back, the order rotated every group, so neighbouring
steps share the machine's state. Per method it reports:

- ``dt/floor`` and ``peft/floor``: medians of the per-group ratios;
- ``fraction``: (mean of deltatune − floor) / (mean of peft − floor) over the groups, the issue tracker's
  criterion; a ratio of means, because the per-group ratio of two small differences is unstable;
- ``interval``: a 90% bootstrap interval of that fraction (groups resampled with replacement, 2,000 times,
  fixed seed), so a reader sees whether the criterion (at most 0.5) is met beyond the noise.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from typing import Any

__all__ = ["bench_excess", "excess_table", "fraction_interval"]


def fraction_interval(
    ours: list[float], theirs: list[float], floor: list[float], draws: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean(ours − floor) / mean(theirs − floor), and its 5th and 95th bootstrap percentiles) over paired
    groups. A resample whose denominator is not positive counts as +inf (peft at or under the floor there)."""
    n = len(floor)
    ex_ours = [a - f for a, f in zip(ours, floor, strict=True)]
    ex_theirs = [b - f for b, f in zip(theirs, floor, strict=True)]

    def ratio(idx: list[int]) -> float:
        den = sum(ex_theirs[i] for i in idx)
        return sum(ex_ours[i] for i in idx) / den if den > 0 else float("inf")

    rng = random.Random(seed)
    boots = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(draws))
    return ratio(list(range(n))), boots[int(0.05 * draws)], boots[int(0.95 * draws) - 1]


def bench_excess(
    variants: dict[str, Any], run_one: Any, methods: list[str], groups: int, warmup: int, clock: Any
) -> dict[str, Any]:
    """For each method, ``groups`` groups of one step per variant (floor, deltatune, peft and, for DoRA,
    floor-dora), adjacent and rotated; ``run_one(name)`` runs one training step and returns its seconds."""
    out: dict[str, Any] = {}
    for method in methods:
        names = ["floor", f"deltatune/{method}", f"peft/{method}"]
        if method == "dora" and "floor-dora" in variants:
            names.append("floor-dora")
        for name in names:
            for _ in range(warmup):
                run_one(name, time.perf_counter)
        times: dict[str, list[float]] = {n: [] for n in names}
        for g in range(groups):
            gc.collect()
            for name in names[g % len(names) :] + names[: g % len(names)]:
                times[name].append(run_one(name, clock))
        floor = times["floor"]
        ours, theirs = times[f"deltatune/{method}"], times[f"peft/{method}"]
        fraction, low, high = fraction_interval(ours, theirs, floor)
        row: dict[str, Any] = {
            "groups": groups,
            "floor_ms": statistics.median(floor) * 1e3,
            "dt_floor": statistics.median(a / f for a, f in zip(ours, floor, strict=True)),
            "peft_floor": statistics.median(b / f for b, f in zip(theirs, floor, strict=True)),
            "fraction": fraction,
            "interval": [low, high],
            "times": times,
        }
        if "floor-dora" in times:
            bound = times["floor-dora"]
            row["bound_floor"] = statistics.median(b / f for b, f in zip(bound, floor, strict=True))
            row["above_bound_fraction"] = fraction_interval(ours, theirs, bound)
        out[method] = row
    return out


def excess_table(result: dict[str, Any], methods: list[str]) -> str:
    head = (
        "| method | groups | floor ms | deltatune/floor | peft/floor | above floor dt/peft | 90% interval |"
    )
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|"]
    for m in methods:
        row = result.get(m)
        if row is None:
            continue
        low, high = row["interval"]
        lines.append(
            f"| {m} | {row['groups']} | {row['floor_ms']:.1f} | {row['dt_floor']:.3f}x | {row['peft_floor']:.3f}x "
            f"| {row['fraction']:.2f} | {low:.2f} to {high:.2f} |"
        )
        if "above_bound_fraction" in row:
            f, lo, hi = row["above_bound_fraction"]
            lines.append(
                f"| {m} above floor-dora ({row['bound_floor']:.3f}x the floor) | | | | | {f:.2f} "
                f"| {lo:.2f} to {hi:.2f} |"
            )
    lines.append(
        "above floor dt/peft: mean(deltatune − floor) / mean(peft − floor) over adjacent groups of one step each; "
        "interval: 5th-95th bootstrap percentiles (inf: peft's mean at or under the floor in that resample)"
    )
    return "\n".join(lines)
