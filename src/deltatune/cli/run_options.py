"""The options of ``deltatune train``/``compare``: ours (transformers' ``run_image_classification.py``
spellings among them as aliases), the generated adapter options and every ``TrainingArguments`` field, with
what the two recipes use by default (shown by ``--help``, applied by :func:`~.run_args.parse_run`)."""

from __future__ import annotations

from typing import Any

from ..registry import available_methods
from ..tasks.image_classification import GUIDE_DATASET, GUIDE_MODEL, GUIDE_TRAINING_DEFAULTS
from ..train.arguments import TrainingArguments
from ..train.precision import PRECISION_CHOICES
from ..vision.pipelines import DATA_PIPELINES
from .checks import positive_int
from .flags import ALIASES, _bool, adapter_flags, add_adapter_flags
from .run_parser import RunParser

__all__ = ["build_run_parser", "recipe_defaults"]


def _adapter_help() -> tuple[
    dict[str, list[str]], dict[str, dict[str, Any]], dict[str, dict[str, str]], set[str]
]:
    """For the help: method → its adapter dests (rank and the ``--alpha``/``--dropout`` aliases first),
    method → the values the recipe uses, method → help texts of its aliases, and the dests left to
    ``--help-all`` (JSON-valued or undocumented)."""
    from ..registry import get_method
    from ..tasks.image_classification import adapter_defaults

    flags = adapter_flags()
    dests: dict[str, list[str]] = {}
    recipe: dict[str, dict[str, Any]] = {}
    notes: dict[str, dict[str, str]] = {}
    for method in available_methods():
        config_cls = get_method(method).config_cls
        own = [name for name, flag in flags.items() if method in flag.methods and name not in ALIASES]
        first = [d for d in ("r",) if d in own]
        fields = {"alpha": config_cls.ALPHA_FIELD, "dropout": config_cls.DROPOUT_FIELD}
        aliases = [alias for alias, field in fields.items() if field]
        dests[method] = [*first, *aliases, *(d for d in own if d not in first)]
        notes[method] = {flag: text for flag, (_, text) in config_cls.FLAG_ALIASES.items()}
        if config_cls.ALPHA_FIELD:
            notes[method]["alpha"] = f"scale numerator (sets {config_cls.ALPHA_FIELD})"
        if config_cls.DROPOUT_FIELD:
            notes[method]["dropout"] = f"dropout (sets {config_cls.DROPOUT_FIELD})"
        values = {**adapter_defaults(method, "classifier"), **config_cls.RECIPE_DEFAULTS}
        values = {k: v for k, v in values.items() if k in flags}
        for flag, (field, _) in config_cls.FLAG_ALIASES.items():
            if field in values:
                values[flag] = values[field]
        if config_cls.ALPHA_FIELD in values:
            values["alpha"] = values[config_cls.ALPHA_FIELD]
        if config_cls.DROPOUT_FIELD in values:
            values["dropout"] = values[config_cls.DROPOUT_FIELD]
        recipe[method] = values
    hidden = {name for name, flag in flags.items() if not flag.help or "dict" in str(flag.hint)}
    return dests, recipe, notes, hidden


