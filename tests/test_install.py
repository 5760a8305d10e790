"""The library apart from the application (issue 18, item 6): ``pip install deltatune`` needs none of the
``cli`` extra (Pillow, datasets, matplotlib, rich; datasets brings pyarrow and pandas), an import contract
keeps it so, and the ``deltatune`` command without the extra says in one line what to install."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deltatune.cli import CLI_EXTRA_MODULES

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
APPLICATION = {"cli", "tasks", "vision"}  # the packages that come with the cli extra
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
#: Makes the cli extra's packages look uninstalled (``import rich`` raises ModuleNotFoundError).
WITHOUT_EXTRA = "import sys\nfor name in {names!r}: sys.modules[name] = None\n"


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=300,
    )


def _contract() -> dict[str, list[str]]:
    return next(
        c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if "application's dependencies" in c["name"]
    )


def test_the_core_contract_covers_every_core_module() -> None:
    package = ROOT / "src" / "deltatune"
    core = {f"deltatune.{p.stem}" for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    core |= {f"deltatune.{p.name}" for p in package.iterdir() if (p / "__init__.py").is_file()}
    core -= {f"deltatune.{name}" for name in APPLICATION}
    contract = _contract()
    assert set(contract["source_modules"]) == core
    assert {"matplotlib", "rich", "datasets", "PIL"} <= set(contract["forbidden_modules"])


def test_the_core_install_needs_none_of_the_cli_extra() -> None:
    extra = {
        r.split(">")[0].split("=")[0].lower() for r in PYPROJECT["project"]["optional-dependencies"]["cli"]
    }
    assert extra == {"pillow", "datasets", "matplotlib", "rich", "torchvision"}
    core = {r.split(">")[0].split("=")[0].split("<")[0].lower() for r in PYPROJECT["project"]["dependencies"]}
    assert not core & extra


def test_the_library_imports_and_trains_without_the_cli_extra() -> None:
    code = WITHOUT_EXTRA.format(names=CLI_EXTRA_MODULES) + textwrap.dedent(
        """
        import torch
        from deltatune import LoraConfig, get_peft_model
        from deltatune.train import DeltaTrainer, TrainingArguments

        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["0"]))
        peft_model(torch.randn(2, 4)).sum().backward()
        loaded = [m for m in ("PIL", "datasets", "matplotlib", "rich", "pyarrow", "pandas") if sys.modules.get(m)]
        print("LOADED=" + ",".join(loaded))
        """
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED=\n" in done.stdout


@pytest.mark.parametrize("missing", ["rich", "PIL"])
def test_the_command_without_the_extra_names_it_in_one_line(missing: str, tmp_path: Path) -> None:
    code = WITHOUT_EXTRA.format(names=(missing,)) + textwrap.dedent(
        """
        from deltatune.cli import main
        raise SystemExit(main(["train", "--max_steps", "1", "--output_dir", sys.argv[1]]))
        """
    )
    done = _run(code, str(tmp_path / "out"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-3000:]
    assert lines == [
        f"deltatune: error: the deltatune command needs the packages of the cli extra ({missing} is not "
        'installed): pip install "deltatune[cli]"'
    ]


def test_ci_runs_the_readme_test_command_exactly() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.endswith("&& python -m pytest -q"))
    assert '".[cli,test]"' in command
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip().splitlines()[-1] == command
