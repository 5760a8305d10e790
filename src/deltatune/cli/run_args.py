"""Argument parsing for ``deltatune train`` and ``deltatune compare``: our options, the generated adapter
options and every ``TrainingArguments`` field (through ``HfArgumentParser``) in one parser and one --help."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
from typing import Any

from transformers import HfArgumentParser

from ..registry import available_methods
from ..tasks.image_classification import GUIDE_DATASET, GUIDE_MODEL, GUIDE_TRAINING_DEFAULTS, RunSpec
from ..train.arguments import TrainingArguments, map_legacy_kwargs
from ..train.precision import PRECISION_CHOICES, check_request
from ..vision.fast import DATA_PIPELINES
from .flags import adapter_kwargs_for, add_adapter_flags, closest_flags

logger = logging.getLogger(__name__)

__all__ = ["CommandError", "ParsedRun", "build_run_parser", "check_hub_access", "parse_run", "run_spec"]


class CommandError(ValueError):
    """A command-line mistake; the CLI prints the message and exits with status 2."""


@dataclasses.dataclass
class ParsedRun:
    """What ``deltatune train``/``compare`` parsed."""

    options: argparse.Namespace
    training_args: TrainingArguments
    recipe: str
    model: str
    dataset: str
    push_to_hub: bool
    #: The batch size and accumulation are the recipe's, not the user's (run_training may fit them to the data).
    batch_from_recipe: bool = False


def build_run_parser(command: str) -> HfArgumentParser:
    """The parser of ``deltatune train`` (``command="train"``) or ``deltatune compare``."""
    parser = HfArgumentParser(
        TrainingArguments,  # type: ignore[arg-type]
        prog=f"deltatune {command}",
        allow_abbrev=False,
        description=(
            "Fine-tune an image classifier with an adapter (the PEFT guide's recipe). With no options: the bundled "
            "offline default (handwritten digits, a small pretrained ViT)."
            if command == "train"
            else "Train several methods and the baselines on the same data and seed; print and save a table."
        ),
        epilog="Every transformers TrainingArguments option is accepted as well (listed above).",
    )
    ours = parser.add_argument_group("deltatune options")
    methods = available_methods()
    if command == "train":
        ours.add_argument("--method", choices=methods, default=methods[0], help="adapter method")
    else:
        ours.add_argument("--methods", nargs="+", choices=methods, default=methods, help="methods to compare")
        ours.add_argument(
            "--baselines",
            nargs="*",
            choices=("linear_probe", "full", "random"),
            default=["linear_probe", "full", "random"],
            help="baselines: linear probe, full fine-tuning, every method on a random backbone",
        )
        ours.add_argument(
            "--full_learning_rate",
            type=float,
            default=None,
            help="learning rate of full fine-tuning; unset: --learning_rate / 10",
        )
    ours.add_argument("--model", default=None, help=f"base model id or directory (guide: {GUIDE_MODEL})")
    ours.add_argument(
        "--dataset",
        default=None,
        help=f"dataset id, image folder or offline-default (guide: {GUIDE_DATASET})",
    )
    ours.add_argument(
        "--recipe",
        choices=("offline", "guide"),
        default=None,
        help="which defaults: offline (bundled data and backbone) or guide; unset: offline without --model/--dataset",
    )
    ours.add_argument("--image_column", default=None, help="image column of a hub dataset (auto-detected)")
    ours.add_argument("--label_column", default=None, help="label column of a hub dataset (auto-detected)")
    ours.add_argument(
        "--validation_split", type=float, default=0.1, help="eval share carved from train if needed"
    )
    ours.add_argument(
        "--max_train_samples", type=int, default=None, help="use at most this many training images"
    )
    ours.add_argument("--max_eval_samples", type=int, default=None, help="use at most this many eval images")
    ours.add_argument("--random_backbone", action="store_true", help="start from random weights (a baseline)")
    ours.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow the Python code a model or processor folder ships (auto_map) to run; off by default",
    )
    ours.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace a different run found in --output_dir"
    )
    ours.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads; unset: 1 for a small model on a CPU",
    )
    ours.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="auto",
        help="auto: bf16 autocast on a CPU with native bfloat16 when the model is big enough to gain, "
        "bf16 (else fp16) on a CUDA GPU, fp32 otherwise; the choice is logged",
    )
    ours.add_argument(
        "--no_bf16",
        dest="precision",
        action="store_const",
        const="fp32",
        help="train in fp32 (same as --precision fp32)",
    )
    ours.add_argument(
        "--data_pipeline",
        choices=DATA_PIPELINES,
        default="fast",
        help="fast: JPEGs decoded at reduced size, uint8 until the batch; standard: full decode, float per image",
    )
    add_adapter_flags(parser)
    return parser


def _recipe_defaults(recipe: str) -> dict[str, Any]:
    from ..vision import OFFLINE_TRAINING_DEFAULTS

    defaults = dict(GUIDE_TRAINING_DEFAULTS)
    if recipe == "offline":
        defaults.update(OFFLINE_TRAINING_DEFAULTS)
        defaults["logging_steps"] = 5
    return defaults  # precision: --precision auto picks bf16/fp16 on a GPU (the guide uses fp16)


def parse_run(command: str, argv: list[str]) -> ParsedRun:
    """Parses ``deltatune train``/``compare`` arguments.

    Raises:
        CommandError: for unknown flags (with the closest known ones) or invalid values.
        SystemExit: from argparse for --help and malformed values.
    """
    from ..vision import OFFLINE_BACKBONE_NAME, OFFLINE_DEFAULT, is_offline_default, offline_default_model_dir

    parser = build_run_parser(command)
    probe, _ = parser.parse_known_args(argv)
    recipe = probe.recipe or ("offline" if probe.model is None and probe.dataset is None else "guide")
    if recipe == "offline":
        model = probe.model or OFFLINE_DEFAULT
        dataset = probe.dataset or OFFLINE_DEFAULT
    else:
        model, dataset = probe.model or GUIDE_MODEL, probe.dataset or GUIDE_DATASET
    parser.set_defaults(**_recipe_defaults(recipe))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [s for action in parser._actions for s in action.option_strings]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        near = closest_flags(bad, known)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise CommandError(
            f"unknown option {bad!r}{hint} See `deltatune {command} --help` for the deltatune, adapter and "
            "TrainingArguments options"
        )
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    options = argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k not in fields})
    if command == "train":
        adapter_kwargs_for(options.method, options)  # refuse flags of other methods up front
    training_kwargs = {k: v for k, v in vars(namespace).items() if k in fields}
    try:  # fail before any data or model is loaded
        check_request(bool(training_kwargs.get("bf16")), bool(training_kwargs.get("fp16")), options.precision)
    except ValueError as err:
        raise CommandError(str(err)) from err
    if not training_kwargs.get("output_dir"):
        name = (
            OFFLINE_BACKBONE_NAME
            if is_offline_default(model)
            else os.path.basename(model.rstrip("/")) or "model"
        )
        training_kwargs["output_dir"] = (
            f"{name}-{namespace.method}" if command == "train" else f"{name}-compare"
        )
    if training_kwargs.get("evaluation_strategy") is not None:
        explicit = any(a == "--eval_strategy" or a.startswith("--eval_strategy=") for a in argv)
        if not explicit:
            training_kwargs.pop("eval_strategy", None)  # a recipe default gives way to the old spelling
        training_kwargs = map_legacy_kwargs(training_kwargs)
    push = bool(training_kwargs.get("push_to_hub"))
    training_kwargs["push_to_hub"] = False  # deltatune uploads the final adapter itself
    try:
        training_args = TrainingArguments(**training_kwargs)
    except ValueError as err:
        raise CommandError(str(err)) from err
    if is_offline_default(model):
        model = offline_default_model_dir()
    batch_flags = ("--per_device_train_batch_size", "--gradient_accumulation_steps", "--auto_find_batch_size")
    from_recipe = not any(a.split("=", 1)[0] in batch_flags for a in argv)
    return ParsedRun(options, training_args, recipe, model, dataset, push, from_recipe)


def run_spec(parsed: ParsedRun, method: str | None, strict: bool = True, **overrides: Any) -> RunSpec:
    """The :class:`RunSpec` for ``method`` (None for a baseline) from parsed options."""
    o = parsed.options
    kwargs = adapter_kwargs_for(method, o, strict=strict) if method else {}
    fields = {
        "method": method,
        "model": parsed.model,
        "dataset": parsed.dataset,
        "adapter_kwargs": kwargs,
        "random_backbone": o.random_backbone,
        "image_column": o.image_column,
        "label_column": o.label_column,
        "validation_split": o.validation_split,
        "max_train_samples": o.max_train_samples,
        "max_eval_samples": o.max_eval_samples,
        "data_pipeline": o.data_pipeline,
    }
    fields.update(overrides)
    return RunSpec(**fields)


def check_hub_access(repo_id: str | None) -> None:
    """Fails fast when ``--push_to_hub`` cannot work: offline mode, no network or no token.

    Raises:
        CommandError: naming what is missing and how to fix it.
    """
    from huggingface_hub import constants, get_token

    hint = "train without --push_to_hub and upload the output_dir later with `huggingface-cli upload`"
    if constants.HF_HUB_OFFLINE:
        raise CommandError(f"--push_to_hub needs the network but HF_HUB_OFFLINE is set; {hint}")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as err:
        raise CommandError(f"--push_to_hub: cannot reach huggingface.co ({err}); {hint}") from err
    if get_token() is None:
        raise CommandError(
            "--push_to_hub needs a Hugging Face token: run `huggingface-cli login` or set HF_TOKEN"
        )
    if repo_id is None:
        logger.info("pushing to a repo named after the output directory")
