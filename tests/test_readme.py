"""The README's console, help and code blocks of issue 12 are true: each runs in a test as shown (the
console and help blocks are compared with a real run's output)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_vit_dir, write_image_folder

from deltatune.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
ROW = re.compile(
    r"^\s+(\d+)/(\d+)\s+\d+\.\d{4}\s+\d+\.\d{4}\s+\d\.\d{4}\s+\d\.\d{4}\s+\d+\s+\d+:\d\d\s+\d+:\d\d$"
)


def readme_block(name: str) -> str:
    """The fenced block right after ``<!-- README-TEST: name -->`` in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- README-TEST: {re.escape(name)} -->\n```\w*\n(.*?)```", text, re.S)
    assert match, f"README.md has no block {name!r}"
    return match.group(1)


def _env(**extra: str) -> dict[str, str]:
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PYTHONPATH": SRC, "PATH": path, **extra}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A shortened ``deltatune train`` (the offline default) in a fresh folder: (folder, stdout, stderr)."""
    work = tmp_path_factory.mktemp("readme")
    argv = ["--max_train_samples", "64", "--max_eval_samples", "64", "--num_train_epochs", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "deltatune", "train", *argv],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return work, done.stdout, done.stderr


def test_readme_help_is_the_first_screen_of_the_real_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    real = capsys.readouterr().out.splitlines()
    shown = readme_block("help").splitlines()
    assert len(shown) >= 25 and real[: len(shown)] == shown


@pytest.mark.slow
def test_readme_console_matches_a_real_run(default_run: tuple[Path, str, str]) -> None:
    _, stdout, stderr = default_run
    shown = readme_block("console").splitlines()
    assert shown[0] == "$ deltatune train"
    out, err = stdout.splitlines(), stderr.splitlines()
    assert shown[1] == out[0]  # the run's summary line
    for line in (s for s in shown if s.startswith("[deltatune] ")):
        words = " ".join(line.split()[:3])  # the numbers differ in the shortened run
        assert any(e.startswith(words) for e in err), line
    starts = {" ".join(s.split()[:3]) for s in shown if s.startswith("[deltatune] ")}
    unshown = [
        e
        for e in err
        if e.startswith("[deltatune] ")
        and " ".join(e.split()[:3]) not in starts
        and "so it is fitted to" not in e  # the shortened run's 64 images fit the recipe's batch to them
    ]
    assert not unshown, f"the console prints lines the README does not show: {unshown}"
    header = next(i for i, line in enumerate(shown) if line.lstrip().startswith("epoch "))
    assert shown[header] == out[1]
    rows = [ROW.match(line) for line in shown if ROW.match(line)]
    assert [(m.group(1), m.group(2)) for m in rows] == [("1", "12"), ("2", "12"), ("11", "12"), ("12", "12")]
    assert [m.group(1) for m in map(ROW.match, out) if m] == ["1", "2"]
    best = next(line for line in shown if "the best adapter is" in line)
    pattern = r"\[deltatune\] the best adapter is vit-glyphs-32-lora/checkpoint-\d+ \(eval loss \d\.\d{4}\); loading it"
    assert re.fullmatch(pattern, best) and any(re.fullmatch(pattern, e) for e in err)
    table = shown.index("lora on offline-default")
    assert (
        out[out.index("lora on offline-default") + 1 : out.index("lora on offline-default") + 4]
        == shown[table + 1 : table + 4]
    )
    assert shown[-2:] == out[-2:]  # the files written and where the report is


@pytest.mark.slow
def test_readme_load_code_runs_as_shown(default_run: tuple[Path, str, str]) -> None:
    work, _, _ = default_run
    code = readme_block("load") + "\nprint(type(model).__name__, len(labels['id2label']))\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=work,
        env=_env(HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["PeftModel", "10"]


@pytest.mark.slow
def test_readme_example_script_command_runs_as_shown(tmp_path: Path) -> None:
    """The command as printed, with the guide's model id served from a local Hugging Face cache (offline)."""
    repo = tmp_path / "cache" / "models--google--vit-base-patch16-224-in21k"
    snapshot = repo / "snapshots" / ("0" * 40)
    save_tiny_vit_dir(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    write_image_folder(tmp_path / "pets" / "train", per_class=4, seed=0)
    write_image_folder(tmp_path / "pets" / "val", per_class=2, seed=1)
    env = _env(HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        ["bash", "-c", readme_block("example-script")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "vit-pets-lora"
    assert {"all_results.json", "train_results.json", "eval_results.json", "trainer_state.json"} <= set(
        os.listdir(out)
    )
    assert (
        '"base_model_name_or_path": "google/vit-base-patch16-224-in21k"'
        in (out / "adapter_config.json").read_text()
    )
