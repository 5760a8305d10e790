"""Measure how much of PEFT's own test suite passes with deltatune behind PEFT's public names.

Usage::

    python scripts/peft_parity.py --peft-git <peft clone> --rev <commit> --json ours.json       # deltatune
    python scripts/peft_parity.py --peft-git <peft clone> --rev <commit> --oracle ours.json \\
        --json peft.json --failures-md failures.md                                            # real peft
    python scripts/peft_parity.py --report ours.json peft.json                                # table only

Instead of ``--peft-git``/``--rev`` a folder of PEFT's test files may be given (``PEFT_TESTS``). It must hold
the test files to run (``--files``; by default every file of TEST_FILES it has) with PEFT's
``testing_common.py``, ``testing_utils.py`` and ``conftest.py``. Nothing of PEFT is copied into this
repository: the files go into a scratch folder next to a generated stand-in ``peft`` package, and pytest runs
there, one process per test file (``--timeout`` seconds each; ``--jobs`` files at once).

The stand-in ``peft`` package (scripts/peft_parity_shim):

- maps PEFT's **public** names (``from peft import LoraConfig, get_peft_model, ...``, also where PEFT
  re-exports them, as ``peft.tuners.lora.LoraConfig``) to deltatune's;
- in scope are the methods deltatune implements: LoRA (with DoRA), LoHa, LoKr, AdaLoRA and IA³. The configs
  of other methods (VeRA, BOFT, prompt learning, trainable tokens, ...) become inert placeholders: a case that
  involves one is *out of scope* (deselected when its parameters name one, else recorded when touched).
  The configs of LoRA features deltatune lacks (EvaConfig, CordaConfig, KasaConfig, ...) stay in scope: such
  a case fails when it uses one;
- answers every import from PEFT's **internals** (``peft.tuners.*``, ``peft.utils.*``, private modules) with
  placeholders that record their use and raise when used: a failing case that used one is *internal*;
- supplies the test harness's own helpers with plain values (``infer_device() -> "cpu"``,
  ``peft.import_utils.is_*_available() -> False``, ``is_transformers_ge_v5``);
- a public name deltatune lacks becomes a placeholder that raises ``NotImplementedError`` when called;
- resolving any non-local host name raises ``NetworkNeeded`` at once (no retries) and marks the case: a case
  that fails after trying the network (the Hub) *needs the network* and is left aside, in both runs.

Each case ends in one of ``passed``, ``failed``, ``internal``, ``needs_network``, ``out_of_scope`` or
``skipped`` (see _parity_classify.py). ``--oracle`` runs the cases of a deltatune run that are not out of
scope with the real peft; the per-file table (parity_report.py) then shows both libraries' passes, and
``--failures-md`` groups deltatune's failures by reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: The stand-in ``peft`` package, the pytest plugins and the report (their own files).
SHIM = Path(__file__).with_name("peft_parity_shim")
sys.path.insert(0, str(SHIM))
import parity_report as report  # noqa: E402

#: PEFT's test files this script runs (those present), and the harness files they import.
TEST_FILES = (
    "test_custom_models.py",
    "test_config.py",
    "test_initialization.py",
    "test_other.py",
    "test_lora_variants.py",
    "test_low_level_api.py",
    "test_hub_features.py",
    "test_helpers.py",
    "test_mapping.py",
    "test_loraplus.py",
    "test_tuners_utils.py",
)
HARNESS_FILES = ("testing_common.py", "testing_utils.py", "conftest.py")
SHIM_FILES = ("_parity_markers.py", "_parity_finder.py", "_parity_plugin.py", "_parity_classify.py")
PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--tb=no", "-W", "ignore"]


def peft_facts() -> dict[str, list[str]]:
    """The installed peft's module names and ``__all__``, read from its files (peft is not imported)."""
    spec = importlib.util.find_spec("peft")
    if spec is None or spec.origin is None:
        return {"modules": [], "public": []}
    root = Path(spec.origin).parent
    modules = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    init = (root / "__init__.py").read_text(encoding="utf-8")
    block = re.search(r"__all__\s*=\s*\[(.*?)\]", init, re.S)
    public = re.findall(r"[\"'](\w+)[\"']", block.group(1)) if block else []
    return {"modules": sorted(modules), "public": sorted(public)}


def build_workdir(args: argparse.Namespace, workdir: Path) -> tuple[Path, list[str]]:
    """Copies PEFT's test files into ``workdir/tests`` and writes the stand-ins; returns it and the files."""
    tests = workdir / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    (tests / "__init__.py").write_text("", encoding="utf-8")
    wanted = list(args.files or TEST_FILES)
    for name in (*HARNESS_FILES, *wanted):
        if args.peft_git is not None:
            shown = subprocess.run(
                ["git", "-C", str(args.peft_git), "show", f"{args.rev}:tests/{name}"],
                capture_output=True,
                text=True,
                check=False,
            )
            if shown.returncode == 0:
                (tests / name).write_text(shown.stdout, encoding="utf-8")
        elif (args.peft_tests / name).is_file():
            shutil.copy(args.peft_tests / name, tests / name)
    missing = [n for n in HARNESS_FILES if not (tests / n).is_file()]
    if missing:
        raise SystemExit(
            f"PEFT's harness files {missing} were not found; give --peft-git/--rev or PEFT_TESTS"
        )
    files = [n for n in wanted if (tests / n).is_file()]
    skipped = [n for n in wanted if n not in files]
    if skipped:
        print(f"not in this PEFT revision, skipped: {', '.join(skipped)}", file=sys.stderr)
    shim = workdir / "shim"
    (shim / "peft").mkdir(parents=True, exist_ok=True)
    shutil.copy(SHIM / "peft_init.py", shim / "peft" / "__init__.py")
    facts = json.dumps(peft_facts())
    for folder in (shim, workdir / "oracle"):
        folder.mkdir(exist_ok=True)
        for name in SHIM_FILES:
            shutil.copy(SHIM / name, folder / name)
        (folder / "_parity_peft.json").write_text(facts, encoding="utf-8")
    shutil.copy(SHIM / "_parity_oracle.py", workdir / "oracle" / "_parity_oracle.py")
    return tests, files