def build_run_parser(command: str, help_method: str | None = None) -> RunParser:
    """The parser of ``deltatune train`` (``command="train"``) or ``deltatune compare``.

    Args:
        command: ``"train"`` or ``"compare"``.
        help_method: The method whose adapter options ``--help`` lists (default: the first registered).
    """
    from ..vision import OFFLINE_BACKBONE_ID, OFFLINE_DEFAULT

    methods = available_methods()
    dests, adapter_recipe, notes, hidden = _adapter_help()
    recipes = {
        "offline": {"model": OFFLINE_BACKBONE_ID, "dataset": OFFLINE_DEFAULT, **recipe_defaults("offline")},
        "guide": {"model": GUIDE_MODEL, "dataset": GUIDE_DATASET, **recipe_defaults("guide")},
    }
    parser = RunParser(
        command,
        TrainingArguments,
        description=(
            "Fine-tune an image classifier with an adapter (the PEFT guide's recipe). With no options: the "
            "bundled offline recipe (handwritten digits, a small pretrained ViT); with --model or --dataset: "
            "the guide's recipe. transformers' run_image_classification.py flags work too "
            "(--model_name_or_path, --dataset_name, --train_dir, --do_train, ...)."
            if command == "train"
            else "Train several methods and the baselines on the same data and seed; print and save a table."
        ),
        recipe_defaults=recipes,
        help_method=help_method if help_method in methods else methods[0],
        adapter_dests=dests,
        adapter_recipe=adapter_recipe,
        adapter_notes=notes,
        adapter_hidden=hidden,
    )
    ours = parser.add_argument_group("deltatune options")
    if command == "train":
        ours.add_argument("--method", choices=methods, default=methods[0], help="adapter method")
    else:
        ours.add_argument(
            "--methods",
            nargs="+",
            choices=methods,
            default=methods,
            metavar="METHOD",
            help="methods to compare",
        )
        ours.add_argument(
            "--baselines",
            nargs="*",
            choices=("linear_probe", "full", "random"),
            default=["linear_probe", "full", "random"],
            metavar="BASELINE",
            help="baselines: linear_probe, full (fine-tuning), random (every method on a random backbone)",
        )
        ours.add_argument(
            "--full_learning_rate",
            type=float,
            default=None,
            help="learning rate of full fine-tuning; unset: --learning_rate / 10",
        )
    ours.add_argument(
        "--model",
        "--model_name_or_path",
        dest="model",
        default=None,
        metavar="ID|DIR",
        help="base model: hub id or folder",
    )
    ours.add_argument(
        "--dataset",
        "--dataset_name",
        dest="dataset",
        default=None,
        metavar="ID|DIR",
        help="hub dataset id, image folder (one subfolder per class) or offline-default",
    )
    ours.add_argument(
        "--train_dir",
        default=None,
        metavar="DIR",
        help="image folder to train on (the same as --dataset DIR)",
    )
    ours.add_argument(
        "--validation_dir",
        default=None,
        metavar="DIR",
        help="image folder to evaluate on (default: the dataset's validation split, else carved from train)",
    )
    ours.add_argument(
        "--recipe",
        choices=("offline", "guide"),
        default=None,
        help="which defaults; unset: offline without --model/--dataset/--train_dir, guide otherwise",
    )
    ours.add_argument(
        "--image_column",
        "--image_column_name",
        dest="image_column",
        default=None,
        help="image column of a hub dataset (auto-detected)",
    )
    ours.add_argument(
        "--label_column",
        "--label_column_name",
        dest="label_column",
        default=None,
        help="label column of a hub dataset (auto-detected)",
    )
    ours.add_argument(
        "--validation_split",
        "--train_val_split",
        dest="validation_split",
        type=float,
        default=0.1,
        help="share of the training images evaluated on when the dataset has no validation split",
    )
    ours.add_argument(
        "--max_train_samples", type=positive_int, default=None, help="use at most N training images"
    )
    ours.add_argument("--max_eval_samples", type=positive_int, default=None, help="use at most N eval images")
    ours.add_argument("--random_backbone", action="store_true", help="start from random weights (a baseline)")
    ours.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow the Python code a model or processor folder ships (auto_map) to run; off by default",
    )
    ours.add_argument(
        "--ignore_mismatched_sizes",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="re-initialise a checkpoint head of another size (false: such a checkpoint is an error)",
    )
    ours.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace a different run found in --output_dir"
    )
    ours.add_argument(
        "--num_threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (unset: 1 for a small model on a CPU)",
    )
    ours.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="auto",
        help="auto: bf16 autocast where it pays (a big enough model on a CPU with bfloat16), bf16 (else fp16) on "
        "a GPU, fp32 otherwise; the choice is logged. --no_bf16 = fp32",
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
        default="auto",
        help="auto: gpu when training on a GPU the CPU cannot feed, else fast; fast: JPEGs decoded at reduced "
        "size, uint8 until the batch; gpu: decoded and augmented on the GPU (nvJPEG); standard: full decode, "
        "float per image",
    )
    add_adapter_flags(parser)
    parser.set_defaults(do_train=None, do_eval=None)  # None: not given (both default to on)
    return parser


def recipe_defaults(recipe: str) -> dict[str, Any]:
    from ..vision import OFFLINE_TRAINING_DEFAULTS

    defaults = dict(GUIDE_TRAINING_DEFAULTS)
    if recipe == "offline":
        defaults.update(OFFLINE_TRAINING_DEFAULTS)
        defaults["logging_steps"] = 5
    return defaults  # precision: --precision auto picks bf16/fp16 on a GPU (the guide uses fp16)
