"""Per-file summary and failure reasons of a parity run (pure functions over the results; unit-tested).

A results file maps each case id (``tests/test_x.py::Class::test[params]``) to ``{"status": ..., "message":
..., "internals": [...], "missing": [...]}`` and holds ``"__meta__": {file: {...}}`` (deselected counts,
time-outs, collection errors). The oracle's file has the same shape for the real peft.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from _parity_classify import needs_network, private_attribute

IN_SCOPE = ("passed", "failed", "internal")

#: Which helper's area a failure reason belongs to (first match on the lower-cased reason), for the lead.
AREAS = (
    (("testhotswap", "testmodelandlayerstatus", "model_status", "layer_status", "hotswap"), "status-swap"),
    (
        ("testweighttying", "target_parameters", "trainable_token", "weight_tying", "layer_replication"),
        "targets",
    ),
    (
        ("testcorda", "testeva", "testloftq", "eva", "corda", "pissa", "olora", "loftq", "orthogonal"),
        "init-data",
    ),
    (("init_lora_weights", "lora_ga"), "init-data"),
    (("mixed", "peftmodelfor", "task_type", "pefterror", "nomatchingpeft"), "tasks-mixed"),
    (("loraplus",), "cli-init"),
    (
        ("kasa", "alora", "mica", "bdlora", "use_bdlora", "megatron", "arrow", "velora", "monteclora"),
        "rare variants",
    ),
    (("peft internal",), "internals (not public API)"),
)


def load(path: Path) -> dict[str, dict]:
    """A results file: JSON (as written by --json) or JSON lines (as the plugins append them)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return merge_lines(text.splitlines())


def merge_lines(lines: list[str]) -> dict[str, dict]:
    results: dict[str, dict] = {"__meta__": {}}
    for line in lines:
        if not line.strip():
            continue
        record = json.loads(line)
        if "__meta__" in record:
            meta = record["__meta__"]
            results["__meta__"].setdefault(meta["file"], {}).update(meta)
        else:
            results.update(record)
    return results


def cases(results: dict[str, dict]) -> dict[str, dict]:
    return {k: refine(v) for k, v in results.items() if k != "__meta__"}


def refine(entry: dict) -> dict:
    """A failed case whose recorded error shows it needed the network or reached into PEFT's modules, as the
    plugins now classify it (so results of an earlier version of the rules read the same)."""
    if entry.get("status") != "failed":
        return entry
    typename, _, text = entry.get("message", "").partition(": ")
    if needs_network(typename, text):
        return entry | {"status": "needs_network"}
    if private_attribute(typename, text):
        return entry | {"status": "internal"}
    return entry


def file_of(nodeid: str) -> str:
    return nodeid.split("::")[0].rsplit("/", 1)[-1]


def test_function(nodeid: str) -> str:
    """``tests/test_x.py::Class::test_y[params]`` -> ``test_x.py::Class::test_y``."""
    return file_of(nodeid) + "::" + nodeid.split("::", 1)[-1].split("[")[0]


