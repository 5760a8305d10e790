"""Plain-text tables of the benchmark results (medians and ratios), pasteable as Markdown."""

from __future__ import annotations

import statistics
from typing import Any

from .excess import excess_table


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _spread(stats: dict[str, float]) -> float:
    """Interquartile range relative to the median (the noise of one variant's timings)."""
    return (stats["p75"] - stats["p25"]) / stats["median"] if stats["median"] else 0.0


def _ms(stats: dict[str, float]) -> str:
    return f"{stats['median'] * 1e3:.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "n/a"


def paired(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Time ratio a/b: the median over rounds of the per-round ratio (both sides measured in the same
    round), or the ratio of overall medians when rounds are not recorded."""
    ra, rb = a.get("rounds"), b.get("rounds")
    if ra and rb and len(ra) == len(rb):
        return statistics.median(x / y for x, y in zip(ra, rb, strict=True))
    return a["median"] / b["median"]


def _pr(a: dict[str, Any], b: dict[str, Any]) -> str:
    return f"{paired(a, b):.3f}x"


def excess_ratio(a: dict[str, Any], b: dict[str, Any], base: dict[str, Any]) -> float:
    """How much of ``b``'s cost above ``base`` ``a`` has: (a − base) / (b − base), the median over rounds of
    the per-round value (all three measured in the same round), else from the overall medians. Only
    meaningful when b's excess is well above the noise."""
    rows = [v.get("rounds") for v in (a, b, base)]
    if all(rows) and len({len(r) for r in rows if r}) == 1:
        values = [(x - f) / (y - f) for x, y, f in zip(*rows, strict=True) if y != f]  # type: ignore[call-overload]
        if values:
            return statistics.median(values)
    return (a["median"] - base["median"]) / (b["median"] - base["median"])


def train_table(train: dict[str, Any], methods: list[str]) -> str:
    floor = train["floor"]
    header = [
        "method",
        "floor ms",
        "deltatune ms",
        "peft ms",
        "deltatune/floor",
        "peft/floor",
        "peft/deltatune",
    ]
    tokens = train.get("floor-tokens")
    if tokens is not None:
        header += ["deltatune/floor-tokens", "peft/floor-tokens"]
    header += ["above floor dt/peft", "noise (IQR/median, max)"]
    rows = []
    for m in methods:
        dt, pf = train.get(f"deltatune/{m}"), train.get(f"peft/{m}")
        if dt is None or pf is None:
            continue
        noise = max(_spread(floor), _spread(dt), _spread(pf))
        row = [
            m,
            _ms(floor),
            _ms(dt),
            _ms(pf),
            _pr(dt, floor),
            _pr(pf, floor),
            _pr(pf, dt),
        ]
        if tokens is not None:
            row += [_pr(dt, tokens), _pr(pf, tokens)]
        rows.append([*row, f"{excess_ratio(dt, pf, floor):.2f}", f"{noise:.1%}"])
    if "full" in train:
        full = train["full"]
        row = ["full FT", _ms(floor), _ms(full), "", _pr(full, floor), "", ""]
        if tokens is not None:
            row += [_pr(full, tokens), ""]
        rows.append([*row, "", f"{_spread(full):.1%}"])
    note = (
        "\nabove floor dt/peft: deltatune's cost above the floor as a fraction of peft's (median over rounds)"
    )
    if tokens is not None:
        note += (
            f"\nfloor-tokens (gradient stops at the patch embeddings): {_ms(tokens)} ms = "
            f"{_pr(tokens, floor)} the floor"
        )
    bound, dt, pf = train.get("floor-dora"), train.get("deltatune/dora"), train.get("peft/dora")
    if bound is not None and dt is not None and pf is not None:
        note += (
            f"\nfloor-dora (the floor plus the second GEMM that DoRA's formula with dropout needs in each adapted "
            f"layer): {_ms(bound)} ms = {_pr(bound, floor)} the floor; DoRA above it: deltatune "
            f"{_pr(dt, bound)}, peft {_pr(pf, bound)}; deltatune's cost above it as a fraction of peft's: "
            f"{excess_ratio(dt, pf, bound):.2f}"
        )
    return _table(header, rows) + note


def infer_table(infer: dict[str, Any], methods: list[str]) -> str:
    base = infer["base"]
    header = ["method", "base ms", "dt unmerged", "dt merged", "peft unmerged", "peft merged"]
    header += ["dt unm/base", "dt mrg/base", "peft unm/base", "peft mrg/base"]
    rows = []
    for m in methods:
        keys = [f"deltatune/{m}:unmerged", f"deltatune/{m}:merged", f"peft/{m}:unmerged", f"peft/{m}:merged"]
        if not all(k in infer for k in keys):
            continue
        stats = [infer[k] for k in keys]
        rows.append([m, _ms(base), *(_ms(s) for s in stats), *(_pr(s, base) for s in stats)])
    return _table(header, rows)


def merged_table(merged: dict[str, Any], methods: list[str]) -> str:
    header = ["method", "deltatune merged/base", "IQR", "peft merged/base", "IQR", "pairs"]
    header += ["FLOPs dt/base", "dt bound", "peft bound"]
    rows = []
    for m in methods:
        dt, pf = merged.get(f"deltatune/{m}"), merged.get(f"peft/{m}")
        if dt is None or pf is None:
            continue
        iqr = lambda r: f"{r['p25']:.3f}-{r['p75']:.3f}"  # noqa: E731
        rows.append(
            [
                m,
                f"{dt['ratio']:.3f}x",
                iqr(dt),
                f"{pf['ratio']:.3f}x",
                iqr(pf),
                str(dt["pairs"]),
                f"{dt['flops_ratio']:.6f}",
                f"{dt['overhead_bound']:.4f}x",
                f"{pf['overhead_bound']:.4f}x",
            ]
        )
    note = (
        "bound: 1 + (time the merged adapter wrappers add per forward, measured on one-token inputs) / (base "
        "forward time); with equal FLOPs this bounds the merged/base ratio independently of machine noise"
    )
    return _table(header, rows) + "\n" + note


def memory_table(memory: dict[str, Any], methods: list[str]) -> str:
    cuda = "peak_cuda_mib" in memory.get("floor", {})
    key, before_key = ("peak_cuda_mib", "cuda_before_mib") if cuda else ("peak_rss_mib", "rss_before_mib")
    floor = memory["floor"][key]
    step = {name: v[key] - v.get(before_key, 0.0) for name, v in memory.items()}
    header = ["method", "floor MiB", "deltatune MiB", "peft MiB", "deltatune/floor", "peft/floor"]
    header += ["peft/deltatune", "step MiB: floor", "deltatune", "peft"]
    rows = []
    for m in methods:
        dt, pf = memory.get(f"deltatune/{m}"), memory.get(f"peft/{m}")
        if dt is None or pf is None:
            continue
        rows.append(
            [
                m,
                f"{floor:.0f}",
                f"{dt[key]:.0f}",
                f"{pf[key]:.0f}",
                _ratio(dt[key], floor),
                _ratio(pf[key], floor),
                _ratio(pf[key], dt[key]),
                f"{step['floor']:.0f}",
                f"{step[f'deltatune/{m}']:.0f}",
                f"{step[f'peft/{m}']:.0f}",
            ]
        )
    if "full" in memory:
        full = memory["full"][key]
        tail = [f"{step['floor']:.0f}", f"{step['full']:.0f}", ""]
        rows.append(["full FT", f"{floor:.0f}", f"{full:.0f}", "", _ratio(full, floor), "", "", *tail])
    if cuda:
        what = "peak CUDA memory allocated over 3 training steps"
    else:
        what = (
            "peak RSS over 3 training steps, one fresh process per variant; 'step MiB' = peak minus the RSS "
            "before the first step (libraries imported, model built)"
        )
    return f"({what})\n" + _table(header, rows)


def format_report(result: dict[str, Any], methods: list[str]) -> str:
    s, env = result["settings"], result["environment"]
    where = env["gpu"] or f"{env['cpu']}, {s['threads']} thread(s)"
    lines = [
        f"deltatune {env['deltatune']} vs peft {env['peft']} (torch {env['torch']}, transformers "
        f"{env['transformers']}) on {where}",
        f"ViT-{s['model']} shape, batch {s['batch']}, {'bf16 autocast' if s['bf16'] else 'fp32'}, "
        f"{s['repeats']} interleaved rounds x {s['steps']} steps, {s.get('timer', 'wall')} time; load average "
        f"{env['load_avg'][0]:.1f} at start, {env.get('load_avg_end', [0])[0]:.1f} at end",
        "ms: median over all timed steps; ratios: median over rounds of the ratio within each round; "
        "noise: interquartile range / median",
    ]
    sections = (
        (
            "train",
            "Training step (forward + backward + optimiser step; AdaLoRA with rank allocation)",
            train_table,
        ),
        ("infer", "Inference latency (eval, no grad), ms and ratio to the bare base model", infer_table),
        (
            "merged",
            "Merged inference vs the bare base, paired steps (median of per-pair ratios)",
            merged_table,
        ),
        ("memory", "Peak memory of a training step", memory_table),
        ("excess", "Cost above the floor, adjacent single steps (see benchmarks/excess.py)", excess_table),
    )
    for key, title, table in sections:
        if key in result:
            lines += ["", title, table(result[key], methods)]
    lines.append(f"\nwall time {result.get('wall_s', 0):.0f} s")
    return "\n".join(lines)
