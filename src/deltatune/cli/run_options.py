"""The options of ``deltatune train``/``compare`` as dataclass fields, each with its help written once in
``metadata={"help": ...}`` (transformers' ``run_image_classification.py`` spellings among them as aliases).

Two parsers are built from the same fields:

- the run-time parser (:func:`build_run_parser`): transformers' ``HfArgumentParser`` over
  :class:`TrainOptions` (or :class:`CompareOptions`) and every ``TrainingArguments`` field, plus the
  generated adapter options (:mod:`.flags`); ``--help-all`` renders it;
- the help parser (:func:`build_help_parser`): the same option fields and :class:`TrainingEssentials` (the
  ``TrainingArguments`` fields ``--help`` shows, with shorter help) added by
  :func:`~.run_parser.add_dataclass_fields`, which imports neither torch nor transformers, so ``--help``
  answers at once. ``tests/test_cli_help.py`` checks that both expose the same option strings.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field
from typing import Any

from .._defaults import (
    BASELINES,
    DATA_PIPELINES,
    GUIDE_DATASET,
    GUIDE_MODEL,
    GUIDE_TARGETS,
    GUIDE_TRAINING_DEFAULTS,
    OFFLINE_BACKBONE_ID,
    OFFLINE_DEFAULT,
    OFFLINE_TRAINING_DEFAULTS,
    PRECISION_CHOICES,
)
from .checks import PositiveInt
from .init_options import OptimizerOptions, refine_flags
from .run_parser import RunHelp, add_dataclass_fields

__all__ = [
    "CompareOptions",
    "RunOptions",
    "TrainOptions",
    "TrainingEssentials",
    "build_help_parser",
    "build_run_parser",
    "method_configs",
    "method_specs",
    "recipe_defaults",
]


def _opt(help_text: str, *aliases: str, **argparse_kwargs: Any) -> dict[str, Any]:
    """Field metadata: the help, the alias spellings and any other ``add_argument`` keyword."""
    meta: dict[str, Any] = {"help": help_text, **argparse_kwargs}
    if aliases:
        meta["aliases"] = list(aliases)
    return meta


@dataclasses.dataclass
class RunOptions:
    """deltatune's own options of ``train`` and ``compare`` (the data, the model, how the run goes)."""

    model: str | None = field(
        default=None, metadata=_opt("base model: hub id or folder", "--model_name_or_path", metavar="ID|DIR")
    )
    dataset: str | None = field(
        default=None,
        metadata=_opt(
            "hub dataset id, image folder (one subfolder per class) or offline-default",
            "--dataset_name",
            metavar="ID|DIR",
        ),
    )
    train_dir: str | None = field(
        default=None,
        metadata=_opt("image folder to train on (the same as --dataset DIR)", metavar="DIR"),
    )
    validation_dir: str | None = field(
        default=None,
        metadata=_opt(
            "image folder to evaluate on (default: the dataset's validation split, else carved from train)",
            metavar="DIR",
        ),
    )
    recipe: str | None = field(
        default=None,
        metadata=_opt(
            "which defaults; unset: offline without --model/--dataset/--train_dir, guide otherwise",
            choices=("offline", "guide"),
        ),
    )
    image_column: str | None = field(
        default=None, metadata=_opt("image column of a hub dataset (auto-detected)", "--image_column_name")
    )
    label_column: str | None = field(
        default=None, metadata=_opt("label column of a hub dataset (auto-detected)", "--label_column_name")
    )
    validation_split: float = field(
        default=0.1,
        metadata=_opt(
            "share of the training images evaluated on when the dataset has no validation split",
            "--train_val_split",
        ),
    )
    max_train_samples: PositiveInt | None = field(
        default=None, metadata=_opt("use at most N training images", metavar="N")
    )
    max_eval_samples: PositiveInt | None = field(
        default=None, metadata=_opt("use at most N eval images", metavar="N")
    )
    random_backbone: bool = field(default=False, metadata=_opt("start from random weights (a baseline)"))
    trust_remote_code: bool = field(
        default=False,
        metadata=_opt(
            "allow the Python code a model or processor folder ships (auto_map) to run; off by default"
        ),
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata=_opt(
            "re-initialise a checkpoint head of another size (false: such a checkpoint is an error)"
        ),
    )
    overwrite_output_dir: bool = field(
        default=False, metadata=_opt("replace a different run found in --output_dir")
    )
    num_threads: PositiveInt | None = field(
        default=None, metadata=_opt("torch CPU threads (unset: 1 for a small model on a CPU)", metavar="N")
    )
    precision: str = field(
        default="auto",
        metadata=_opt(
            "auto: bf16 autocast where it pays (a big enough model on a CPU with bfloat16), bf16 (else fp16) "
            "on a GPU, fp32 otherwise; the choice is logged. --no_bf16 = fp32",
            choices=PRECISION_CHOICES,
        ),
    )
    data_pipeline: str = field(
        default="auto",
        metadata=_opt(
            "auto: gpu when training on a GPU the CPU cannot feed, else fast; fast: JPEGs decoded at reduced "
            "size, uint8 until the batch; gpu: decoded and augmented on the GPU (nvJPEG); standard: full "
            "decode, float per image",
            choices=DATA_PIPELINES,
        ),
    )