def per_file(ours: dict[str, dict], theirs: dict[str, dict] | None = None) -> dict[str, dict[str, object]]:
    """Counts per test file. In scope: passed, failed or internal here, and not needing the network in peft."""
    theirs_cases = cases(theirs or {})
    rows: dict[str, dict[str, object]] = {}
    meta = ours.get("__meta__", {})
    for name in sorted({file_of(k) for k in cases(ours)} | {file_of(k) for k in meta}):
        rows[name] = dict.fromkeys(
            ("in_scope", "deltatune_passed", "peft_passed", "both_passed", "failed", "internal"), 0
        ) | dict.fromkeys(("needs_network", "out_of_scope", "skipped"), 0)
        file_meta = next((m for k, m in meta.items() if file_of(k) == name), {})
        rows[name]["out_of_scope"] = file_meta.get("deselected_other_methods", 0)
        rows[name]["note"] = file_meta.get("note", "")
    for nodeid, entry in cases(ours).items():
        row = rows[file_of(nodeid)]
        status = entry["status"]
        peft_status = theirs_cases.get(nodeid, {}).get("status")
        if status in IN_SCOPE and peft_status == "needs_network":
            status = "needs_network"
        if status not in IN_SCOPE:
            row[status] = int(row.get(status, 0)) + 1  # type: ignore[call-overload]
            continue
        row["in_scope"] = int(row["in_scope"]) + 1  # type: ignore[call-overload]
        if status == "passed":
            row["deltatune_passed"] = int(row["deltatune_passed"]) + 1  # type: ignore[call-overload]
        else:
            row[status] = int(row[status]) + 1  # type: ignore[call-overload]
        if theirs is not None and peft_status is None:
            row["peft_not_run"] = int(row.get("peft_not_run", 0)) + 1  # type: ignore[call-overload]
        if peft_status == "passed":
            row["peft_passed"] = int(row["peft_passed"]) + 1  # type: ignore[call-overload]
            if status == "passed":
                row["both_passed"] = int(row["both_passed"]) + 1  # type: ignore[call-overload]
    return rows


