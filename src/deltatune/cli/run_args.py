"""Argument parsing for ``deltatune train`` and ``deltatune compare``: our options, the generated adapter
options and every ``TrainingArguments`` field (through ``HfArgumentParser``) in one parser, with transformers'
``run_image_classification.py`` spellings as aliases. The help and the one-line errors: :mod:`.run_parser`;
the checks made before anything loads: :mod:`.checks`."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import shlex
from typing import Any

from .._defaults import GUIDE_DATASET, GUIDE_MODEL
from ..tasks.image_classification import RunSpec
from ..train.arguments import TrainingArguments, map_legacy_kwargs
from ..train.precision import check_request
from .checks import (
    check_dataset_source,
    check_folder,
    check_model_source,
    check_output_outside,
    check_report_to,
    hub_status,
)
from .flags import adapter_kwargs_for, closest_flags
from .init_options import check_run_options, optimizer_kwargs, optimizer_methods
from .run_options import build_run_parser, recipe_defaults
from .run_parser import CommandError, help_method
from .run_values import check_training_values

#: Spellings people bring from other tools → the option they mean (difflib finds mistypings, not these).
SPELLINGS = {
    "--lr": "--learning_rate",
    "--batch_size": "--per_device_train_batch_size",
    "--train_batch_size": "--per_device_train_batch_size",
    "--bs": "--per_device_train_batch_size",
    "--eval_batch_size": "--per_device_eval_batch_size",
    "--epochs": "--num_train_epochs",
    "--num_epochs": "--num_train_epochs",
    "--steps": "--max_steps",
    "--output": "--output_dir",
    "--out": "--output_dir",
    "--threads": "--num_threads",
}

logger = logging.getLogger(__name__)

__all__ = [
    "CommandError",
    "ParsedRun",
    "build_run_parser",
    "check_hub_access",
    "check_sources",
    "parse_run",
    "run_spec",
    "typed_command",
]


@dataclasses.dataclass
class ParsedRun:
    """What ``deltatune train``/``compare`` parsed.

    Attributes:
        options: deltatune's own options (``method``, data options, ...).
        training_args: The ``TrainingArguments`` of the run (recipe defaults under the user's flags).
        recipe: ``"offline"`` or ``"guide"``.
        model: The base model as the user named it (the bundled backbone by its id
            ``deltatune/vit-glyphs-32``); loaders resolve it.
        dataset: Dataset id, image folder or ``"offline-default"``.
        push_to_hub: Upload the adapter when done.
        command: The command line as the user typed it (``deltatune train ...``), for the model card.
        batch_from_recipe: The batch size and accumulation are the recipe's, not the user's (``run_training``
            may fit them to small data).
    """

    options: argparse.Namespace
    training_args: TrainingArguments
    recipe: str
    model: str
    dataset: str
    push_to_hub: bool
    command: str = ""
    batch_from_recipe: bool = False


def _given(argv: list[str], *flags: str) -> str | None:
    """The spelling of the first of ``flags`` present in ``argv`` (``--flag`` or ``--flag=value``), if any."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in flags:
            return name
    return None


def typed_command(command: str, argv: list[str]) -> str:
    """The command line as the user typed it, for files people share: ``deltatune <command> <args>``
    (never the path of the ``deltatune`` script or of the Python interpreter)."""
    return shlex.join(["deltatune", command, *argv])


def _do_flags(training_kwargs: dict[str, Any]) -> tuple[bool, bool]:
    """``--do_train``/``--do_eval`` as transformers' example scripts read them, except that both default to
    on (a run without either flag trains and evaluates); ``--do_eval false`` turns every evaluation off.

    Raises:
        CommandError: when both are false.
    """
    do_train = training_kwargs.get("do_train")
    do_eval = training_kwargs.get("do_eval")
    do_train = True if do_train is None else bool(do_train)
    do_eval = True if do_eval is None else bool(do_eval)
    if not do_train and not do_eval:
        raise CommandError("--do_train false and --do_eval false leave nothing to do; drop one of them")
    if not do_eval:
        training_kwargs.update(eval_strategy="no", load_best_model_at_end=False)
        training_kwargs.pop("evaluation_strategy", None)
    training_kwargs.update(do_train=do_train, do_eval=do_eval)
    return do_train, do_eval


def _best_model_follows_strategies(training_kwargs: dict[str, Any], argv: list[str]) -> None:
    """``load_best_model_at_end`` (on in both recipes) needs the save and eval strategies to match (or
    ``--save_strategy best``): when the user's strategies do not, the recipe's default gives way with a
    notice; a ``--load_best_model_at_end`` the user typed is refused naming both flags.

    Raises:
        CommandError: for an explicit ``--load_best_model_at_end`` with strategies it cannot work with.
    """
    if not training_kwargs.get("load_best_model_at_end"):
        return
    save = str(getattr(training_kwargs.get("save_strategy"), "value", training_kwargs.get("save_strategy")))
    evaluation = str(
        getattr(training_kwargs.get("eval_strategy"), "value", training_kwargs.get("eval_strategy"))
    )
    if save == "best" or save == evaluation:
        return
    typed = _given(argv, "--save_strategy", "--save-strategy")
    flag = f"--save_strategy {save}" if typed or evaluation != "no" else f"--eval_strategy {evaluation}"
    if typed is None and _given(argv, "--eval_strategy", "--eval-strategy", "--evaluation_strategy"):
        flag = f"--eval_strategy {evaluation}"
    if _given(argv, "--load_best_model_at_end", "--load-best-model-at-end"):
        raise CommandError(
            f"--load_best_model_at_end needs a checkpoint saved at every evaluation, but {flag} leaves save: {save}, "
            f"eval: {evaluation}; pass matching --save_strategy and --eval_strategy, --save_strategy best, or "
            "drop --load_best_model_at_end"
        )
    training_kwargs["load_best_model_at_end"] = False
    logger.info(
        "%s: load_best_model_at_end (the recipe's default) is turned off, as it needs a checkpoint saved at "
        "every evaluation (save: %s, eval: %s); the final adapter is the last step's",
        flag,
        save,
        evaluation,
    )


def _as_parsed(action: argparse.Action, values: list[str]) -> list[object] | None:
    """The values as the option's type reads them (``--lora_alpha 16`` and ``--alpha 16.0`` agree); None where
    the type refuses one (argparse then reports that value itself)."""
    convert = action.type if callable(action.type) else None
    if convert is None:
        return list(values)
    try:
        return [convert(value) for value in values]
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        return None


def _refuse_two_spellings(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Refuses two spellings of one option (``--model`` and ``--model_name_or_path``, ``--r`` and ``--rank``)
    given different values: argparse would keep the last one silently.

    Raises:
        CommandError: naming both spellings and their values.
    """
    seen: dict[str, tuple[str, list[str]]] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, _, inline = arg.partition("=")
        action = parser._option_string_actions.get(name)
        if action is None or action.nargs == 0:
            continue
        values = (
            [inline] if inline else list(itertools.takewhile(lambda a: not a.startswith("--"), argv[i + 1 :]))
        )
        dest = action.dest
        if dest in seen and seen[dest][0].replace("-", "_") != name.replace("-", "_"):
            first, earlier = seen[dest]
            before, now = _as_parsed(action, earlier), _as_parsed(action, values)
            if before is None or now is None or before == now:
                continue
            raise CommandError(
                f"{first} {' '.join(earlier)} and {name} {' '.join(values)} name the same option with different "
                "values; pass one of them"
            )
        seen.setdefault(dest, (name, values))


def parse_run(command: str, argv: list[str]) -> ParsedRun:
    """Parses ``deltatune train``/``compare`` arguments (nothing is loaded; see :func:`check_sources`).

    Raises:
        CommandError: for unknown flags (with the closest known ones), invalid values or choices, and
            contradictory flags, as one line.
        SystemExit: for --help and --help-all (status 0).
    """
    from ..vision import OFFLINE_BACKBONE_ID, OFFLINE_BACKBONE_NAME, OFFLINE_DEFAULT, is_bundled_backbone

    parser = build_run_parser(command, help_method(argv))
    probe, _ = parser.parse_known_args(argv)
    if probe.train_dir is not None and probe.dataset is not None:
        raise CommandError(
            f"pass either {_given(argv, '--dataset', '--dataset_name')} or --train_dir, not both (both name the "
            "training images)"
        )
    dataset_given = probe.dataset or probe.train_dir
    recipe = probe.recipe or ("offline" if probe.model is None and dataset_given is None else "guide")
    if recipe == "offline":
        model = probe.model or OFFLINE_BACKBONE_ID
        dataset = dataset_given or OFFLINE_DEFAULT
    else:
        model, dataset = probe.model or GUIDE_MODEL, dataset_given or GUIDE_DATASET
    if is_bundled_backbone(model):
        model = OFFLINE_BACKBONE_ID  # the portable name; loaders resolve it to the installed copy
    parser.set_defaults(**recipe_defaults(recipe))
    _refuse_two_spellings(parser, argv)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [s for action in parser._actions for s in action.option_strings]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        meant = SPELLINGS.get(bad.split("=", 1)[0])
        near = [meant] if meant in known else closest_flags(bad, known)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise CommandError(
            f"unknown option {bad!r}{hint} (see `deltatune {command} --help`; `--help-all` lists every "
            "adapter and TrainingArguments option)"
        )
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    options = argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k not in fields})
    if options.validation_dir is not None and _given(argv, "--validation_split", "--validation-split"):
        raise CommandError(
            "--validation_split is unused with --validation_dir (the validation images are that folder); pass "
            "one of them"
        )
    if options.validation_dir is not None and dataset_given is None:
        raise CommandError(
            "--validation_dir needs the training images too: pass --train_dir (or --dataset) DIR"
        )
    if command == "train":  # refuse flags of other methods, and values this method lacks, up front
        check_run_options(
            options.method, adapter_kwargs_for(options.method, options), optimizer_kwargs(options)
        )
    elif optimizer_kwargs(options) and options.loraplus_lr_ratio is None:
        raise CommandError(
            "--loraplus_lr_embedding needs --loraplus_lr_ratio (which turns the loraplus optimiser on)"
        )
    elif options.loraplus_lr_ratio is not None and min(options.loraplus_lr_ratio) <= 0:
        raise CommandError(
            f"--loraplus_lr_ratio must be positive (the paper uses 2 to 16), got {options.loraplus_lr_ratio}"
        )
    training_kwargs = {k: v for k, v in vars(namespace).items() if k in fields}
    _do_flags(training_kwargs)
    check_training_values(training_kwargs, options)
    try:  # fail before any data or model is loaded
        check_request(bool(training_kwargs.get("bf16")), bool(training_kwargs.get("fp16")), options.precision)
    except ValueError as err:
        raise CommandError(str(err)) from err
    check_report_to(training_kwargs.get("report_to"))
    if not training_kwargs.get("output_dir"):
        name = (
            OFFLINE_BACKBONE_NAME
            if model == OFFLINE_BACKBONE_ID
            else os.path.basename(model.rstrip("/")) or "model"
        )
        training_kwargs["output_dir"] = (
            f"{name}-{namespace.method}" if command == "train" else f"{name}-compare"
        )
    if training_kwargs.get("evaluation_strategy") is not None:
        explicit = _given(argv, "--eval_strategy", "--eval-strategy") is not None
        if not explicit:
            training_kwargs.pop("eval_strategy", None)  # a recipe default gives way to the old spelling
        training_kwargs = map_legacy_kwargs(training_kwargs)
    _best_model_follows_strategies(training_kwargs, argv)
    push = bool(training_kwargs.get("push_to_hub"))
    training_kwargs["push_to_hub"] = False  # deltatune uploads the final adapter itself
    try:
        training_args = TrainingArguments(**training_kwargs)
    except ValueError as err:
        raise CommandError(str(err)) from err
    batch_flags = ("per_device_train_batch_size", "gradient_accumulation_steps", "auto_find_batch_size")
    from_recipe = (
        _given(argv, *(f"--{f}" for f in batch_flags), *(f"--{f.replace('_', '-')}" for f in batch_flags))
        is None
    )
    return ParsedRun(
        options, training_args, recipe, model, dataset, push, typed_command(command, argv), from_recipe
    )


def check_sources(parsed: ParsedRun, argv: list[str]) -> None:
    """Checks the model and data arguments before anything is loaded (the model first), naming the flag
    as typed; see :mod:`deltatune.cli.checks`.

    Raises:
        CommandError: for a missing folder, an invalid id, or a hub id that is neither cached nor reachable.
    """
    o = parsed.options
    check_folder(o.train_dir, "--train_dir")
    check_folder(o.validation_dir, "--validation_dir")
    check_model_source(parsed.model, _given(argv, "--model", "--model_name_or_path"))
    if o.train_dir is None:
        check_dataset_source(parsed.dataset, _given(argv, "--dataset", "--dataset_name") or "--dataset")
    data_flag = "--train_dir" if o.train_dir is not None else _given(argv, "--dataset", "--dataset_name")
    folders = [(data_flag or "--dataset", parsed.dataset), ("--validation_dir", o.validation_dir)]
    check_output_outside(str(parsed.training_args.output_dir), folders)


def run_spec(parsed: ParsedRun, method: str | None, strict: bool = True, **overrides: Any) -> RunSpec:
    """The :class:`RunSpec` for ``method`` (None for a baseline) from parsed options."""
    o = parsed.options
    kwargs = adapter_kwargs_for(method, o, strict=strict) if method else {}
    optimizer = optimizer_kwargs(o) if method in optimizer_methods() else {}
    fields = {
        "method": method,
        "model": parsed.model,
        "dataset": parsed.dataset,
        "adapter_kwargs": kwargs,
        "optimizer": optimizer,
        "random_backbone": o.random_backbone,
        "image_column": o.image_column,
        "label_column": o.label_column,
        "validation_split": o.validation_split,
        "max_train_samples": o.max_train_samples,
        "max_eval_samples": o.max_eval_samples,
        "data_pipeline": o.data_pipeline,
        "validation_dir": o.validation_dir,
        "ignore_mismatched_sizes": o.ignore_mismatched_sizes,
    }
    fields.update(overrides)
    return RunSpec(**fields)


def check_hub_access(repo_id: str | None) -> None:
    """Fails fast when ``--push_to_hub`` cannot work: offline mode, no network or no token.

    Raises:
        CommandError: naming what is missing and how to fix it.
    """
    from huggingface_hub import get_token

    hint = "train without --push_to_hub and upload the output_dir later with `hf upload`"
    reachable, status = hub_status()
    if not reachable:
        raise CommandError(
            f"--push_to_hub needs the network, but the Hugging Face Hub is not reachable ({status}); {hint}"
        )
    if get_token() is None:
        raise CommandError(
            "--push_to_hub needs a Hugging Face token: run `huggingface-cli login` or set HF_TOKEN"
        )
    if repo_id is None:
        logger.info("pushing to a repo named after the output directory")