@dataclasses.dataclass
class TrainOptions(RunOptions):
    """``deltatune train``: the options of :class:`RunOptions` and the method."""

    method: str | None = field(default=None, metadata=_opt("adapter method (any case)"))


@dataclasses.dataclass
class CompareOptions(RunOptions):
    """``deltatune compare``: the options of :class:`RunOptions`, the methods and the baselines."""

    methods: list[str] = field(
        default_factory=list, metadata=_opt("methods to compare (any case)", metavar="METHOD")
    )
    baselines: list[str] = field(
        default_factory=lambda: list(BASELINES),
        metadata=_opt(
            "baselines: linear_probe, full (fine-tuning), random (every method on a random backbone)",
            choices=BASELINES,
            metavar="BASELINE",
        ),
    )
    full_learning_rate: float | None = field(
        default=None,
        metadata=_opt("learning rate of full fine-tuning; unset: --learning_rate / 10", metavar="LR"),
    )


@dataclasses.dataclass
class TrainingEssentials:
    """The ``TrainingArguments`` fields ``--help`` lists, with transformers' types and defaults and a short
    help (``--help-all`` shows transformers' own); the metavar is used by both helps."""

    output_dir: str | None = field(
        default=None,
        metadata=_opt(
            "where the adapter, metrics, plots, report and checkpoints go (default: <model>-<method>)",
            metavar="DIR",
        ),
    )
    num_train_epochs: float = field(default=3.0, metadata=_opt("epochs", metavar="N"))
    max_steps: int = field(
        default=-1,
        metadata=_opt("stop after this many optimiser steps (overrides the epochs when > 0)", metavar="N"),
    )
    learning_rate: float = field(default=5e-5, metadata=_opt("peak learning rate", metavar="LR"))
    per_device_train_batch_size: int = field(
        default=8, metadata=_opt("training batch per device", metavar="N")
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata=_opt("batches per optimiser step", metavar="N")
    )
    per_device_eval_batch_size: int = field(
        default=8, metadata=_opt("evaluation batch per device", metavar="N")
    )
    eval_strategy: str = field(
        default="no",
        metadata=_opt("when to evaluate", metavar="{no,steps,epoch}", choices=("no", "steps", "epoch")),
    )
    save_strategy: str = field(
        default="steps",
        metadata=_opt(
            "when to write checkpoint-N folders",
            metavar="{no,steps,epoch,best}",
            choices=("no", "steps", "epoch", "best"),
        ),
    )
    logging_steps: float = field(
        default=500,
        metadata=_opt("log the training loss every N steps (to train.log and the curve)", metavar="N"),
    )
    load_best_model_at_end: bool = field(
        default=False, metadata=_opt("end with the best evaluated checkpoint", metavar="BOOL")
    )
    seed: int = field(
        default=42, metadata=_opt("seed of the split, the head, the adapter and the data order", metavar="N")
    )
    do_train: bool = field(
        default=False,
        metadata=_opt("train (default on; false: only evaluate the model as loaded)", metavar="BOOL"),
    )
    do_eval: bool = field(
        default=False, metadata=_opt("evaluate (default on; false: no evaluation at all)", metavar="BOOL")
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_opt("continue a run: true (its newest complete checkpoint) or a path", metavar="PATH"),
    )
    report_to: str | None = field(
        default="none",
        metadata=_opt(
            "also log to: tensorboard, wandb, mlflow, ... (the package must be installed)", metavar="NAME"
        ),
    )
    push_to_hub: bool = field(default=False, metadata=_opt("upload the adapter when done", metavar="BOOL"))
    hub_model_id: str | None = field(
        default=None,
        metadata=_opt("the repo to upload to (default: the output folder's name)", metavar="ID"),
    )
    use_cpu: bool = field(
        default=False, metadata=_opt("train on the CPU even when a GPU is there", metavar="BOOL")
    )


