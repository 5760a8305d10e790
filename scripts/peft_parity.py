"""Measure how much of PEFT's own custom-model test suite passes with deltatune behind PEFT's public names.

Usage::

    python scripts/peft_parity.py /path/to/peft/tests [--workdir DIR] [-k EXPR] [--json OUT] [pytest args...]

The folder must hold PEFT's ``test_custom_models.py`` with its ``testing_common.py``, ``testing_utils.py`` and
``conftest.py`` (e.g. ``git show HEAD:tests/<file>`` from a clone of huggingface/peft). Nothing of PEFT is
copied into this repository: the files are copied into a scratch folder next to a generated stand-in ``peft``
package, and pytest runs there.

The stand-in ``peft`` package:

- maps PEFT's **public** names (``from peft import LoraConfig, get_peft_model, ...``) to deltatune's;
- turns the configs of methods deltatune does not have (IA3, VeRA, ...) into inert placeholders: every case
  that involves one is *out of scope* (deselected when its parameters name one, else recorded when touched);
- answers every import from PEFT's **internals** (``peft.tuners.*``, ``peft.utils.*``, private modules) with
  placeholders that record their use and raise when used: a failing case that used one *depends on
  internals*;
- supplies the test harness's own helpers with plain values (``infer_device() -> "cpu"``,
  ``peft.import_utils.is_*_available() -> False``, ``is_transformers_ge_v5`` from the installed transformers);
  these test nothing of the library;
- a public name deltatune lacks becomes a placeholder that raises ``NotImplementedError`` when called (a
  genuine failure of the public API, counted as such).

Each case ends in one of: ``passed``, ``failed`` (public API only), ``internal`` (failed after touching a
PEFT internal), ``skipped``, or ``out_of_scope`` (touched another method). The summary is printed and, with
``--json``, written as JSON with the failing case ids.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PEFT_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py", "conftest.py")

#: The stand-in ``peft`` package and the pytest plugins (their own files, copied into the scratch folder).
SHIM = Path(__file__).with_name("peft_parity_shim")


def build_workdir(source: Path, workdir: Path) -> Path:
    """Copies PEFT's test files into ``workdir/tests`` and writes the stand-ins; returns the tests folder."""
    tests = workdir / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    (tests / "__init__.py").write_text("", encoding="utf-8")
    for name in PEFT_FILES:
        shutil.copy(source / name, tests / name)
    shim = workdir / "shim"
    (shim / "peft").mkdir(parents=True, exist_ok=True)
    shutil.copy(SHIM / "peft_init.py", shim / "peft" / "__init__.py")
    for name in ("_parity_markers.py", "_parity_finder.py", "_parity_plugin.py"):
        shutil.copy(SHIM / name, shim / name)
    return tests


def summarise(results: dict[str, dict[str, str]]) -> dict[str, object]:
    """Counts per status, pass rate in scope, and the failing ids."""
    deselected = results.pop("__deselected_other_methods__", 0)
    unsupported = results.pop("__deselected_unsupported_options__", 0)
    counts: dict[str, int] = {}
    for entry in results.values():
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    public = counts.get("passed", 0) + counts.get("failed", 0)
    in_scope = public + counts.get("internal", 0)
    return {
        "counts": counts,
        "deselected_other_methods": deselected,
        "deselected_unsupported_lora_options": unsupported,
        "public_api_cases": public,
        "public_api_pass_rate": round(counts.get("passed", 0) / public, 4) if public else None,
        "in_scope_cases_incl_internal": in_scope,
        "failed": sorted(k for k, v in results.items() if v["status"] == "failed"),
        "internal": sorted(k for k, v in results.items() if v["status"] == "internal"),
    }


def run_oracle(deltatune_results: Path, workdir: Path, tests: Path, pytest_args: list[str]) -> int:
    """Runs the in-scope cases of a deltatune run with the real peft; prints how each status compares."""
    ours = json.loads(deltatune_results.read_text(encoding="utf-8"))
    ours = {k: v for k, v in ours.items() if isinstance(v, dict)}
    keep = [k for k, v in ours.items() if v["status"] in ("passed", "failed", "internal", "skipped")]
    oracle_dir = workdir / "oracle"
    oracle_dir.mkdir(exist_ok=True)
    shutil.copy(SHIM / "_parity_oracle.py", oracle_dir / "_parity_oracle.py")
    (workdir / "keep.json").write_text(json.dumps(keep), encoding="utf-8")
    results_path = workdir / "oracle_results.json"
    results_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        PYTHONPATH=str(oracle_dir), PARITY_KEEP=str(workdir / "keep.json"), PARITY_RESULTS=str(results_path)
    )
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [
        sys.executable, "-m", "pytest", str(tests / "test_custom_models.py"), "-p", "_parity_oracle", "-q",
        "-p", "no:cacheprovider", "--rootdir", str(workdir), "-o", "addopts=", "--tb=no", "-W", "ignore",
    ]  # fmt: skip
    subprocess.run(cmd + pytest_args, cwd=workdir, env=env, check=False)
    theirs = json.loads(results_path.read_text(encoding="utf-8"))
    table: dict[str, int] = {}
    for key in keep:
        pair = f"deltatune {ours[key]['status']} / peft {theirs.get(key, {}).get('status', 'not run')}"
        table[pair] = table.get(pair, 0) + 1
    print(json.dumps(dict(sorted(table.items())), indent=1))
    fails = sorted(
        k for k in keep if ours[k]["status"] == "failed" and theirs.get(k, {}).get("status") == "passed"
    )
    (workdir / "fail_here_pass_in_peft.json").write_text(json.dumps(fails, indent=1), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "peft_tests", type=Path, help="folder holding PEFT's test_custom_models.py and helpers"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-case results here")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument(
        "--oracle",
        type=Path,
        default=None,
        help="run the cases of this results JSON (a deltatune run) with the real peft instead, and compare",
    )
    args, pytest_args = parser.parse_known_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peft-parity-"))
    tests = build_workdir(args.peft_tests, workdir)
    if args.oracle is not None:
        return run_oracle(args.oracle, workdir, tests, pytest_args)
    results_path = workdir / "results.json"
    results_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(workdir / "shim"), env.get("PYTHONPATH", "")])
    env["PARITY_RESULTS"] = str(results_path)
    env["HF_HUB_OFFLINE"] = (
        "1"  # cases that download a checkpoint fail at once instead of waiting on the network
    )
    cmd = [
        sys.executable, "-m", "pytest", str(tests / "test_custom_models.py"), "-p", "_parity_plugin",
        "-q", "-p", "no:cacheprovider", "--rootdir", str(workdir), "-o", "addopts=", "--tb=no",
        "-W", "ignore",
    ]  # fmt: skip
    if args.k:
        cmd += ["-k", args.k]
    subprocess.run(cmd + pytest_args, cwd=workdir, env=env, check=False)
    if not results_path.is_file():
        print("no results were written (collection failed?)", file=sys.stderr)
        return 2
    results = json.loads(results_path.read_text(encoding="utf-8"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True), encoding="utf-8")
    summary = summarise(results)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("failed", "internal")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
