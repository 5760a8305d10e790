"""The help and the one-line errors of ``deltatune train``/``compare``, shared by the parser that runs
(transformers' ``HfArgumentParser``) and the one ``--help`` renders (plain ``argparse``; this module
imports neither torch nor transformers).

``--help`` shows what a run is usually shaped with (what to train, the training knobs the recipes set, data,
the run, the chosen method's adapter options); ``--help-all`` adds every adapter option of every method and
the rest of transformers' ``TrainingArguments``. A mistyped value or flag raises :class:`CommandError` (the
CLI prints one line) instead of printing the whole usage.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import enum
import re
import sys
import typing
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

__all__ = [
    "CommandError",
    "HelpAllElsewhere",
    "RunHelp",
    "SuggestingParser",
    "add_dataclass_fields",
    "help_method",
    "plain_text",
    "string_to_bool",
]


class CommandError(ValueError):
    """A command-line mistake; the CLI prints the message and exits with status 2."""


class HelpAllElsewhere(Exception):
    """``--help-all`` given to the help parser: only the run-time parser (with transformers) can list it."""


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
        (
            "num_train_epochs",
            "max_steps",
            "learning_rate",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "per_device_eval_batch_size",
            "eval_strategy",
            "save_strategy",
            "logging_steps",
            "load_best_model_at_end",
            "seed",
            "do_train",
            "do_eval",
            "resume_from_checkpoint",
            "report_to",
            "push_to_hub",
            "hub_model_id",
            "full_learning_rate",
            "loraplus_lr_ratio",
            "loraplus_lr_embedding",
        ),
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


def plain_text(text: str) -> str:
    """``text`` without docstring markup: ````x```` → ``x``, ``:mod:`x``` → ``x``, ``:class:`~a.B``` → ``B``."""
    text = re.sub(
        r":\w+:`~?([^`]*)`",
        lambda m: m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1),
        text,
    )
    return text.replace("``", "")


def _untwin(message: str) -> str:
    """``argument --max_train_samples/--max-train-samples: ...`` without the kebab-case twin."""

    def names(match: re.Match[str]) -> str:
        kept: list[str] = []
        for name in match.group(0).split("/"):
            if name.replace("-", "_") not in {k.replace("-", "_") for k in kept}:
                kept.append(name)
        return "/".join(kept)

    return re.sub(r"--[\w-]+(?:/--[\w-]+)+", names, message)


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


class SuggestingParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose mistyped choice or command names the closest match (``deltatune trian``
    → did you mean 'train'?) and lists the valid ones, for every parser of the CLI. (Python 3.14's
    ``suggest_on_error`` does the like; the CLI supports 3.10+.)"""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices:  # type: ignore[operator]
            return
        names = [_plain(c) for c in choices]  # type: ignore[union-attr]
        near = difflib.get_close_matches(_plain(value), names, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else "."
        if isinstance(action, argparse._SubParsersAction):
            raise argparse.ArgumentError(
                None, f"unknown command {value!r}{hint} Commands: {', '.join(names)}"
            )
        raise argparse.ArgumentError(
            action, f"invalid choice: {_plain(value)!r}{hint} Valid choices: {', '.join(names)}"
        )


class RunHelp(SuggestingParser):
    """An ``argparse`` parser with a recipe-first help and one-line errors; the run-time parser mixes it
    into ``HfArgumentParser`` (``class HfRunParser(RunHelp, HfArgumentParser)``), the help parser uses it as
    it is.

    Args:
        *args: Passed on (``HfArgumentParser``'s dataclass types).
        command: ``"train"`` or ``"compare"``.
        description: First paragraph of the help.
        recipe_defaults: Recipe name → the defaults it sets (dest → value); the help shows them per recipe.
        help_method: The method whose adapter options ``--help`` lists.
        adapter_dests: Method → the dests of its adapter options.
        adapter_recipe: Method → the adapter values the recipes use (shown in ``--help``).
        adapter_notes: Method → dest → the help ``--help`` shows for that method (e.g. what ``--r`` sets).
        adapter_hidden: Adapter dests ``--help`` leaves to ``--help-all`` (JSON-valued, undocumented).
        adapter_texts: Adapter dest → its help without the methods it applies to.
        essentials: The ``TrainingArguments`` fields ``--help`` lists (name → field, with the short help and
            the metavar in its metadata).
    """

    def __init__(
        self,
        *args: Any,
        command: str,
        description: str,
        recipe_defaults: dict[str, dict[str, Any]],
        help_method: str,
        adapter_dests: dict[str, list[str]],
        adapter_recipe: dict[str, dict[str, Any]],
        adapter_notes: dict[str, dict[str, str]],
        adapter_hidden: set[str],
        adapter_texts: dict[str, str],
        essentials: dict[str, dataclasses.Field[Any]],
    ) -> None:
        options: dict[str, Any] = {
            "prog": f"deltatune {command}",
            "usage": (
                f"deltatune {command} [--method METHOD] [--model ID|DIR] [--dataset ID|DIR] [OPTIONS]"
                if command == "train"
                else f"deltatune {command} [--methods METHOD ...] [--model ID|DIR] [--dataset ID|DIR] [OPTIONS]"
            ),
            "description": description,
            "allow_abbrev": False,
            "add_help": False,
            "formatter_class": _Formatter,
        }
        super().__init__(*args, **options)
        self.command = command
        self.recipe_defaults = recipe_defaults
        self.help_method = help_method
        self.adapter_dests = adapter_dests
        self.adapter_recipe = adapter_recipe
        self.adapter_notes = adapter_notes
        self.adapter_hidden = adapter_hidden
        self.adapter_texts = adapter_texts
        self.essentials = essentials

    def add_help_options(self, *, lists_all: bool = True) -> None:
        """``-h/--help`` and ``--help-all``; every option added before this counts as a training option.

        Args:
            lists_all: Whether this parser holds every option ``--help-all`` lists; the help parser does not
                (no transformers), so its ``--help-all`` raises :class:`HelpAllElsewhere` instead.
        """
        self.training_dests = {a.dest for a in self._actions}
        self.lists_all = lists_all
        self.add_argument("-h", "--help", action=_Help, help="show this help and exit")
        self.add_argument(
            "--help-all",
            "--help_all",
            action=_Help,
            full=True,
            help="also list every adapter option and every transformers TrainingArguments option (this "
            "one loads transformers)",
        )

    # ---- errors -----------------------------------------------------------------------------------
    def error(self, message: str) -> NoReturn:
        """Raises :class:`CommandError` (one line) instead of printing the usage and exiting."""
        raise CommandError(f"{_untwin(message)} (see `deltatune {self.command} --help`)")

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
        """A copy of ``action`` as the help shows it: the short or the full text, the recipe's default, a
        metavar that says what to give, and no docstring markup."""
        shown = copy.copy(action)
        text = (action.help or "").replace("%(default)s", _plain(action.default)).replace("%%", "%")
        essential = self.essentials.get(action.dest)
        if essential is not None and action.dest in self.training_dests:
            shown.metavar = essential.metadata["metavar"]
            if short:
                text = essential.metadata["help"]
        if short and action.dest in self.adapter_texts:  # the chosen method's wording, no [methods] scope
            text = self.adapter_notes.get(self.help_method, {}).get(
                action.dest, self.adapter_texts[action.dest]
            )
        if action.dest in self.adapter_recipe.get(self.help_method, {}):
            text = re.sub(r"\s*\(default [^)]*\)", "", text)  # the config's default; the recipe's is shown
        shown.help = (plain_text(text) + self._recipe_note(action.dest, action)).replace("%", "%%")
        if shown.help.strip() == "":
            shown.help = " "
        if shown.metavar is None and action.nargs != 0 and action.choices is None:
            kind = getattr(action.type, "__name__", "")
            shown.metavar = {
                "int": "N",
                "PositiveInt": "N",
                "float": "X",
                "string_to_bool": "BOOL",
                "_bool": "BOOL",
            }.get(kind, "VALUE")
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
        self._section(formatter, title, (self._help_copy(a, short=not full) for a in actions))
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
                "The other transformers TrainingArguments options (about 100) and the adapter options of the "
                f"other methods are accepted too: `deltatune {self.command} --help-all` lists them."
            )
        return formatter.format_help()

    def _order(self, dest: str) -> int:
        return next((i for i, a in enumerate(self._actions) if a.dest == dest), len(self._actions))