def _ratio(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "–"


def table_markdown(rows: dict[str, dict[str, object]], oracle: bool = True) -> str:
    """The README's per-file table (with the totals row)."""
    head = (
        "| PEFT test file | in scope | deltatune passes | peft passes | of peft's passes, deltatune passes |"
    )
    head += " failed | internal | needs network | out of scope | skipped |"
    lines = [head, "|---" * 10 + "|"]
    keys = ("in_scope", "deltatune_passed", "peft_passed", "both_passed", "failed", "internal")
    keys += ("needs_network", "out_of_scope", "skipped")
    total = dict.fromkeys(keys, 0)
    for name, row in rows.items():
        for key in keys:
            total[key] += int(row[key])  # type: ignore[call-overload]
        notes = [str(row["note"])] if row.get("note") else []
        if row.get("peft_not_run"):
            notes.append(f"peft did not run {row['peft_not_run']} of them")
        lines.append(_table_line(f"`{name}`" + (f" ({'; '.join(notes)})" if notes else ""), row, oracle))
    if len(rows) > 1:
        lines.append(_table_line("**all**", total, oracle))
    return "\n".join(lines) + "\n"


def _table_line(label: str, row: dict, oracle: bool) -> str:
    peft = str(row["peft_passed"]) if oracle else "not run"
    both = f"{row['both_passed']} ({_ratio(row['both_passed'], row['peft_passed'])})" if oracle else "–"
    cells = [label, row["in_scope"], row["deltatune_passed"], peft, both, row["failed"], row["internal"]]
    cells += [row["needs_network"], row["out_of_scope"], row["skipped"]]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def failure_reason(nodeid: str, entry: dict) -> str:
    """A short reason that groups failing cases by the missing feature or the error."""
    message = entry.get("message", "")
    typename, _, text = message.partition(": ")
    if entry.get("status") == "internal":
        internals = entry.get("internals") or []
        where = re.sub(r" \(<[^>]*>\)", "", text)  # a module's repr names its loader's address
        return f"peft internal {internals[0]}" if internals else f"peft internal: {where[:90]}"
    if entry.get("missing"):
        return f"LoRA feature missing: {entry['missing'][0]}"
    if m := re.search(r"deltatune has no public (\w+)", text):
        return f"missing public name: {m.group(1)}"
    if m := re.search(r"Expected a BaseException type, but got '(\w+)'", text):
        return f"missing public name: {m.group(1)}"
    if m := re.search(r"(\w+) is not supported by deltatune's (\w+)", text):
        return f"unsupported {m.group(2)} option: {m.group(1)}"
    if m := re.search(r"init_lora_weights=['\"]?([\w-]+)", text):
        return f"init_lora_weights={m.group(1).split('_niter')[0]} refused"
    if "Regex pattern did not match" in text:
        regex = re.search(r"(?:Expected regex|Regex): (.*)", text)
        expected = regex.group(1).replace("\\", "").strip()[:90] if regex else "?"
        return f"error message differs from PEFT's (expects {expected})"
    if text.startswith(("DID NOT RAISE", "DID NOT WARN")):
        return f"{_first_line(text).split('. ')[0][:60]} in {test_function(nodeid)}"
    if typename == "AttributeError" and (m := re.search(r"object has no attribute '(\w+)'", text)):
        return f"AttributeError: no attribute '{m.group(1)}'"
    if typename == "AssertionError" or not typename:
        return f"assertion failed in {test_function(nodeid)}"
    return f"{typename}: {re.sub(r'[0-9]+', 'N', _first_line(text))[:110]}"


def area_of(reason: str) -> str:
    """The first area with a keyword that starts a word of the reason (``eva`` in ``EvaConfig``, not in
    ``raise ValueError``)."""
    low = reason.lower()
    for words, area in AREAS:
        if any(re.search(rf"(?<![a-z]){re.escape(w)}", low) for w in words):
            return area
    return "behaviour / other"


def failure_groups(ours: dict[str, dict], theirs: dict[str, dict] | None = None) -> list[dict[str, object]]:
    """In-scope cases deltatune fails, grouped by reason; most cases that peft passes first."""
    theirs_cases = cases(theirs or {})
    groups: dict[str, list[str]] = defaultdict(list)
    for nodeid, entry in cases(ours).items():
        peft_network = theirs_cases.get(nodeid, {}).get("status") == "needs_network"
        if entry["status"] in ("failed", "internal") and not peft_network:
            groups[failure_reason(nodeid, entry)].append(nodeid)
    out = []
    for reason, ids in groups.items():
        peft_passes = [i for i in ids if theirs_cases.get(i, {}).get("status") == "passed"]
        out.append(
            {
                "reason": reason,
                "area": area_of(reason),
                "cases": len(ids),
                "peft_passes": len(peft_passes),
                "files": dict(Counter(file_of(i) for i in ids)),
                "tests": sorted({test_function(i) for i in ids}),
                "ids": sorted(ids),
            }
        )
    return sorted(out, key=lambda g: (-int(g["peft_passes"]), -int(g["cases"]), str(g["reason"])))  # type: ignore[call-overload]


def failures_markdown(groups: list[dict[str, object]], title: str, examples: int = 3) -> str:
    """The failure list for the notes: one section per reason, with its tests and a few case ids."""
    lines = [f"# {title}"]
    areas: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for g in groups:
        areas[str(g["area"])][0] += int(g["cases"])  # type: ignore[call-overload]
        areas[str(g["area"])][1] += int(g["peft_passes"])  # type: ignore[call-overload]
    lines += ["", "By area:", "", "| area | cases | of them peft passes |", "|---|---|---|"]
    lines += [f"| {a} | {c} | {pp} |" for a, (c, pp) in sorted(areas.items(), key=lambda kv: -kv[1][1])]
    lines += [
        "",
        "By reason:",
        "",
        "| # | reason | area | cases | of them peft passes | files |",
        "|---" * 6 + "|",
    ]
    for n, g in enumerate(groups, 1):
        files = ", ".join(f"{f} {c}" for f, c in sorted(g["files"].items()))  # type: ignore[attr-defined]
        lines.append(f"| {n} | {g['reason']} | {g['area']} | {g['cases']} | {g['peft_passes']} | {files} |")
    for n, g in enumerate(groups, 1):
        lines += ["", f"## {n}. {g['reason']} ({g['cases']} cases, {g['peft_passes']} pass in peft)", ""]
        tests: list[str] = g["tests"]  # type: ignore[assignment]
        lines += [f"- `{t}`" for t in tests[:12]]
        if len(tests) > 12:
            lines.append(f"- ... and {len(tests) - 12} more test functions")
        ids: list[str] = g["ids"]  # type: ignore[assignment]
        lines += ["", "e.g. " + ", ".join(f"`{i}`" for i in ids[:examples])]
    return "\n".join(lines) + "\n"
