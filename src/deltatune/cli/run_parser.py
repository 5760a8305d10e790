"""The parser of ``deltatune train``/``compare``: ``HfArgumentParser`` (every ``TrainingArguments`` field)
with a help that puts the recipe's own options first, with the defaults each recipe really uses, and one-line
errors.

``--help`` shows what a run is usually shaped with (what to train, the training knobs the recipes set, data,
the run, the chosen method's adapter options); ``--help-all`` adds every adapter option of every method and
the rest of transformers' ``TrainingArguments``. A mistyped value or flag raises :class:`CommandError` (the
CLI prints one line) instead of printing the whole usage.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import enum
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from transformers import HfArgumentParser

__all__ = ["CommandError", "RunParser"]


class CommandError(ValueError):
    """A command-line mistake; the CLI prints the message and exits with status 2."""


#: The TrainingArguments shown by ``--help`` (the rest is behind ``--help-all``): short help and metavar.
TRAINING_HELP: dict[str, tuple[str, str]] = {
    "output_dir": (
        "where the adapter, metrics, plots, report and checkpoints go (default: <model>-<method>)",
        "DIR",
    ),
    "num_train_epochs": ("epochs", "N"),
    "max_steps": ("stop after this many optimiser steps (overrides the epochs when > 0)", "N"),
    "learning_rate": ("peak learning rate", "LR"),
    "per_device_train_batch_size": ("training batch per device", "N"),
    "gradient_accumulation_steps": ("batches per optimiser step", "N"),
    "per_device_eval_batch_size": ("evaluation batch per device", "N"),
    "eval_strategy": ("when to evaluate", "{no,steps,epoch}"),
    "save_strategy": ("when to write checkpoint-N folders", "{no,steps,epoch,best}"),
    "logging_steps": ("log the training loss every N steps (to train.log and the curve)", "N"),
    "load_best_model_at_end": ("end with the best evaluated checkpoint", "BOOL"),
    "seed": ("seed of the split, the head, the adapter and the data order", "N"),
    "do_train": ("train (default on; false: only evaluate the model as loaded)", "BOOL"),
    "do_eval": ("evaluate (default on; false: no evaluation at all)", "BOOL"),
    "resume_from_checkpoint": ("continue a run: true (its newest complete checkpoint) or a path", "PATH"),
    "report_to": ("also log to: tensorboard, wandb, mlflow, ... (the package must be installed)", "NAME"),
    "push_to_hub": ("upload the adapter when done", "BOOL"),
    "hub_model_id": ("the repo to upload to (default: the output folder's name)", "ID"),
    "use_cpu": ("train on the CPU even when a GPU is there", "BOOL"),
}
#: Sections of ``--help``: (title, option dests). Dests absent from a command are skipped.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "what to train",
        (
            "method",
            "methods",
            "baselines",
            "model",
            "dataset",
            "train_dir",
            "validation_dir",
            "recipe",
            "output_dir",
        ),
    ),
    (
        "training (with each recipe's default where the two differ)",
        (*(d for d in TRAINING_HELP if d not in ("output_dir", "use_cpu")), "full_learning_rate"),
    ),
    (
        "data",
        (
            "image_column",
            "label_column",
            "validation_split",
            "max_train_samples",
            "max_eval_samples",
            "data_pipeline",
        ),
    ),
    (
        "run",
        (
            "precision",
            "num_threads",
            "use_cpu",
            "overwrite_output_dir",
            "random_backbone",
            "ignore_mismatched_sizes",
        ),
    ),
)


def _plain(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


class _Formatter(argparse.HelpFormatter):
    """One metavar per option (``--model, --model_name_or_path ID``); transformers' kebab-case twins hidden."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        first = action.option_strings[0]
        names = (
            [first]
            + [  # a spelling that differs from an earlier one only in - vs _ is a twin
                s
                for i, s in enumerate(action.option_strings[1:], 1)
                if s.replace("-", "_") not in {o.replace("-", "_") for o in action.option_strings[:i]}
            ]
        )
        if action.nargs == 0:
            return ", ".join(names)
        return (
            f"{', '.join(names)} {self._format_args(action, self._get_default_metavar_for_optional(action))}"
        )


