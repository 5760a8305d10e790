"""The commands behind ``deltatune <command>``: parse → build → call library functions → print for people."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .output import console, esc

__all__ = ["compare", "evaluate", "merge", "predict", "quickstart", "train"]


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
            f"{r['peak_memory_mb']:.0f}",
        )
    return table


def train(argv: list[str]) -> int:
    from ..tasks.image_classification import run_record, run_training
    from ..train.lock import run_lock
    from ..train.outputs import prepare_output_dir
    from .run_args import check_hub_access, parse_run, run_spec

    parsed = parse_run("train", argv)
    args = parsed.training_args
    out = str(args.output_dir)
    spec = run_spec(parsed, parsed.options.method)
    if parsed.push_to_hub:
        check_hub_access(args.hub_model_id)
    # torchrun / accelerate launch: rank 0 locks, checks, cleans, reports
    main_process = args.process_index == 0
    record = run_record(spec, args, parsed.options.precision)
    with run_lock(out, enabled=main_process):
        with args.main_process_first(desc="preparing the output directory"):
            args.resume_from_checkpoint = prepare_output_dir(
                out,
                record,
                parsed.options.overwrite_output_dir,
                args.resume_from_checkpoint,
                main_process,
            )
        screen = console()
        if main_process:
            screen.print(
                f"[bold]deltatune train[/] {esc(spec.name)} · model {esc(parsed.model)} · dataset "
                f"{esc(parsed.dataset)} · recipe {parsed.recipe} · output {esc(out)}"
            )
        try:
            result = run_training(
                spec,
                args,
                num_threads=parsed.options.num_threads,
                precision=parsed.options.precision,
                fit_batch_to_data=parsed.batch_from_recipe,
                trust_remote_code=parsed.options.trust_remote_code,
            )
        except KeyboardInterrupt:
            from .errors import RunInterrupted, resume_hint

            raise RunInterrupted(resume_hint(argv, out)) from None
    if not main_process:
        return 0
    screen.print(_metrics_table([result.metrics], f"{spec.name} on {parsed.dataset}"))
    if result.metrics.get("ranks"):
        screen.print(f"final ranks (allocated during training): {esc(result.metrics['ranks'])}")
    written = sorted(n for n in os.listdir(out) if not n.startswith("checkpoint-"))
    screen.print(f"wrote {esc(out)}/: {esc(', '.join(written))}")
    if parsed.push_to_hub:
        from huggingface_hub import HfApi

        repo = args.hub_model_id or os.path.basename(os.path.abspath(out))
        api = HfApi(token=args.hub_token)
        api.create_repo(repo, private=args.hub_private_repo, exist_ok=True)
        api.upload_folder(
            repo_id=repo, folder_path=out, ignore_patterns=["checkpoint-*", "*.tmp*", ".deltatune.lock"]
        )
        screen.print(f"pushed the adapter to https://huggingface.co/{esc(repo)}")
    return 0


def compare(argv: list[str]) -> int:
    from ..tasks.compare import compare_markdown, compare_runs, plan_runs, write_compare
    from ..train.lock import run_lock
    from ..train.outputs import prepare_output_dir, training_identity, write_run_record
    from .run_args import parse_run, run_spec

    parsed = parse_run("compare", argv)
    args = parsed.training_args
    out = str(args.output_dir)
    o = parsed.options
    record = {
        "kind": "compare",
        "model": parsed.model,
        "dataset": parsed.dataset,
        "methods": list(o.methods),
        "baselines": list(o.baselines),
        "training": training_identity(args),
    }
    with run_lock(out):
        if args.resume_from_checkpoint:
            raise ValueError("deltatune compare does not resume; drop --resume_from_checkpoint")
        prepare_output_dir(out, record, o.overwrite_output_dir, None)
        os.makedirs(out, exist_ok=True)
        write_run_record(out, record, "running")
        runs = plan_runs(lambda m, **kw: run_spec(parsed, m, strict=False, **kw), o.methods, o.baselines)
        rows = compare_runs(
            runs,
            args,
            full_learning_rate=o.full_learning_rate,
            num_threads=o.num_threads,
            precision=o.precision,
        )
        title = f"{os.path.basename(parsed.model.rstrip('/'))} on {parsed.dataset}, seed {args.seed}"
        console().print(_metrics_table(rows, title))
        paths = write_compare(rows, out, title)
        write_run_record(out, record, "finished")
    from .errors import printable

    print(printable(compare_markdown(rows, title)))
    console().print(f"wrote {esc(', '.join(paths))}")
    return 0


# ---- evaluate / predict / merge -----------------------------------------------------------------
def evaluate(args: argparse.Namespace) -> int:
    from .._files import write_json
    from ..tasks.inference import evaluate_adapter, load_trained
    from ..tasks.report import confusion_plot
    from ..vision import load_image_dataset

    trained = load_trained(args.adapter, args.model, trust_remote_code=args.trust_remote_code)
    record = trained.record
    dataset = args.dataset or record.get("dataset")
    if not dataset:
        raise ValueError(f"{args.adapter} has no run record naming its dataset; pass --dataset")
    bundle = load_image_dataset(
        dataset,
        image_column=args.image_column or record.get("image_column"),
        label_column=args.label_column or record.get("label_column"),
        validation_split=record.get("validation_split", 0.1)
        if args.validation_split is None
        else args.validation_split,
        seed=int(record.get("seed", 42)),
        max_eval_samples=args.max_eval_samples,
    )
    if bundle.num_labels != len(trained.id2label):
        raise ValueError(
            f"{dataset!r} has {bundle.num_labels} classes but the adapter was trained on {len(trained.id2label)}"
        )
    report = evaluate_adapter(trained, bundle.eval, batch_size=args.batch_size)
    out = args.output_dir or args.adapter
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "eval_results.json"), {"dataset": dataset, **report.to_dict()})
    confusion_plot(report.confusion, report.class_names, os.path.join(out, "confusion_matrix.png"))
    from rich.table import Table

    table = Table(title=esc(f"{args.adapter} on {dataset} ({report.num_examples} images)"))
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, value in report.per_class_accuracy.items():
        table.add_row(esc(name), f"{value:.4f}")
    screen = console()
    screen.print(table)
    top5 = "" if report.top5_accuracy is None else f" · top-5 {report.top5_accuracy:.4f}"
    screen.print(
        f"[bold]accuracy {report.accuracy:.4f}[/]{top5} · wrote {esc(out)}/eval_results.json, confusion_matrix.png"
    )
    return 0


def predict(args: argparse.Namespace) -> int:
    from .._files import strict_json
    from ..tasks.inference import collect_images, load_trained, predict_images

    images = collect_images(args.images)
    trained = load_trained(args.adapter, args.model, trust_remote_code=args.trust_remote_code)
    results = predict_images(
        trained, images, top_k=args.top_k, batch_size=args.batch_size, progress=not args.json
    )
    if args.json:
        json.dump(strict_json(results), sys.stdout, indent=2, allow_nan=False)
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
    from ..tasks.inference import check_merge_output, load_trained, merge_adapter

    check_merge_output(args.adapter, args.output, args.overwrite)
    trained = load_trained(args.adapter, args.model, trust_remote_code=args.trust_remote_code)
    merge_adapter(trained, args.output)
    console().print(
        f"merged {esc(args.adapter)} into {esc(args.output)}: load it with "
        f'transformers.pipeline("image-classification", model={esc(repr(args.output))})'
    )
    return 0