class _Help(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, full: bool = False, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)
        self.full = full

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        if self.full and not getattr(parser, "lists_all", True):
            raise HelpAllElsewhere
        text = parser.format_help(full=self.full) if isinstance(parser, RunHelp) else parser.format_help()
        parser._print_message(text, sys.stdout)
        parser.exit()


def help_method(argv: Sequence[str]) -> str | None:
    """The value of ``--method`` in ``argv`` (whose adapter options ``--help`` lists), if any."""
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


# ---- options from dataclass fields, as HfArgumentParser makes them -----------------------------------
def string_to_bool(text: str | bool) -> bool:
    """``true``/``false`` (also ``yes``/``no``, ``t``/``f``, ``y``/``n``, ``1``/``0``), as transformers'
    ``HfArgumentParser`` reads a boolean option."""
    if isinstance(text, bool):
        return text
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_fields(parser: argparse.ArgumentParser, dtype: type) -> None:
    """Adds an option per field of ``dtype`` with the option strings, types, defaults and metadata
    transformers' ``HfArgumentParser`` gives it (``--name``, its ``--kebab-case`` twin, the ``aliases`` of the
    metadata, ``--no_name`` for a boolean that defaults to true), without importing transformers.

    Only the field types the CLI's dataclasses use: ``bool``, ``str``/``int``/``float`` (and their
    ``... | None``), ``list[str]`` and types such as :class:`~.checks.PositiveInt`.
    """
    hints = typing.get_type_hints(dtype)
    for f in dataclasses.fields(dtype):
        if not f.init:
            continue
        kwargs = dict(f.metadata)
        aliases = kwargs.pop("aliases", [])
        names = [f"--{f.name}", *([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []), *aliases]
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = args[0] if typing.get_origin(hint) in (typing.Union, _UnionType) and len(args) == 1 else hint
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if kind is bool:
            parser.add_argument(*names, type=string_to_bool, default=default, nargs="?", const=True, **kwargs)
            if default is True:
                no = f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}"
                kwargs.pop("metavar", None)
                parser.add_argument(*no, action="store_false", dest=f.name, default=False, **kwargs)
        elif typing.get_origin(kind) is list:
            parser.add_argument(*names, type=typing.get_args(kind)[0], nargs="+", default=default, **kwargs)
        else:
            parser.add_argument(*names, type=kind, default=default, **kwargs)


_UnionType = type(int | None)