class RunParser(HfArgumentParser):
    """``HfArgumentParser`` over ``training_args_cls`` with a recipe-first help and one-line errors.

    Args:
        command: ``"train"`` or ``"compare"``.
        training_args_cls: The ``TrainingArguments`` dataclass.
        description: First paragraph of the help.
        recipe_defaults: Recipe name → the defaults it sets (dest → value); the help shows them per recipe.
        help_method: The method whose adapter options ``--help`` lists.
        adapter_dests: Method → the dests of its adapter options.
        adapter_recipe: Method → the adapter values the recipes use (shown in ``--help``).
        adapter_notes: Method → dest → the help ``--help`` shows for that method (e.g. what ``--r`` sets).
        adapter_hidden: Adapter dests ``--help`` leaves to ``--help-all`` (JSON-valued, undocumented).
    """

    def __init__(
        self,
        command: str,
        training_args_cls: type,
        description: str,
        recipe_defaults: dict[str, dict[str, Any]],
        help_method: str,
        adapter_dests: dict[str, list[str]],
        adapter_recipe: dict[str, dict[str, Any]],
        adapter_notes: dict[str, dict[str, str]],
        adapter_hidden: set[str],
    ) -> None:
        super().__init__(
            training_args_cls,  # type: ignore[arg-type]
            prog=f"deltatune {command}",
            usage=(
                f"deltatune {command} [--method METHOD] [--model ID|DIR] [--dataset ID|DIR] [OPTIONS]"
                if command == "train"
                else f"deltatune {command} [--methods METHOD ...] [--model ID|DIR] [--dataset ID|DIR] [OPTIONS]"
            ),
            description=description,
            allow_abbrev=False,
            add_help=False,
            formatter_class=_Formatter,
        )
        self.command = command
        self.recipe_defaults = recipe_defaults
        self.help_method = help_method
        self.adapter_dests = adapter_dests
        self.adapter_recipe = adapter_recipe
        self.adapter_notes = adapter_notes
        self.adapter_hidden = adapter_hidden
        self.training_dests = {a.dest for a in self._actions}
        self.add_argument("-h", "--help", action=_Help, help="show this help and exit")
        self.add_argument(
            "--help-all",
            "--help_all",
            action=_Help,
            full=True,
            help="also list every adapter option and every transformers TrainingArguments option",
        )

    # ---- errors -----------------------------------------------------------------------------------
    def error(self, message: str) -> NoReturn:
        """Raises :class:`CommandError` (one line) instead of printing the usage and exiting."""
        raise CommandError(f"{message} (see `deltatune {self.command} --help`)")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices:  # type: ignore[operator]
            return
        names = [_plain(c) for c in choices]  # type: ignore[union-attr]
        near = difflib.get_close_matches(_plain(value), names, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else "."
        raise argparse.ArgumentError(
            action, f"invalid choice: {_plain(value)!r}{hint} Valid choices: {', '.join(names)}"
        )

    # ---- help -------------------------------------------------------------------------------------
    def _action(self, dest: str) -> argparse.Action | None:
        return next((a for a in self._actions if a.dest == dest and a.option_strings), None)

    def _recipe_note(self, dest: str, action: argparse.Action) -> str:
        adapter = self.adapter_recipe.get(self.help_method, {})
        if dest in adapter and dest not in self.training_dests:
            return f" (recipe: {_plain(adapter[dest])})"
        values = {name: d[dest] for name, d in self.recipe_defaults.items() if dest in d}
        if not values:
            default = action.default
            if (
                default in (None, argparse.SUPPRESS, False, [], "")
                or action.nargs == 0
                or dest == "max_steps"
            ):
                return ""
            return f" (default: {_plain(default)})"
        shown = [_plain(values.get(name, action.default)) for name in self.recipe_defaults]
        if len(set(shown)) == 1:
            return f" (default: {shown[0]})"
        return (
            " ("
            + " · ".join(f"{name}: {value}" for name, value in zip(self.recipe_defaults, shown, strict=True))
            + ")"
        )

    def _help_copy(self, action: argparse.Action, short: bool) -> argparse.Action:
        shown = copy.copy(action)
        text = action.help or ""
        if action.dest in TRAINING_HELP and action.dest in self.training_dests:
            if short:
                text, shown.metavar = TRAINING_HELP[action.dest]
            else:
                shown.metavar = TRAINING_HELP[action.dest][1]
        text = text.replace("%(default)s", _plain(action.default))
        if short and action.dest not in self.training_dests:  # one method's adapter options
            text = self.adapter_notes.get(self.help_method, {}).get(action.dest, text)
            text = re.sub(r"\s*\[[^\]]*\]$", "", text)  # the methods an option applies to
        if action.dest in self.adapter_recipe.get(self.help_method, {}):
            text = re.sub(r"\s*\(default [^)]*\)", "", text)  # the config's default; the recipe's is shown
        shown.help = (text + self._recipe_note(action.dest, action)).replace("%", "%%")
        if shown.help.strip() == "":
            shown.help = " "
        if shown.metavar is None and action.nargs != 0 and action.choices is None:
            kind = getattr(action.type, "__name__", "")
            shown.metavar = {"int": "N", "positive_int": "N", "float": "X"}.get(kind, "VALUE")
        return shown

    def _section(
        self, formatter: argparse.HelpFormatter, title: str, actions: Iterable[argparse.Action]
    ) -> None:
        listed = list(actions)
        if not listed:
            return
        formatter.start_section(title)
        formatter.add_arguments(listed)
        formatter.end_section()

    def format_help(self, full: bool = False) -> str:  # type: ignore[override]
        """The help: the recipe's sections first; with ``full``, every adapter and TrainingArguments option."""
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, [], [])
        formatter.add_text(self.description)
        shown: set[str] = set()
        for title, dests in SECTIONS:
            actions = [a for d in dests if (a := self._action(d)) is not None]
            shown |= {a.dest for a in actions}
            self._section(formatter, title, (self._help_copy(a, short=not full) for a in actions))
        all_adapter = sorted({d for dests in self.adapter_dests.values() for d in dests}, key=self._order)
        method_dests = [
            d for d in self.adapter_dests.get(self.help_method, []) if d not in self.adapter_hidden
        ]
        adapter = all_adapter if full else method_dests
        title = (
            "adapter options (generated from the config classes; [methods] each applies to)"
            if full
            else f"adapter options of {self.help_method} (`--method M --help` shows another method's)"
        )
        actions = [a for d in adapter if (a := self._action(d)) is not None]
        self._section(formatter, title, (self._help_copy(a, short=True) for a in actions))
        shown |= set(all_adapter) | {"help", "help_all"}
        rest = [a for a in self._actions if a.option_strings and a.dest not in shown]
        if full:
            self._section(
                formatter,
                "transformers TrainingArguments (every other option)",
                (self._help_copy(a, short=False) for a in rest),
            )
        formatter.start_section("help")
        formatter.add_arguments([a for a in self._actions if a.dest in ("help", "help_all")])
        formatter.end_section()
        if not full:
            formatter.add_text(
                f"{len(rest)} more transformers TrainingArguments options and the adapter options of the other "
                f"methods are accepted too: `deltatune {self.command} --help-all` lists them."
            )
        return formatter.format_help()

    def _order(self, dest: str) -> int:
        return next((i for i, a in enumerate(self._actions) if a.dest == dest), len(self._actions))


class _Help(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, full: bool = False, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)
        self.full = full

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        text = parser.format_help(full=self.full) if isinstance(parser, RunParser) else parser.format_help()
        parser._print_message(text, sys.stdout)
        parser.exit()