ESSENTIALS = {f.name: f for f in dataclasses.fields(TrainingEssentials)}


def method_specs() -> dict[str, Any]:
    """Method name → its :class:`~deltatune.registry.MethodSpec`, in registration order.

    The one place the command line's parsers and help ask the registry for the methods (the adapter
    options come from :mod:`.flags`).
    """
    from ..registry import available_methods, get_method

    return {name: get_method(name) for name in available_methods()}


def method_configs() -> dict[str, Any]:
    """Method name → its config class, in registration order."""
    return {name: spec.config_cls for name, spec in method_specs().items()}


def _method_name(text: str) -> str:
    """``--method``/``--methods`` values in any case (``LoRA``, ``DoRA``)."""
    return text.strip().lower()


def _adapter_help(
    configs: dict[str, Any],
) -> tuple[
    dict[str, list[str]], dict[str, dict[str, Any]], dict[str, dict[str, str]], set[str], dict[str, str]
]:
    """For the help: method → its adapter dests (rank and the ``--alpha``/``--dropout`` aliases first),
    method → the values the recipe uses, method → help texts of its aliases, the dests left to
    ``--help-all`` (JSON-valued or undocumented) and dest → its help without the methods it applies to."""
    from .flags import ALIASES, adapter_flags

    flags = adapter_flags()
    dests: dict[str, list[str]] = {}
    recipe: dict[str, dict[str, Any]] = {}
    notes: dict[str, dict[str, str]] = {}
    for method, config_cls in configs.items():
        # a method without an alpha or a dropout field (IA³ has neither) has no such alias
        alpha_field = getattr(config_cls, "ALPHA_FIELD", None)
        dropout_field = getattr(config_cls, "DROPOUT_FIELD", None)
        flag_aliases = getattr(config_cls, "FLAG_ALIASES", {})
        own = [name for name, flag in flags.items() if method in flag.methods and name not in ALIASES]
        first = [d for d in ("r",) if d in own]
        aliases = [a for a, f in (("alpha", alpha_field), ("dropout", dropout_field)) if f]
        dests[method] = [*first, *aliases, *(d for d in own if d not in first)]
        notes[method] = {flag: text for flag, (_, text) in flag_aliases.items()}
        if alpha_field:
            notes[method]["alpha"] = f"scale numerator (sets {alpha_field})"
        if dropout_field:
            notes[method]["dropout"] = f"dropout (sets {dropout_field})"
        # what tasks.image_classification.adapter_defaults(method, "classifier") gives before planning
        values = {
            "target_modules": list(GUIDE_TARGETS),
            "modules_to_save": ["classifier"],
            **config_cls.recipe_defaults(0, {}),
            **getattr(config_cls, "RECIPE_DEFAULTS", {}),
        }
        values = {k: v for k, v in values.items() if k in flags}
        for flag, (name, _) in flag_aliases.items():
            if name in values:
                values[flag] = values[name]
        if alpha_field in values:
            values["alpha"] = values[alpha_field]
        if dropout_field in values:
            values["dropout"] = values[dropout_field]
        recipe[method] = values
    hidden = {name for name, flag in flags.items() if not flag.help or "dict" in str(flag.hint)}
    for config_cls in configs.values():  # options for other models than the recipe's (language models)
        hidden.update(getattr(config_cls, "HELP_ALL_FIELDS", ()))
    texts = {name: flag.help for name, flag in flags.items()}
    texts.update({alias: text for alias, text in ALIASES.items() if alias not in texts})
    return dests, recipe, notes, hidden, texts


