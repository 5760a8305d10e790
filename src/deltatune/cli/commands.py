"""The commands behind ``deltatune <command>``: parse → build → call library functions → print for people."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import sys
from typing import Any

from .errors import printable
from .output import console, esc, stderr_is_terminal

__all__ = ["compare", "evaluate", "merge", "predict", "quickstart", "train"]

#: Loader flags whose presence means the user chose the DataLoader settings (no automatic workers).
LOADER_FLAGS = ("--dataloader_num_workers", "--dataloader_persistent_workers", "--dataloader_prefetch_factor")


# ---- quickstart ---------------------------------------------------------------------------------
def quickstart(args: argparse.Namespace) -> int:
    """Applies each registered method at the guide's settings to a ViT-base-shaped model and prints what
    trains."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from ..model import get_peft_model
    from ..registry import available_methods, get_method
    from ..tasks.image_classification import adapter_defaults

    for name in available_methods():
        spec = get_method(name)
        config = spec.make_config(**adapter_defaults(name, "classifier"))
        torch.manual_seed(0)
        model = ViTForImageClassification(ViTConfig(num_labels=args.num_labels))  # type: ignore[call-arg]
        peft_model = get_peft_model(model, config)
        print(f"{name:8s}", end=" ")
        peft_model.print_trainable_parameters()
    return 0


