"""CPU time and peak memory of ``deltatune ... --help`` against ``python -c "import torch"``, side by side.

Issue 16 item 9: the help of every command must cost well under half of ``import torch``. Each command
runs in its own process, the commands interleaved round by round; a process's CPU time (user + system)
and peak RSS come from ``os.wait4``, so other load on the machine changes them far less than wall time.

Run from the repository root::

    python -m benchmarks.cli_help                   # 5 rounds
    python -m benchmarks.cli_help --rounds 9
    python -m benchmarks.cli_help --stub-registry   # the help path apart from discovering the methods
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
HELPS = (
    ("--help",),
    ("train", "--help"),
    ("compare", "--help"),
    ("evaluate", "--help"),
    ("predict", "--help"),
    ("merge", "--help"),
)
_STUB_REGISTRY = """
import json, sys, types
package = types.ModuleType("deltatune")
package.__path__ = [sys.argv[2] + "/deltatune"]
sys.modules["deltatune"] = package
import deltatune.cli.run_options as options

class Config:
    DROPOUT_FIELD, ALPHA_FIELD, FLAG_ALIASES, RECIPE_DEFAULTS = "lora_dropout", "lora_alpha", {}, {}

    @classmethod
    def recipe_defaults(cls, planned, given):
        return {}

spec = types.SimpleNamespace(config_cls=Config, display_name="LoRA")
options.method_specs = lambda: {"lora": spec, "dora": spec}
"""
_RUN_MAIN = """
import json, sys
from deltatune.cli import main
try:
    main(json.loads(sys.argv[1]))
except SystemExit as done:
    assert done.code == 0, done.code
"""


def help_script(stub: bool, after: str = "") -> str:
    """Python source run as ``python -c SOURCE ARGV_JSON SRC_DIR``: ``deltatune.cli.main(argv)``, failing
    unless it exits with status 0, then ``after``.

    Args:
        stub: Enter the ``deltatune`` package (from ``SRC_DIR``) without its ``__init__`` and replace the
            registry by two fake methods: what the help costs apart from discovering the methods.
        after: Source run once ``main`` is done (e.g. a report of the modules it loaded).
    """
    return (_STUB_REGISTRY if stub else "") + _RUN_MAIN + after


def measure(argv: list[str]) -> tuple[float, float]:
    """(CPU seconds, peak RSS in MiB) of one process running ``argv``."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{argv} exited with {process.returncode}")
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main(args: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stub-registry", action="store_true", help="replace method discovery by a stub")
    options = parser.parse_args(args)
    commands = {"python -c 'import torch'": [sys.executable, "-c", "import torch"]}
    for help_argv in HELPS:
        name = "deltatune " + " ".join(help_argv)
        if options.stub_registry:
            commands[name] = [sys.executable, "-c", help_script(stub=True), json.dumps(list(help_argv)), SRC]
        else:
            commands[name] = [sys.executable, "-m", "deltatune", *help_argv]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(options.rounds):  # interleaved: each round runs every command once
        for name, argv in commands.items():
            samples[name].append(measure(argv))
    torch_cpu = statistics.median(cpu for cpu, _ in samples["python -c 'import torch'"])
    results: dict[str, dict[str, float]] = {}
    print(f"{'command':32s} {'CPU s (median)':>15s} {'x import torch':>15s} {'peak RSS MiB':>13s}")
    for name, runs in samples.items():
        cpu = statistics.median(c for c, _ in runs)
        rss = statistics.median(r for _, r in runs)
        results[name] = {"cpu_s": cpu, "ratio_to_import_torch": cpu / torch_cpu, "peak_rss_mib": rss}
        print(f"{name:32s} {cpu:15.2f} {cpu / torch_cpu:15.2f} {rss:13.0f}")
    if options.stub_registry:
        print("(method discovery stubbed: the help path apart from the registry)")
    return results


if __name__ == "__main__":
    main()