def run_file(
    name: str, workdir: Path, env: dict[str, str], plugin: str, extra: list[str], timeout: int
) -> dict:
    """One pytest process for one test file; returns its merged results (partial if it timed out)."""
    stem = Path(name).stem
    results_path = workdir / f"{plugin}-{stem}.jsonl"
    results_path.unlink(missing_ok=True)
    env = dict(env, PARITY_RESULTS=str(results_path))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(workdir / "tests" / name),
        "-p",
        plugin,
        "--rootdir",
        str(workdir),
    ]
    started, note = time.monotonic(), ""
    with open(workdir / f"{plugin}-{stem}.log", "w", encoding="utf-8") as log:
        try:
            done = subprocess.run(
                cmd + PYTEST_ARGS + extra,
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=log,
                timeout=timeout,
                check=False,
            )
            if done.returncode < 0:
                note = f"stopped by signal {-done.returncode}"
        except subprocess.TimeoutExpired:
            note = f"timed out after {timeout} s"
    lines = results_path.read_text(encoding="utf-8").splitlines() if results_path.is_file() else []
    results = report.merge_lines(lines)
    if not lines:
        note = note or f"no results (collection error? see {workdir / f'{plugin}-{stem}.log'})"
    if note:
        results["__meta__"].setdefault(f"tests/{name}", {"file": f"tests/{name}"})["note"] = note
    done = len(report.cases(results))
    print(
        f"{plugin}: {name}: {done} cases in {time.monotonic() - started:.0f} s {note}".rstrip(),
        file=sys.stderr,
    )
    return results


def run_all(
    files: list[str], workdir: Path, env: dict[str, str], plugin: str, args: argparse.Namespace
) -> dict:
    extra = (["-k", args.k] if args.k else []) + args.pytest_args
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        parts = list(pool.map(lambda f: run_file(f, workdir, env, plugin, extra, args.timeout), files))
    merged: dict[str, dict] = {"__meta__": {}}
    for part in parts:
        merged["__meta__"].update(part.pop("__meta__"))
        merged.update(part)
    return merged


def run_deltatune(files: list[str], workdir: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(workdir / "shim"), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    return run_all(files, workdir, env, "_parity_plugin", args)


def run_oracle(ours: dict, files: list[str], workdir: Path, args: argparse.Namespace) -> dict:
    """Runs the cases of a deltatune run that are not out of scope with the real peft."""
    keep = [k for k, v in report.cases(ours).items() if v["status"] != "out_of_scope"]
    (workdir / "keep.json").write_text(json.dumps(keep), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(workdir / "oracle"), PARITY_KEEP=str(workdir / "keep.json"), HF_HUB_OFFLINE="1")
    ran = {report.file_of(k) for k in keep}
    return run_all([f for f in files if f in ran], workdir, env, "_parity_oracle", args)


def write_outputs(ours: dict, theirs: dict | None, args: argparse.Namespace) -> None:
    print(report.table_markdown(report.per_file(ours, theirs), oracle=theirs is not None))
    if args.failures_md:
        groups = report.failure_groups(ours, theirs)
        title = "deltatune's failing in-scope cases of PEFT's tests, by reason"
        args.failures_md.write_text(report.failures_markdown(groups, title), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peft_tests", type=Path, nargs="?", help="folder holding PEFT's test files")
    parser.add_argument("--peft-git", type=Path, help="a clone of huggingface/peft to take the files from")
    parser.add_argument("--rev", default="HEAD", help="the peft revision for --peft-git (default: HEAD)")
    parser.add_argument("--files", nargs="+", help=f"test files to run (default: those of {TEST_FILES})")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-case results here")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per test file (default: 3600)")
    parser.add_argument("--jobs", type=int, default=1, help="test files run at once (default: 1)")
    parser.add_argument(
        "--oracle", type=Path, help="run this deltatune results JSON's cases with the real peft"
    )
    parser.add_argument("--report", type=Path, nargs=2, metavar=("OURS", "PEFT"), help="only print the table")
    parser.add_argument("--failures-md", type=Path, help="write deltatune's failures, grouped by reason")
    args, args.pytest_args = parser.parse_known_args(argv)
    if args.report:
        write_outputs(report.load(args.report[0]), report.load(args.report[1]), args)
        return 0
    if args.peft_git is None and args.peft_tests is None:
        parser.error("give PEFT_TESTS, --peft-git, or --report")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peft-parity-"))
    _, files = build_workdir(args, workdir)
    if args.oracle is not None:
        ours = report.load(args.oracle)
        theirs = run_oracle(ours, files, workdir, args)
        if args.json:
            args.json.write_text(json.dumps(theirs, indent=1, sort_keys=True), encoding="utf-8")
        write_outputs(ours, theirs, args)
        return 0
    ours = run_deltatune(files, workdir, args)
    if args.json:
        args.json.write_text(json.dumps(ours, indent=1, sort_keys=True), encoding="utf-8")
    write_outputs(ours, None, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