# ---- train / compare ----------------------------------------------------------------------------
def _metrics_table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=esc(title))
    for column in (
        "method",
        "trainable params",
        "%",
        "accuracy",
        "top-5",
        "train time (s)",
        "peak memory (MiB)",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in rows:
        top5 = r.get("top5_accuracy")
        table.add_row(
            esc(r["name"]),
            f"{r['trainable_params']:,}",
            f"{r['trainable_percent']:.2f}",
            f"{r['accuracy']:.4f}",
            "-" if top5 is None else f"{top5:.4f}",
            f"{r['train_time_s']:.1f}",
            "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}",
        )
    return table


def _written(out: str) -> str:
    """The files a run left in ``out`` (not its checkpoints), for the closing line."""
    names = sorted(
        n
        for n in os.listdir(out)
        if not n.startswith(("checkpoint-", ".")) and os.path.isfile(os.path.join(out, n))
    )
    return ", ".join(names)


def _skipped_line(metrics: dict[str, Any]) -> str:
    """The evaluation images a run could not read, every one named (up to 10), as ``evaluate`` says them."""
    names = list(metrics.get("skipped_images") or [])
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    return (
        f"skipped {metrics['eval_skipped']} unreadable evaluation image(s){': ' + shown if shown else ''} (not "
        "counted in eval_samples; listed in eval_results.json)"
    )


def train(argv: list[str]) -> int:
    from ..tasks.image_classification import run_record, run_training
    from ..tasks.run_spec import upgrade_record
    from ..train.lock import run_lock
    from ..train.outputs import prepare_output_dir
    from .output import EpochReporter, run_log
    from .run_args import check_hub_access, check_sources, parse_run, run_spec

    parsed = parse_run("train", argv)
    check_sources(parsed, argv)  # the model first: a wrong --model is named before any data loads
    args = parsed.training_args
    out = str(args.output_dir)
    spec = run_spec(parsed, parsed.options.method)
    if parsed.push_to_hub:
        check_hub_access(args.hub_model_id)
    main_process = args.process_index == 0  # torchrun / accelerate launch: rank 0 locks, checks, reports
    record = run_record(spec, args, parsed.options.precision)  # once: checks the folder, then is written
    screen = console()
    with run_lock(out, enabled=main_process):  # one run per folder, for the whole run
        with args.main_process_first(desc="preparing the output directory"):
            args.resume_from_checkpoint = prepare_output_dir(
                out,
                record,
                parsed.options.overwrite_output_dir,
                args.resume_from_checkpoint,
                main_process,
                upgrade=upgrade_record,
            )
        with run_log(out, enabled=main_process):
            if main_process:
                screen.print(
                    printable(
                        f"deltatune train {spec.name} · model {parsed.model} · dataset {parsed.dataset} · "
                        f"recipe {parsed.recipe} · output {out}"
                    ),
                    markup=False,
                    style="bold",
                )
            try:
                result = run_training(
                    spec,
                    args,
                    command=parsed.command,
                    num_threads=parsed.options.num_threads,
                    precision=parsed.options.precision,
                    progress=EpochReporter(screen),
                    do_train=bool(args.do_train),
                    do_eval=bool(args.do_eval),
                    dataloader="keep" if any(a.split("=", 1)[0] in LOADER_FLAGS for a in argv) else "auto",
                    fit_batch_to_data=parsed.batch_from_recipe,
                    trust_remote_code=parsed.options.trust_remote_code,
                    record=record,  # the one computed before the folder was prepared
                )
            except KeyboardInterrupt:
                from .errors import RunInterrupted, resume_hint

                raise RunInterrupted(resume_hint(argv, out)) from None
            except OSError as err:  # a full disk mid-run: the checkpoints saved so far are complete
                from .errors import DiskFull, describe_error, resume_hint

                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise DiskFull(f"{describe_error(err)[0]}; {resume_hint(argv, out)}") from err
            if not main_process:
                return 0
            screen.print(_metrics_table([result.metrics], f"{spec.name} on {parsed.dataset}"))
            if result.metrics.get("eval_skipped"):
                screen.print(printable(_skipped_line(result.metrics)), markup=False)
            if result.metrics.get("ranks"):
                screen.print(
                    printable(f"final ranks (allocated during training): {result.metrics['ranks']}"),
                    markup=False,
                )
            screen.print(printable(f"wrote {out}/: {_written(out)}"), markup=False)
            if os.path.isfile(os.path.join(out, "report.html")):
                screen.print(
                    printable(
                        f"open {os.path.join(out, 'report.html')} in a browser for the curves, the confusion "
                        "matrix and the mistakes"
                    ),
                    markup=False,
                )
    if parsed.push_to_hub:
        from huggingface_hub import HfApi

        repo = args.hub_model_id or os.path.basename(os.path.abspath(out))
        api = HfApi(token=args.hub_token)
        api.create_repo(repo, private=args.hub_private_repo, exist_ok=True)
        api.upload_folder(
            repo_id=repo,
            folder_path=out,
            ignore_patterns=["checkpoint-*", "*.tmp*", ".tmp-*", "train.log", ".deltatune.lock"],
        )
        screen.print(printable(f"pushed the adapter to https://huggingface.co/{repo}"), markup=False)
    return 0


def compare(argv: list[str]) -> int:
    from ..train.lock import RunLock
    from ..train.outputs import prepare_output_dir, training_identity, write_run_record
    from ..train.signals import sigterm_as_interrupt
    from .init_options import variant_dests
    from .run_args import check_sources, parse_run

    parsed = parse_run("compare", argv)
    check_sources(parsed, argv)
    args = parsed.training_args
    out = str(args.output_dir)
    o = parsed.options
    if args.resume_from_checkpoint:
        raise ValueError("deltatune compare does not resume; drop --resume_from_checkpoint")
    record = {
        "kind": "compare",
        "model": parsed.model,
        "dataset": parsed.dataset,
        "methods": list(dict.fromkeys(o.methods)),  # a method given twice runs once
        "baselines": list(o.baselines),
        **{d: getattr(o, d) for d in variant_dests() if getattr(o, d, None) is not None},
        "training": training_identity(args),
    }
    # one writer per folder, released when compare returns or fails; SIGTERM unwinds it like Ctrl-C (as
    # `train` gets it through run_lock)
    with sigterm_as_interrupt(), RunLock(out):
        prepare_output_dir(out, record, o.overwrite_output_dir, None)
        write_run_record(out, record, "running")
        _compare_runs(parsed, out)
        write_run_record(out, record, "finished")
    return 0


def _compare_runs(parsed: Any, out: str) -> None:
    from ..tasks.compare import compare_runs, plan_runs, write_compare
    from .init_options import compare_variants, variant_dests
    from .output import EpochReporter, OnceFilter, run_log
    from .run_args import run_spec

    args, o = parsed.training_args, parsed.options
    common = dataclasses.replace(  # the options that take several values are the variants, not common
        parsed, options=argparse.Namespace(**{k: v for k, v in vars(o).items() if k not in variant_dests()})
    )
    runs = plan_runs(
        lambda m, **kw: run_spec(common, m, strict=False, **kw),
        o.methods,
        o.baselines,
        lambda m: compare_variants(m, o),
    )
    screen = console()
    package_logger = logging.getLogger("deltatune")

    once = OnceFilter()  # the warm-up and the first run explain the same choices: once is enough

    def reporter(index: int, spec: Any) -> Any:
        if index == 1:  # the choices were explained for the first run; train.log keeps every run's
            for handler in package_logger.handlers:
                handler.setLevel(max(handler.level, logging.WARNING))
        return EpochReporter(screen, title=f"[{index + 1}/{len(runs)}] {spec.name}", header=index == 0)

    with run_log(out):
        screen.print(
            printable(
                f"deltatune compare · {len(runs)} runs · model {parsed.model} · dataset {parsed.dataset} · "
                f"output {out}"
            ),
            markup=False,
            style="bold",
        )
        levels = [h.level for h in package_logger.handlers]
        for handler in package_logger.handlers:
            handler.addFilter(once)
        try:
            rows = compare_runs(
                runs,
                args,
                full_learning_rate=o.full_learning_rate,
                num_threads=o.num_threads,
                precision=o.precision,
                reporter=reporter,
            )
        finally:
            for handler, level in zip(package_logger.handlers, levels, strict=False):
                handler.setLevel(level)
                handler.removeFilter(once)
        title = f"{os.path.basename(parsed.model.rstrip('/'))} on {parsed.dataset}, seed {args.seed}"
        screen.print(_metrics_table(rows, title))
        paths = write_compare(rows, out, title)
        screen.print(printable(f"wrote {', '.join(paths)} (the table as markdown: {paths[0]})"), markup=False)


# ---- evaluate / predict / merge -----------------------------------------------------------------
def _load(args: argparse.Namespace) -> Any:
    """The trained adapter of ``--adapter``, its base model checked first as ``train`` checks ``--model``:
    a hub id that is neither cached nor reachable fails within seconds, in one line."""
    from ..tasks.inference import base_model_source, load_trained
    from .checks import check_model_source

    base, flag = base_model_source(args.adapter, args.model)
    if not os.path.isabs(base):  # a missing absolute folder gets load_trained's own message
        check_model_source(base, flag)
    return load_trained(args.adapter, args.model, trust_remote_code=args.trust_remote_code)


def evaluate(args: argparse.Namespace) -> int:
    from ..tasks.evaluation import evaluation_data, results_folder, write_evaluation
    from ..tasks.inference import evaluate_adapter
    from ..tasks.plots import confusion_plot
    from ..train.lock import RunLock
    from .checks import check_dataset_source, check_folder, check_writable

    check_folder(args.validation_dir, "--validation_dir")
    if args.dataset is not None:
        check_dataset_source(args.dataset, "--dataset")
    out = results_folder(args.adapter, args.output_dir, args.overwrite)  # refuses before any work
    check_writable(out, "--output_dir")
    with RunLock(out):  # one evaluation per results folder: another's files are never mixed in
        trained = _load(args)
        recorded = trained.record.get("dataset")
        if args.dataset is None and args.validation_dir is None and isinstance(recorded, str):
            check_dataset_source(recorded, f"the adapter's dataset (deltatune_run.json in {args.adapter})")
        labels = [trained.id2label[i] for i in range(len(trained.id2label))]
        data = evaluation_data(
            labels,
            trained.record,
            args.dataset,
            args.validation_dir,
            image_column=args.image_column,
            label_column=args.label_column,
            validation_split=args.validation_split,
            max_eval_samples=args.max_eval_samples,
        )
        screen = console()
        screen.print(printable(f"scoring {data.description}"), markup=False)
        result = evaluate_adapter(
            trained,
            data.rows,
            batch_size=args.batch_size,
            progress=stderr_is_terminal(),
            num_threads=args.num_threads,
        )
        report = result.report
        results: dict[
            str, Any
        ] = {  # a training run's eval_results.json schema (transformers' keys, then details)
            "eval_loss": result.loss,
            "eval_accuracy": report.accuracy,
            "eval_samples": report.num_examples,
            "eval_skipped": len(result.skipped),
            "dataset": data.dataset,
            "per_class_accuracy": report.per_class_accuracy,
            "confusion_matrix": report.confusion.tolist(),
            "class_names": report.class_names,
        }
        if report.top5_accuracy is not None:  # as a run's file: present only with more than five classes
            results["eval_top5_accuracy"] = report.top5_accuracy
        if result.skipped:
            results["skipped_images"] = result.skipped
        notes = report.to_dict().get("notes")  # why a value is null (strict JSON has no NaN)
        if notes:
            results["notes"] = notes
        write_evaluation(out, results, args.adapter)
        confusion_plot(report.confusion, report.class_names, os.path.join(out, "confusion_matrix.png"))
        from rich.table import Table

        table = Table(title=esc(f"{args.adapter} on {data.dataset} ({report.num_examples} images)"))
        table.add_column("class")
        table.add_column("accuracy", justify="right")
        for name, value in report.per_class_accuracy.items():
            table.add_row(esc(name), f"{value:.4f}" if value == value else "no images")
        screen.print(table)
        if result.skipped:
            shown = ", ".join(result.skipped[:3]) + (" ..." if len(result.skipped) > 3 else "")
            screen.print(
                printable(
                    f"skipped {len(result.skipped)} unreadable image(s): {shown} (listed in eval_results.json)"
                ),
                markup=False,
            )
        top5 = "" if report.top5_accuracy is None else f" · top-5 {report.top5_accuracy:.4f}"
        screen.print(
            printable(
                f"accuracy {report.accuracy:.4f}{top5} · wrote {out}/eval_results.json, all_results.json, "
                "confusion_matrix.png"
            ),
            markup=False,
        )
        return 0


def _require_stdout() -> None:
    """Refuses, before any work, to print results into a closed standard output (``>&-``: Python's
    ``sys.stdout`` is None then), as an output failure."""
    if sys.stdout is None or sys.stdout.closed:
        import errno

        raise OSError(errno.EBADF, "cannot write to standard output (it is closed); redirect it to a file")


def predict(args: argparse.Namespace) -> int:
    from .._files import strict_json
    from ..tasks.inference import collect_images, predict_images

    _require_stdout()
    images = collect_images(args.images)
    trained = _load(args)
    results = predict_images(
        trained,
        images,
        top_k=args.top_k,
        batch_size=args.batch_size,
        progress=not args.json and stderr_is_terminal(),
        num_threads=args.num_threads,
    )
    if args.json:
        json.dump(strict_json(results), sys.stdout, indent=2, allow_nan=False, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    from rich.table import Table

    table = Table(title=esc(f"predictions ({args.adapter})"))
    table.add_column("image", overflow="fold")
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("label", overflow="fold")
    table.add_column("probability", justify="right", no_wrap=True)
    for item in results:
        for rank, pred in enumerate(item["predictions"], start=1):
            table.add_row(
                esc(item["image"]) if rank == 1 else "", str(rank), esc(pred["label"]), f"{pred['score']:.4f}"
            )
    console().print(table)
    return 0


def merge(args: argparse.Namespace) -> int:
    from ..tasks.merge import check_merge_output, merge_adapter
    from .checks import check_writable

    check_merge_output(args.adapter, args.output, args.overwrite, args.model)
    check_writable(args.output, "--output", beside=True)  # the model is built beside it, then moved in
    trained = _load(args)
    merge_adapter(trained, args.output, overwrite=args.overwrite, base_model=args.model)
    console().print(
        printable(
            f"merged {args.adapter} into {args.output}: load it with "
            f'transformers.pipeline("image-classification", model={args.output!r})'
        ),
        markup=False,
    )
    return 0
