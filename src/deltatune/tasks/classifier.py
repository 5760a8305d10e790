"""The base image classifier of a run: loaded with a fresh head sized for the dataset's labels.

transformers reports the head it re-initialises with a multi-line LOAD REPORT table; for that expected
case (and only that) :func:`build_base_model` logs one line instead.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from collections.abc import Sequence
from typing import Any

import transformers
from torch import nn

from .._loading import MODEL_BUILD_LOCK

logger = logging.getLogger(__name__)

__all__ = [
    "HEAD_NAMES",
    "build_base_model",
    "check_new_heads_saved",
    "find_head",
    "new_heads",
    "portable_model_name",
]

HEAD_NAMES = ("classifier", "head", "fc", "score")

#: model → the heads :func:`build_base_model` initialised afresh in it (see :func:`new_heads`).
_NEW_HEADS: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def new_heads(model: nn.Module) -> tuple[str, ...]:
    """The heads of ``model`` that :func:`build_base_model` initialised afresh (not in the checkpoint, or of
    another size; the head of a random backbone): random weights that only a saved copy can reproduce."""
    return _NEW_HEADS.get(model, ())


def check_new_heads_saved(model: nn.Module, heads: Sequence[str], num_labels: int, model_id: str) -> None:
    """Refuses an adapted ``model`` that leaves a new head (:func:`new_heads`) out of ``modules_to_save``: that
    head would stay random, frozen and unsaved, so no loading code (peft's or deltatune's) could give the run's
    predictions. A head the checkpoint already holds at the right size may stay frozen (it loads as it was).

    Raises:
        ValueError: naming the head and how to keep it.
    """
    from ..modules_to_save import ModulesToSaveWrapper

    kept = ["." + name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    for head in heads:
        parts = head.split(".")
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]  # the head or a module holding it
        if not any(name.endswith("." + prefix) for name in kept for prefix in prefixes):
            raise ValueError(
                f"the {num_labels}-class head {head!r} is newly initialised (random, not loaded from "
                f"{model_id!r}) and not in --modules_to_save: it would stay random, untrained and unsaved, so "
                f"the adapter could not be loaded to give this run's predictions; keep it (--modules_to_save "
                f"{head}, the default when the flag is not given)"
            )


def find_head(model: nn.Module, num_labels: int) -> str | None:
    """Name of the classification head (a module called classifier/head/fc/score with num_labels outputs)."""
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        out = getattr(module, "out_features", None)
        if last in HEAD_NAMES and (out is None or out == num_labels):
            return name
    return None


_HUB_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def portable_model_name(name_or_path: str) -> str:
    """The name of a base model to write into files people share (``adapter_config.json``, model cards):
    ``deltatune/vit-glyphs-32`` for the bundled backbone (wherever it is installed), the hub id for a
    folder of the Hugging Face cache (``.../models--org--name/snapshots/<rev>`` → ``org/name``), anything
    else as given (a hub id, or a local folder as the user typed it)."""
    from ..vision import OFFLINE_BACKBONE_ID, is_bundled_backbone

    if is_bundled_backbone(name_or_path):
        return OFFLINE_BACKBONE_ID
    match = _HUB_CACHE_SNAPSHOT.search(str(name_or_path).replace("\\", "/"))
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    return name_or_path


def build_base_model(
    model_id: str,
    id2label: dict[int, str],
    random_backbone: bool = False,
    seed: int = 42,
    *,
    trained_head: bool = False,
    ignore_mismatched_sizes: bool = True,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """The base image classifier with a fresh ``len(id2label)``-way head, and its image processor as the
    evaluation processor (:func:`deltatune.vision.preprocess.evaluation_processor`: the model's size and
    statistics, the guide's resize-shorter-side + centre crop), which a run saves beside its adapter.

    Args:
        model_id: Hub id or local directory; the bundled backbone's id ``deltatune/vit-glyphs-32`` loads
            the installed copy (see :func:`deltatune.vision.resolve_model_path`).
        id2label: Class id → name.
        random_backbone: Build the same architecture with random weights instead of loading them.
        seed: Seed of every random initialisation (the head, or the whole model).
        trained_head: The caller restores a trained head next (loading an adapter), so the fresh head is
            not announced.
        ignore_mismatched_sizes: Re-initialise checkpoint weights whose shape differs (a head for another
            number of classes); False makes such a checkpoint an error, as in transformers.
        trust_remote_code: Let the folder run the Python code it ships (``auto_map``); False is passed to
            transformers explicitly otherwise, so it never asks or runs it.

    Raises:
        OSError: when the model cannot be loaded (the message names it and what to do).
        ValueError: when its processor config asks for something unsafe (see
            :func:`deltatune.vision.limits.check_image_processor`).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    from ..vision import resolve_model_path
    from ..vision.limits import check_image_processor
    from ..vision.preprocess import evaluation_processor

    model_id = resolve_model_path(model_id)
    label2id = {v: k for k, v in id2label.items()}
    kwargs: dict[str, Any] = {"id2label": id2label, "label2id": label2id}  # id2label sets num_labels
    kwargs["trust_remote_code"] = bool(trust_remote_code)
    if len(id2label) < 2:
        raise ValueError(
            f"a classifier needs at least 2 classes, got {len(id2label)} ({list(id2label.values())}); with one "
            "output transformers treats the head as regression"
        )
    transformers.set_seed(seed)
    try:
        processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=bool(trust_remote_code))
    except PermissionError:
        raise
    except (OSError, ValueError, RecursionError) as err:
        raise _load_error("image processor", model_id, err) from err
    check_image_processor(processor, f"{model_id} (preprocessor_config.json)")
    processor = evaluation_processor(processor)  # one preprocessing: what the run evaluates is what it saves
    if random_backbone:
        try:
            config = AutoConfig.from_pretrained(model_id, **kwargs)
        except PermissionError:
            raise
        except (OSError, ValueError, RecursionError) as err:
            raise _load_error("model config", model_id, err) from err
        with MODEL_BUILD_LOCK:
            model = AutoModelForImageClassification.from_config(
                config, trust_remote_code=bool(trust_remote_code)
            )
        head = find_head(model, len(id2label))
        _NEW_HEADS[model] = (head,) if head else ()  # random like the rest of the backbone
    else:
        report = _HeadOnlyLoadReport()
        transformers_logger = logging.getLogger("transformers.modeling_utils")
        transformers_logger.addFilter(report)
        try:
            with MODEL_BUILD_LOCK:
                model = AutoModelForImageClassification.from_pretrained(
                    model_id, ignore_mismatched_sizes=ignore_mismatched_sizes, **kwargs
                )
        except PermissionError:
            raise
        except (OSError, ValueError, RecursionError) as err:
            raise _load_error("model", model_id, err) from err
        except RuntimeError as err:
            if ignore_mismatched_sizes or "ignore_mismatched_sizes" not in str(err):
                raise
            heads = ", ".join(sorted(report.heads)) or "its head"
            raise ValueError(
                f"ignore_mismatched_sizes=False: {model_id!r} has weights of another shape than a "
                f"{len(id2label)}-class classifier needs ({heads}); pass --ignore_mismatched_sizes true (the "
                "default) to start that head afresh"
            ) from None
        finally:
            transformers_logger.removeFilter(report)
        _NEW_HEADS[model] = tuple(sorted(report.heads))
        if report.heads and not trained_head:
            unused = f"; unused checkpoint weights: {', '.join(report.unused)}" if report.unused else ""
            logger.info(
                "new %d-class head: %s initialised (not in the checkpoint, or of another size)%s",
                len(id2label),
                ", ".join(sorted(report.heads)),
                unused,
            )
    return model, processor


