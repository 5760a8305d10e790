"""Checks made before anything is loaded: the model and dataset arguments (a missing folder, an invalid or
unreachable hub id), whether the Hugging Face Hub can be reached at all (found out once), ``--report_to``
integrations that are not installed, and counts that must be positive.

Each failure is a :class:`~deltatune.cli.run_parser.CommandError` naming the argument as the user typed
it, its value, and what was tried, within seconds: the Hub is asked once with a short connection timeout
instead of letting every library retry for a minute.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .run_parser import CommandError

logger = logging.getLogger(__name__)

__all__ = [
    "HUB_TIMEOUT_S",
    "PositiveInt",
    "check_dataset_source",
    "check_model_source",
    "check_output_outside",
    "check_report_to",
    "check_writable",
    "hub_status",
    "positive_int",
    "use_offline_mode",
]

#: Seconds to wait for a TCP connection to the Hub before calling it unreachable.
HUB_TIMEOUT_S = 3.0
#: ``--report_to`` integration → the package to install for it.
REPORT_TO_PACKAGES = {
    "azure_ml": "azureml-core",
    "comet_ml": "comet-ml",
    "mlflow": "mlflow",
    "neptune": "neptune",
    "tensorboard": "tensorboard",
    "trackio": "trackio",
    "wandb": "wandb",
    "codecarbon": "codecarbon",
    "clearml": "clearml",
    "dagshub": "dagshub",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "kubeflow": "kubeflow-training",
}


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class PositiveInt(int):
    """A whole number of at least 1: the type of dataclass fields that become such options (``argparse``
    calls it on the text, and reports its :class:`argparse.ArgumentTypeError` in one line)."""

    def __new__(cls, value: str | int) -> PositiveInt:
        return super().__new__(cls, positive_int(str(value)))


def check_report_to(report_to: Any) -> None:
    """Refuses a ``--report_to`` integration transformers does not know, or whose package is missing.

    Raises:
        CommandError: naming the integration and the ``pip install`` that fixes it.
    """
    import transformers.integrations.integration_utils as integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    known = list(integrations.INTEGRATION_TO_CALLBACK)
    available = set(integrations.get_available_reporting_integrations())
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise CommandError(
                f"--report_to {name!r} is not an integration transformers knows; {hint}choose from none, all, {', '.join(known)}"
            )
        if name in REPORT_TO_PACKAGES and name not in available:
            raise CommandError(
                f"--report_to {name}: the {name} integration needs a package that is not installed; "
                f"run `pip install {REPORT_TO_PACKAGES[name]}` or drop --report_to {name}"
            )


# ---- the Hub ----------------------------------------------------------------------------------------
def hub_status() -> tuple[bool, str]:
    """(whether the Hub can be reached, what was tried): ``HF_HUB_OFFLINE`` first, then one HTTP request to
    the Hub's endpoint with a :data:`HUB_TIMEOUT_S` timeout, made once per process and endpoint (any HTTP
    answer counts as reachable; a failed name lookup, a refused or silent connection does not)."""
    from huggingface_hub import constants

    if _switched_offline:
        return False, _switched_offline[0]
    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    return _probe(constants.ENDPOINT)


@functools.lru_cache(maxsize=4)
def _probe(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return True, f"{url} answered"
    except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors
        reason = getattr(err, "reason", None) or err
        if isinstance(reason, TimeoutError | socket.timeout) or "timed out" in str(reason):
            reason = "timed out"
        return False, f"{url} could not be reached: {reason} ({HUB_TIMEOUT_S:g} s timeout)"
    return True, f"{url} answered"


#: Why this process switched to offline mode (see :func:`use_offline_mode`); empty while online.
_switched_offline: list[str] = []


def use_offline_mode(reason: str) -> None:
    """Switches huggingface_hub, transformers and datasets to their cache only (no request, no retry), as
    ``HF_HUB_OFFLINE=1`` does at start-up; ``reason`` is what :func:`hub_status` reports from then on."""
    import sys

    from huggingface_hub import constants

    _switched_offline[:] = [reason]
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
        datasets_config.HF_DATASETS_OFFLINE = True  # type: ignore[attr-defined]


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~", "\\")) or value.count("/") > 1 or "\\" in value or ":" in value


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _offline_note(tried: str) -> str:
    return f"the Hugging Face Hub is not reachable ({tried})"


def check_model_source(value: str, flag: str | None = "--model") -> None:
    """Checks that ``value`` names a model that can be loaded, by reading its config (one small file).

    A missing folder, an invalid hub id, an id that is neither cached nor reachable, or a folder without a
    ``config.json`` fails here, in seconds, naming ``flag``. A hub id that cannot be fetched names the
    bundled backbone (``--model deltatune/vit-glyphs-32``) as the choice that works offline. When the Hub
    cannot be reached but the model is in the local cache, everything switches to offline mode (see
    :func:`use_offline_mode`).

    Args:
        value: The model: a folder, a hub id or the bundled backbone's id.
        flag: The option as the user typed it; None when ``value`` is the guide recipe's default model (the
            user gave no ``--model``).

    Raises:
        CommandError: naming the flag, the value and what was tried.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers import AutoConfig

    from ..vision import OFFLINE_BACKBONE_ID, is_bundled_backbone, resolve_model_path

    path = Path(value).expanduser()
    bundled = is_bundled_backbone(value)
    tried = f"{flag} {value!r}: " if flag else f"the default model {value!r} (no --model given): "
    if path.is_file():
        raise CommandError(f"{tried}is a file; pass a model directory (with config.json) or a hub id")
    if not path.is_dir() and not bundled:
        if _looks_like_path(value):
            raise CommandError(
                f"{tried}no such directory; pass a model directory (with config.json) or a hub id"
            )
        try:
            validate_repo_id(value)
        except HFValidationError as err:
            raise CommandError(
                f"{tried}not a local directory, and not a valid hub id ({_first_line(err)}); hub ids look "
                "like 'google/vit-base-patch16-224-in21k'"
            ) from None
        reachable, status = hub_status()
        if not reachable:
            use_offline_mode(status)
    try:
        AutoConfig.from_pretrained(resolve_model_path(value))
    except Exception as err:
        if path.is_dir() or bundled:
            raise CommandError(f"{tried}cannot read its config.json ({_first_line(err)})") from None
        reachable, status = hub_status()
        if not reachable:
            raise CommandError(
                f"{tried}not a local directory, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and "
                f"{_offline_note(status)}; offline, pass the bundled backbone (--model {OFFLINE_BACKBONE_ID}) "
                "or a local model directory, or run where the Hub is reachable"
            ) from None
        raise CommandError(f"{tried}{_first_line(err)}") from None


