"""The ``deltatune`` command line: thin parsing over library calls.

deltatune train                        # offline default: bundled digits + bundled pretrained ViT
deltatune train --method adalora --model google/vit-base-patch16-224-in21k --dataset food101
deltatune evaluate --adapter DIR       deltatune predict IMG_OR_DIR... --adapter DIR [--json]
deltatune merge --adapter DIR --output DIR
deltatune compare                      # every method + linear probe, full fine-tuning, random backbone
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from .run_parser import SuggestingParser

COMMANDS = ("train", "evaluate", "predict", "merge", "compare", "quickstart")
#: Top-level modules of the ``cli`` extra (``pip install "deltatune[cli]"``): the core library needs none.
CLI_EXTRA_MODULES = ("PIL", "datasets", "matplotlib", "rich")


def missing_extra(err: BaseException) -> str | None:
    """The one-line message for a command that needs a package of the ``cli`` extra that is not installed,
    or None when ``err`` is something else."""
    name = (getattr(err, "name", None) or "").split(".")[0]
    if not isinstance(err, ImportError) or name not in CLI_EXTRA_MODULES:
        return None
    return (
        f"the deltatune command needs the packages of the cli extra ({name} is not installed): "
        'pip install "deltatune[cli]"'
    )


def _require_extra() -> None:
    """Raises the ImportError of the first ``cli`` extra package that is not installed, before a command loads
    torch and transformers (seconds) only to fail on it.

    Raises:
        ModuleNotFoundError: naming the missing package (see :func:`missing_extra`).
    """
    for name in CLI_EXTRA_MODULES:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


class _PrintableFormatter(logging.Formatter):
    """``[deltatune] message`` with control characters of user-supplied names shown as escapes."""

    def format(self, record: logging.LogRecord) -> str:
        from .errors import printable

        return printable(super().format(record))


def _show_warnings_printably(debug: bool = False) -> None:
    """Python warnings outside a run's log (``evaluate``, ``predict``, ``merge``: ``train`` has its digest) print
    as one line each, ``[deltatune] warning: <text>``, without the source file and line of whichever library
    raised them, and with control characters and line breaks shown as escapes (a file or class name in a
    warning cannot drive the terminal or forge a line). ``--debug`` keeps Python's own format."""
    from .errors import escaped_line, printable

    shown = warnings.showwarning

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if debug:
            shown(printable(message), category, filename, lineno, file, line)
            return
        (file or sys.stderr).write(f"[deltatune] warning: {escaped_line(message)}\n")

    warnings.showwarning = show


def _setup_logging(verbose: bool = True) -> None:
    from .output import StderrHandler

    handler = StderrHandler()  # follows sys.stderr, so lines land above a live progress bar
    handler.setFormatter(_PrintableFormatter("[deltatune] %(message)s"))
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    root = logging.getLogger("deltatune")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # its weight-loading bar; the commands draw their own


