"""A command line that answers at once (issue 16, item 9) from options written once (issue 18, item 4).

``--help`` of every command imports neither torch nor transformers; the help parser and the run-time
``HfArgumentParser`` expose the same options from the same dataclass fields; the help shows no docstring
markup and no sentence cut mid-way; mistyped or borrowed spellings get a one-line suggestion.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from benchmarks import cli_help
from deltatune.cli import main
from deltatune.cli.run_options import (
    TrainingEssentials,
    TrainOptions,
    build_help_parser,
    build_run_parser,
    method_specs,
)
from deltatune.cli.run_parser import CommandError, HelpAllElsewhere

SRC = str(Path(__file__).resolve().parents[1] / "src")
HELPS = [
    ["--help"],
    ["train", "--help"],
    ["compare", "--help"],
    ["evaluate", "--help"],
    ["predict", "--help"],
    ["merge", "--help"],
    ["train", "--method", "DoRA", "--help"],
]
#: Run after ``deltatune.cli.main(argv)`` (:func:`benchmarks.cli_help.help_script`): the heavy modules it loaded.
HEAVY_REPORT = """
heavy = [m for m in ("torch", "transformers", "matplotlib", "rich", "datasets") if m in sys.modules]
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def _heavy_after(argv: list[str], stub: bool) -> tuple[list[str], str]:
    import json

    done = subprocess.run(
        [sys.executable, "-c", cli_help.help_script(stub, HEAVY_REPORT), json.dumps(argv), SRC],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stderr.splitlines() if x.startswith("HEAVY="))
    return [m for m in line[len("HEAVY=") :].split(",") if m], done.stdout


@pytest.mark.parametrize("argv", HELPS, ids=" ".join)
def test_help_path_besides_method_discovery_imports_no_heavy_library(argv: list[str]) -> None:
    heavy, out = _heavy_after(argv, stub=True)
    assert heavy == [] and "usage:" in out


@pytest.mark.parametrize("argv", HELPS, ids=" ".join)
def test_help_imports_neither_torch_nor_transformers(argv: list[str]) -> None:
    heavy, out = _heavy_after(argv, stub=False)
    assert heavy == [] and "usage:" in out


# ---- one set of options, two parsers ------------------------------------------------------------------
def _options(parser: typing.Any) -> dict[str, typing.Any]:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_parser_and_run_parser_expose_the_same_options(command: str) -> None:
    light, full = build_help_parser(command), build_run_parser(command)
    shown, accepted = _options(light), _options(full)
    assert set(shown) <= set(accepted), set(shown) - set(accepted)
    for name, action in shown.items():
        twin = accepted[name]
        assert (action.dest, action.nargs, action.const) == (twin.dest, twin.nargs, twin.const), name
        assert [str(c) for c in action.choices or []] == [str(c) for c in twin.choices or []], name
        if action.dest not in ("help", "help_all"):
            assert action.default == twin.default, name
    fields = {f.name for f in dataclasses.fields(TrainOptions)} | {"no_bf16"}
    for name in accepted:
        if name.lstrip("-").replace("-", "_").removeprefix("no_") in fields:
            assert name in shown, name  # every deltatune option is in the help parser too


def test_essential_training_fields_are_transformers_own() -> None:
    from deltatune.train import TrainingArguments

    theirs = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    hints = typing.get_type_hints(TrainingArguments)
    for f in dataclasses.fields(TrainingEssentials):
        assert f.default == theirs[f.name].default, f.name
        choices = f.metadata.get("choices")
        if choices is not None:  # the values of transformers' enum
            enum_type = next(a for a in typing.get_args(hints[f.name]) if a is not str)
            assert list(choices) == [e.value for e in enum_type if e.value in choices], f.name
            assert set(choices) == {e.value for e in enum_type}, f.name


def test_help_all_says_it_loads_transformers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--help-all" in capsys.readouterr().out
    flat = " ".join(build_help_parser("train").format_help().split())
    assert "(this one loads transformers)" in flat


# ---- help text a person reads --------------------------------------------------------------------------
MARKUP = re.compile(r"``|:(mod|class|func|meth|attr|data|obj|exc):`")
CUT = {"in", "of", "and", "or", "to", "the", "a", "an", "with", "for", "from", "by", "on", "at", "as", "than"}
#: What the help appends to a field's own text: its default (one word), the recipe's value or both recipes'.
NOTE = re.compile(r"\s*\((default: [^()\s]*|recipe: [^()]*|offline: [^()]* · guide: [^()]*)\)$")


def _entries(text: str) -> list[tuple[str, str]]:
    """(option, help text) of every option listed in an argparse help printed at COLUMNS=1000."""
    entries: list[tuple[str, str]] = []
    for line in text.splitlines():
        if re.match(r"^  -", line):
            invocation, _, help_text = line.strip().partition("  ")
            entries.append((invocation, help_text.strip()))
        elif entries and line.startswith("    ") and not line.strip().startswith("-"):
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {line.strip()}".strip())
    return entries