def _dataset_cached(repo_id: str) -> bool:
    from huggingface_hub import constants

    roots = [Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"]
    try:
        import datasets.config

        base = Path(datasets.config.HF_DATASETS_CACHE)
        roots += [base / repo_id.replace("/", "___"), base / repo_id.rsplit("/", 1)[-1]]
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    return any(root.is_dir() for root in roots)


def check_dataset_source(value: str, flag: str = "--dataset") -> None:
    """Checks a dataset argument before anything is loaded: a folder must exist; a hub id needs the Hub or
    the local cache (then offline mode is switched on, see :func:`use_offline_mode`).

    Raises:
        CommandError: naming the flag, the value and what was tried.
    """
    from huggingface_hub import constants

    from ..vision import is_offline_default

    path = Path(value).expanduser()
    if path.exists() or is_offline_default(value):
        return
    tried = f"{flag} {value!r}: "
    if _looks_like_path(value):
        raise CommandError(
            f"{tried}no such directory; pass an image folder (one subfolder per class) or a hub id"
        )
    reachable, status = hub_status()
    if reachable:
        return
    if _dataset_cached(value):
        use_offline_mode(status)
        return
    raise CommandError(
        f"{tried}not a local folder, not in the Hugging Face caches ({constants.HF_HUB_CACHE}), and "
        f"{_offline_note(status)}; pass an image folder (one subfolder per class), 'offline-default' (the "
        "bundled digits), or run where the Hub is reachable"
    )


def check_folder(value: str | None, flag: str) -> None:
    """Refuses a ``--train_dir``/``--validation_dir`` that is not a directory."""
    if value is not None and not Path(value).expanduser().is_dir():
        raise CommandError(
            f"{flag} {value!r}: no such directory; pass an image folder (one subfolder per class)"
        )


def check_output_outside(output_dir: str, folders: list[tuple[str, str | None]]) -> None:
    """Refuses an ``--output_dir`` that is, or is inside, an image folder of the run (symlinks and relative
    paths resolved): the run's PNGs would become a new class of that dataset on the next run.

    Args:
        output_dir: The run's output folder (it may not exist yet).
        folders: (flag as typed, value) of the data folders; values that are not local folders are skipped.

    Raises:
        CommandError: naming both paths.
    """
    out = os.path.realpath(os.path.expanduser(output_dir))
    for flag, value in folders:
        if value is None or not Path(value).expanduser().is_dir():
            continue
        data = os.path.realpath(os.path.expanduser(value))
        if out == data or out.startswith(data.rstrip(os.sep) + os.sep):
            raise CommandError(
                f"--output_dir {output_dir!r} ({out}) is inside {flag} {value!r} ({data}): the run's files would "
                "become images of that dataset; choose an --output_dir outside the image folders"
            )


def check_writable(path: str, flag: str, beside: bool = False) -> None:
    """Refuses, before any work, an output folder that cannot be written (a read-only filesystem, no
    permission, a file in the way): a test file is created in it (``beside``: in its parent folder), or in
    the nearest existing parent when that does not exist yet, and removed.

    Raises:
        OSError: naming ``flag`` and ``path`` (never the test file) with the system's reason.
    """
    import tempfile

    folder = os.path.abspath(path)
    folder = os.path.dirname(folder) if beside else folder
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".deltatune-write-test-", dir=folder)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), f"{flag} {path}") from None
    os.close(fd)
    os.unlink(probe)
