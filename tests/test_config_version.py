"""The ``peft_version`` a config records: ``deltatune-<version>`` read from ``deltatune.config.__version__``
when the config is made, ``@<commit>`` (or ``@UNKNOWN``) after a development version, and kept as saved when a
config is loaded. The commit comes from the installed distribution's ``direct_url.json``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

import deltatune
from deltatune import IA3Config, LoraConfig, PeftConfig
from deltatune import config as config_module
from deltatune._version import installed_commit_hash, is_dev_version


def test_a_new_config_records_deltatune_and_its_version() -> None:
    assert config_module.__version__ == f"deltatune-{deltatune.__version__}"
    recorded = LoraConfig().peft_version
    assert recorded is not None and recorded.startswith(config_module.__version__)
    if is_dev_version(deltatune.__version__):
        commit = installed_commit_hash("deltatune")
        assert recorded == f"{config_module.__version__}@{commit or 'UNKNOWN'}"
    else:
        assert recorded == config_module.__version__


@pytest.mark.parametrize("version", ["0.10", "deltatune-1.0.0", "1"])
def test_a_release_version_is_recorded_as_is_and_a_loaded_config_keeps_its_own(
    version: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(config_module, "__version__", version)
    config = IA3Config(target_modules=["lin"])
    assert config.peft_version == version
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"] == version
    monkeypatch.setattr(config_module, "__version__", "9.9.9")  # what the running library is now
    assert PeftConfig.from_pretrained(tmp_path).peft_version == version


@pytest.mark.parametrize(("commit", "suffix"), [("abc123", "@abc123"), (None, "@UNKNOWN")])
def test_a_dev_version_gets_the_commit_or_unknown(
    commit: str | None, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def fake_commit(dist_name: str) -> str | None:
        asked.append(dist_name)
        return commit

    monkeypatch.setattr(config_module, "__version__", "deltatune-0.3.0.dev2")
    monkeypatch.setattr(config_module, "_get_commit_hash", fake_commit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoraConfig().peft_version == "deltatune-0.3.0.dev2" + suffix
    assert asked == ["deltatune"]


def test_a_failing_commit_lookup_warns_and_records_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(dist_name: str) -> str | None:
        raise OSError("metadata unreadable")

    monkeypatch.setattr(config_module, "__version__", "0.15.0.dev7")
    monkeypatch.setattr(config_module, "_get_commit_hash", broken)
    with pytest.warns(
        UserWarning, match="error while trying to determine the commit hash.*metadata unreadable"
    ):
        config = LoraConfig()
    assert config.peft_version == "0.15.0.dev7@UNKNOWN"


@pytest.mark.parametrize(
    ("version", "dev"),
    [
        ("0.2.0.dev0", True),
        ("deltatune-0.2.0.dev0", True),
        ("0.2.0", False),
        ("1", False),
        ("0.1.another-one", False),
    ],
)
def test_is_dev_version(version: str, dev: bool) -> None:
    assert is_dev_version(version) is dev


class _Dist:
    def __init__(self, direct_url: dict[str, Any] | None) -> None:
        self.text = None if direct_url is None else json.dumps(direct_url)

    def read_text(self, name: str) -> str | None:
        assert name == "direct_url.json"
        return self.text


@pytest.mark.parametrize(
    ("direct_url", "expected"),
    [
        ({"url": "https://github.com/o/r", "vcs_info": {"vcs": "git", "commit_id": "0123abcd"}}, "0123abcd"),
        ({"url": "file:///src", "dir_info": {"editable": True}}, None),  # editable: no commit recorded
        (None, None),  # installed from an index: no direct_url.json
    ],
)
def test_installed_commit_hash_reads_direct_url(
    direct_url: dict[str, Any] | None, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: _Dist(direct_url))
    installed_commit_hash.cache_clear()
    try:
        assert installed_commit_hash("some-dist") == expected
    finally:
        installed_commit_hash.cache_clear()


def test_installed_commit_hash_of_a_missing_distribution_is_none() -> None:
    assert installed_commit_hash("no-such-distribution-deltatune-test") is None