def _settings(command: str, help_method: str | None) -> dict[str, Any]:
    """The keyword arguments of :class:`~.run_parser.RunHelp` for ``command``."""
    configs = method_configs()
    methods = list(configs)
    dests, adapter_recipe, notes, hidden, texts = _adapter_help(configs)
    method = _method_name(help_method) if help_method else methods[0]
    return {
        "command": command,
        "description": (
            "Fine-tune an image classifier with an adapter (the PEFT guide's recipe). With no options: the "
            "bundled offline recipe (handwritten digits, a small pretrained ViT); with --model or --dataset: "
            "the guide's recipe. transformers' run_image_classification.py flags work too "
            "(--model_name_or_path, --dataset_name, --train_dir, --do_train, ...)."
            if command == "train"
            else "Train several methods and the baselines on the same data and seed; print and save a table."
        ),
        "recipe_defaults": {
            "offline": {
                "model": OFFLINE_BACKBONE_ID,
                "dataset": OFFLINE_DEFAULT,
                **recipe_defaults("offline"),
            },
            "guide": {"model": GUIDE_MODEL, "dataset": GUIDE_DATASET, **recipe_defaults("guide")},
        },
        "help_method": method if method in methods else methods[0],
        "adapter_dests": dests,
        "adapter_recipe": adapter_recipe,
        "adapter_notes": notes,
        "adapter_hidden": hidden,
        "adapter_texts": texts,
        "essentials": ESSENTIALS,
    }


def _finish(parser: argparse.ArgumentParser, command: str) -> None:
    """What dataclass fields cannot say, the same on both parsers: the registered methods as choices (in
    any case), ``--baselines`` taking none, ``--no_bf16``, the adapter options and ``--do_train``/``--do_eval``
    left unset (both default to on)."""
    from .flags import add_adapter_flags

    methods = list(method_configs())
    for action in parser._actions:
        if action.dest in ("method", "methods"):
            action.type = _method_name
            action.choices = methods
            action.default = methods[0] if action.dest == "method" else list(methods)
        if action.dest == "baselines":
            action.nargs = "*"
    parser.add_argument(
        "--no_bf16",
        dest="precision",
        action="store_const",
        const="fp32",
        help="train in fp32 (same as --precision fp32)",
    )
    add_adapter_flags(parser)
    refine_flags(parser, command)
    parser.set_defaults(do_train=None, do_eval=None)  # None: not given (both default to on)


def build_help_parser(command: str, help_method: str | None = None) -> RunHelp:
    """The parser ``--help`` renders: imports neither torch nor transformers.

    Args:
        command: ``"train"`` or ``"compare"``.
        help_method: The method whose adapter options ``--help`` lists (default: the first registered).
    """
    parser = RunHelp(**_settings(command, help_method))
    add_dataclass_fields(parser, TrainOptions if command == "train" else CompareOptions)
    add_dataclass_fields(parser, OptimizerOptions)
    add_dataclass_fields(parser, TrainingEssentials)
    parser.add_help_options(lists_all=False)
    _finish(parser, command)
    return parser


def build_run_parser(command: str, help_method: str | None = None) -> RunHelp:
    """The parser of ``deltatune train`` (``command="train"``) or ``deltatune compare``: transformers'
    ``HfArgumentParser`` over the options dataclass and every ``TrainingArguments`` field (imports
    transformers; ``--help-all`` renders it).

    Args:
        command: ``"train"`` or ``"compare"``.
        help_method: The method whose adapter options ``--help`` lists (default: the first registered).
    """
    from transformers import HfArgumentParser

    from ..train.arguments import TrainingArguments

    class HfRunParser(RunHelp, HfArgumentParser):
        pass

    options = TrainOptions if command == "train" else CompareOptions
    parser = HfRunParser(
        (options, OptimizerOptions, TrainingArguments),  # type: ignore[arg-type]
        **_settings(command, help_method),
    )
    parser.add_help_options()
    _finish(parser, command)
    return parser


def recipe_defaults(recipe: str) -> dict[str, Any]:
    """The ``TrainingArguments`` values ``recipe`` (``"offline"`` or ``"guide"``) sets."""
    defaults = dict(GUIDE_TRAINING_DEFAULTS)
    if recipe == "offline":
        defaults.update(OFFLINE_TRAINING_DEFAULTS)
        defaults["logging_steps"] = 5
    return defaults  # precision: --precision auto picks bf16/fp16 on a GPU (the guide uses fp16)