def _load_error(what: str, model_id: str, err: Exception) -> Exception:
    """One clear error for a base model (or its processor/config) that transformers could not load."""
    reason = " ".join(str(err).split())
    if "trust_remote_code" in reason or "custom code" in reason:
        return ValueError(
            f"{model_id!r} ships its own Python code (auto_map) to build its {what}; deltatune does not run it "
            "unless you pass --trust_remote_code (only for folders you trust)"
        )
    if isinstance(err, ValueError | RecursionError) and not isinstance(err, OSError):
        return ValueError(f"cannot load the {what} of {model_id!r}: {reason}")
    if os.path.isdir(os.path.expanduser(model_id)) and not isinstance(err, PermissionError):
        # a local folder that is not a model: the user's input (exit 2), not the network or the disk
        return ValueError(
            f"cannot load the {what} {model_id!r}: {reason[:600]}; that folder is not a model transformers can "
            "load (no config.json / preprocessor_config.json); pass a model folder or a hub id"
        )
    hint = (
        "the folder does not exist (was it moved, or the adapter copied from another machine?); pass --model"
        if model_id.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(model_id))
        else "check the path or hub id; a hub id needs the network (and HF_HUB_OFFLINE unset) or a local copy"
    )
    return OSError(f"cannot load the {what} {model_id!r}: {reason[:600]}; {hint}")


class _HeadOnlyLoadReport(logging.Filter):
    """Drops transformers' multi-line LOAD REPORT when every weight the model lacks (MISSING or MISMATCH)
    belongs to a classification head -- the expected re-initialisation of a fine-tuning run -- and remembers
    the heads and the checkpoint's UNEXPECTED (unused) weights, e.g. a base model's pooler. A report with
    any other missing or mismatched key passes unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: set[str] = set()
        self.unused: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # the report may be coloured
        if "LOAD REPORT" not in message:
            return True
        rows = [
            [cell.strip() for cell in line.split("|")[:2]]
            for line in message.splitlines()
            if "|" in line and not line.lstrip().startswith(("Key", "-"))
        ]
        needed = {key.rsplit(".", 1)[0] for key, status in rows if status != "UNEXPECTED"}
        if not needed or not all(module.rsplit(".", 1)[-1] in HEAD_NAMES for module in needed):
            return True
        self.heads |= needed
        self.unused += sorted({key.rsplit(".", 1)[0] for key, status in rows if status == "UNEXPECTED"})
        return False