class _TopParser(SuggestingParser):
    """The parser of ``deltatune`` and its simple commands: a mistyped command or choice is one line with the
    closest match (``deltatune trian`` → did you mean 'train'?), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"deltatune: error: {message} (see `{self.prog} --help`)\n")


def _unknown_option(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> NoReturn:
    """Exits (status 2) on an option ``command`` does not have, naming the closest ones and that command's
    help, as ``train`` and ``compare`` do."""
    from .flags import closest_flags

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    known = [s for action in sub._actions for s in action.option_strings if action.help != argparse.SUPPRESS]
    bad = next((u for u in unknown if u.startswith("-")), unknown[0])
    near = closest_flags(bad, known)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    print(
        f"deltatune: error: unknown option {bad!r}{hint} (see `deltatune {command} --help`)", file=sys.stderr
    )
    raise SystemExit(2)


def _path(text: str) -> str:
    """An ``argparse`` type: a non-empty path (an unset shell variable gives ``""``, which would otherwise
    mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path was given (an unset shell variable?); pass a path")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``deltatune``, ``evaluate``, ``predict``, ``merge`` and ``quickstart`` (``train`` and
    ``compare`` parse their own arguments: :mod:`.run_args`); building it and printing its help imports
    neither torch nor transformers: each command is named by its function in :mod:`.commands`."""
    from .._version import __version__
    from .checks import positive_int
    from .run_options import method_specs

    parser = _TopParser(
        prog="deltatune",
        description="Parameter-efficient fine-tuning: "
        + ", ".join(spec.display_name for spec in method_specs().values()),
        allow_abbrev=False,
    )
    parser.add_argument("-V", "--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}", parser_class=_TopParser
    )
    sub.add_parser("train", help="fine-tune with an adapter (see `deltatune train --help`)", add_help=False)
    sub.add_parser(
        "compare",
        help="methods vs baselines on the same data (see `deltatune compare --help`)",
        add_help=False,
    )
    for name, text in (
        ("evaluate", "accuracy, top-5, per-class accuracy and a confusion matrix of an adapter"),
        ("predict", "top-k labels of images with a trained adapter"),
        ("merge", "fold an adapter into its base model and save a standalone transformers model"),
    ):
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        p.set_defaults(func=name)
        p.add_argument("--help-all", action="help", help=argparse.SUPPRESS)  # as train's: no longer help here
        p.add_argument(
            "--adapter", required=True, type=_path, help="adapter directory written by `deltatune train`"
        )
        p.add_argument(
            "--model", default=None, type=_path, help="base model (default: the one recorded in the adapter)"
        )
        p.add_argument(
            "--trust_remote_code",
            action="store_true",
            help="allow the Python code a model or processor folder ships (auto_map) to run; off by default",
        )
        if name == "predict":
            p.add_argument("images", nargs="+", type=_path, help="image files or directories")
            p.add_argument("--top_k", type=positive_int, default=5, help="labels per image (default 5)")
            p.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
        if name == "merge":
            p.add_argument("--output", required=True, type=_path, help="directory of the merged model")
            p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
        if name == "evaluate":
            p.add_argument(
                "--dataset",
                default=None,
                type=_path,
                help="dataset (default: the one the adapter was trained on)",
            )
            p.add_argument("--image_column", default=None)
            p.add_argument("--label_column", default=None)
            p.add_argument("--validation_split", type=float, default=None)
            p.add_argument("--max_eval_samples", type=int, default=None)
            p.add_argument(
                "--validation_dir",
                default=None,
                type=_path,
                help="image folder to score, every image (as in train)",
            )
            p.add_argument(
                "--output_dir",
                default=None,
                type=_path,
                help="where to write results (default: the adapter dir, or ADAPTER/evaluate when it holds results)",
            )
            p.add_argument(
                "--overwrite",
                action="store_true",
                help="replace result files already in the results folder (without --output_dir: the adapter dir)",
            )
        if name in ("predict", "evaluate"):
            p.add_argument("--batch_size", type=positive_int, default=32)
            p.add_argument(
                "--num_threads", type=positive_int, default=None, help="CPU threads (default: as train picks)"
            )
    quick = sub.add_parser(
        "quickstart", help="apply every method to a ViT-base-shaped model and print what trains"
    )
    quick.add_argument("--help-all", action="help", help=argparse.SUPPRESS)
    quick.add_argument(
        "--num_labels", type=positive_int, default=101, help="classes of the head (at least 1)"
    )
    quick.set_defaults(func="quickstart")
    return parser


#: transformers' ``--debug`` takes one of these values; a bare ``--debug`` (or one before another flag) is ours.
_TRANSFORMERS_DEBUG_VALUES = ("underflow_overflow", "tpu_metrics_debug")


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without deltatune's ``--debug`` flag, and whether it was there (``--debug underflow_overflow``
    stays: that is transformers' own option)."""
    kept: list[str] = []
    debug = False
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if arg == "--debug" and not any(v in value for v in _TRANSFORMERS_DEBUG_VALUES):
            debug = True
            continue
        kept.append(arg)
    return kept, debug


def _print_run_help(command: str, argv: list[str]) -> None:
    """Prints the help of ``train``/``compare`` and exits (status 0) when ``argv`` asks for it: the help
    parser reads ``argv`` and its own ``--help`` prints. ``--help-all`` is left to the run-time parser (it
    lists transformers' options), and so is every mistake in ``argv`` (it reports them with its own)."""
    from .run_options import build_help_parser
    from .run_parser import CommandError, HelpAllElsewhere, help_method

    try:
        build_help_parser(command, help_method(argv)).parse_known_args(argv)
    except (CommandError, HelpAllElsewhere):
        return


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    Every failure ends here as one line on stderr (``deltatune: error: ...``: what, which argument or file,
    what to do) and a status: 2 for usage errors, 1 for failures while running, 130 for Ctrl-C (with the
    command that resumes an interrupted run). ``--debug`` (or ``DELTATUNE_DEBUG=1``) prints the traceback
    first.
    """
    from .errors import describe_error

    argv, debug = _pop_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or bool(os.environ.get("DELTATUNE_DEBUG"))
    package_logger = logging.getLogger("deltatune")
    saved = (list(package_logger.handlers), package_logger.level)
    saved_showwarning = warnings.showwarning
    try:
        _show_warnings_printably(debug)
        if argv and argv[0] in ("train", "compare"):
            _print_run_help(argv[0], argv[1:])  # --help: exits here, before torch and transformers load
            _require_extra()
            _setup_logging(verbose="--json" not in argv)
            from . import commands

            return commands.train(argv[1:]) if argv[0] == "train" else commands.compare(argv[1:])
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)  # --help and usage errors exit here
        if unknown:
            _unknown_option(parser, args.command, unknown)
        _require_extra()
        _setup_logging(verbose="--json" not in argv)
        from . import commands

        return int(getattr(commands, args.func)(args))
    except SystemExit:
        raise  # argparse: --help (0) and malformed arguments (2), already printed
    except BaseException as err:  # the boundary: one line, never a traceback unless asked
        if not isinstance(err, Exception | KeyboardInterrupt):
            raise
        if debug:
            traceback.print_exc()
        extra = missing_extra(err)
        message, status = (extra, 1) if extra else describe_error(err)
        label = "deltatune:" if isinstance(err, KeyboardInterrupt) else "deltatune: error:"
        print(f"{label} {message}", file=sys.stderr)
        return status
    finally:
        warnings.showwarning = saved_showwarning
        package_logger.handlers[:] = saved[0]
        package_logger.setLevel(saved[1])


if __name__ == "__main__":
    sys.exit(main())
