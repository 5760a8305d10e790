"""``deltatune merge``/``predict`` on what a user may hand them (the s-tester findings F2, F3, F16, F17, F19,
F20): merging into the base model's own folder is refused, the merged card describes the base actually used,
a corrupt ``metrics.json`` never blocks a merge, empty paths and a closed stdout are one-line errors, and a
PEFT-format adapter without ``labels.json`` works from its saved label maps."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import save_tiny_vit_dir, tiny_trained_run

from deltatune.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (``root/run``) on ``root/model`` and ``root/data``."""
    return Path(tiny_trained_run(tmp_path_factory.mktemp("mergechecks"), per_class=6))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- F2 -----------------------------------------------------------------------------------------
def test_merge_refuses_the_base_model_folder_however_spelled(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = run.parent
    before = snapshot(root / "model")
    (tmp_path / "link").symlink_to(root / "model")
    monkeypatch.chdir(root)
    for output in ("model", "model/", "./model", str(root / "model"), str(tmp_path / "link")):
        assert main(["merge", "--adapter", str(run), "--output", output, "--overwrite"]) == 2, output
        err = capsys.readouterr().err
        assert "base model folder" in err and "another --output" in err, err
        assert len(err.strip().splitlines()) == 1, err
    other = tmp_path / "other"  # --model: its folder is protected too
    save_tiny_vit_dir(other, seed=1)
    argv = ["merge", "--adapter", str(run), "--model", str(other), "--output", str(other), "--overwrite"]
    assert main(argv) == 2 and "base model folder" in capsys.readouterr().err
    assert snapshot(root / "model") == before