def _all_helps(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    monkeypatch.setenv("COLUMNS", "1000")
    argvs = [*HELPS, ["quickstart", "--help"], ["train", "--help-all"], ["compare", "--help-all"]]
    argvs += [["train", "--method", m, "--help"] for m in method_specs()]
    texts = {}
    for argv in argvs:
        with pytest.raises(SystemExit):
            main(argv)
        texts[" ".join(argv)] = capsys.readouterr().out
    return texts


def test_help_has_no_markup_and_no_cut_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, text in _all_helps(monkeypatch, capsys).items():
        assert not MARKUP.search(text), (argv, MARKUP.search(text))
        for option, help_text in _entries(text):
            core = NOTE.sub("", help_text).rstrip()
            if not core:
                continue
            last = core.split()[-1].lower()
            assert last not in CUT and not core.endswith((",", ":", ";", "(", "[")), (argv, option, core)
            opened = core.count("(") + core.count("[")  # "[0, 1)" is an interval: count both kinds together
            assert opened == core.count(")") + core.count("]"), (argv, option, core)


def test_the_scan_finds_a_cut_sentence_and_markup() -> None:
    cut = "  --lora_dropout X   Dropout on the adapter's input, in (recipe: 0.1)"
    ((_, help_text),) = _entries(cut)
    assert NOTE.sub("", help_text).split()[-1] in CUT
    assert MARKUP.search("handled by ``dora`` (:mod:`deltatune.methods.dora`)")


# ---- suggestions ----------------------------------------------------------------------------------------
def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("deltatune: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("--lr", "--learning_rate"),
        ("--batch_size", "--per_device_train_batch_size"),
        ("--epochs", "--num_train_epochs"),
    ],
)
def test_borrowed_spellings_suggest_the_option(
    typed: str, meant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", typed, "1"]) == 2
    line = _one_line(capsys)
    assert f"unknown option {typed!r}; did you mean {meant}?" in line


def test_mistyped_command_suggests_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["trian"])
    assert done.value.code == 2
    assert "unknown command 'trian'; did you mean 'train'?" in _one_line(capsys)
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--adapter"])
    assert done.value.code == 2
    assert "--adapter: expected one argument" in _one_line(capsys)


@pytest.mark.parametrize(("typed", "method"), [("LoRA", "lora"), ("DoRA", "dora"), ("AdaLoRA", "adalora")])
def test_method_names_in_any_case(typed: str, method: str, tmp_path: Path) -> None:
    from deltatune.cli.run_args import parse_run

    parsed = parse_run("train", ["--method", typed, "--output_dir", str(tmp_path)])
    assert parsed.options.method == method
    compared = parse_run("compare", ["--methods", typed, "LOHA", "--output_dir", str(tmp_path)])
    assert compared.options.methods == [method, "loha"]
    with pytest.raises(CommandError, match="invalid choice: 'lorra'; did you mean 'lora'"):
        parse_run("train", ["--method", "LoRRA"])


def test_the_help_benchmark_runs() -> None:
    results = cli_help.main(["--rounds", "1", "--stub-registry"])
    assert set(results) == {"python -c 'import torch'", *("deltatune " + " ".join(h) for h in cli_help.HELPS)}
    assert all(r["cpu_s"] > 0 for r in results.values())


def test_a_bad_value_names_the_option_once() -> None:
    from deltatune.cli.run_args import parse_run

    with pytest.raises(CommandError, match=r"^argument --max_train_samples: must be at least 1, got 0 \(see"):
        parse_run("train", ["--max_train_samples", "0"])  # not "--max_train_samples/--max-train-samples"


def test_whole_number_options_reach_the_run_record_as_its_json_has_them(tmp_path: Path) -> None:
    import json

    from deltatune.cli.run_args import parse_run, run_spec
    from deltatune.tasks.run_spec import run_record

    argv = ["--max_train_samples", "64", "--num_threads", "2", "--output_dir", str(tmp_path)]
    parsed = parse_run("train", argv)
    record = run_record(run_spec(parsed, "lora"), parsed.training_args)
    assert parsed.options.num_threads == 2 and record["max_train_samples"] == 64
    assert json.loads(json.dumps(record)) == record  # a rerun compares the saved record with a new one


def test_the_help_parser_reads_argv_in_order_and_leaves_help_all_to_the_run_parser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(HelpAllElsewhere):
        build_help_parser("train").parse_known_args(["--help-all"])
    with pytest.raises(SystemExit) as done:
        main(["train", "--help", "--method", "lorra"])
    assert done.value.code == 0 and "usage: deltatune train" in capsys.readouterr().out
    assert (
        main(["train", "--method", "lorra", "--help"]) == 2
    )  # a mistake before --help, as argparse reads it
    assert "invalid choice: 'lorra'; did you mean 'lora'?" in capsys.readouterr().err
