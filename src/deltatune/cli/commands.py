"""The commands behind ``deltatune <command>``: parse → build → call library functions → print for people."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .output import console

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

    table = Table(title=title)
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
            str(r["name"]),
            f"{r['trainable_params']:,}",
            f"{r['trainable_percent']:.2f}",
            f"{r['accuracy']:.4f}",
            "-" if top5 is None else f"{top5:.4f}",
            f"{r['train_time_s']:.1f}",
            f"{r['peak_memory_mb']:.0f}",
        )
    return table


def train(argv: list[str]) -> int:
    from ..tasks.image_classification import run_training
    from ..train.outputs import prepare_output_dir
    from .run_args import check_hub_access, parse_run, run_spec

    parsed = parse_run("train", argv)
    args = parsed.training_args
    out = str(args.output_dir)
    spec = run_spec(parsed, parsed.options.method)
    if parsed.push_to_hub:
        check_hub_access(args.hub_model_id)
    main_process = args.process_index == 0  # torchrun / accelerate launch: rank 0 checks, cleans, reports
    with args.main_process_first(desc="preparing the output directory"):
        args.resume_from_checkpoint = prepare_output_dir(
            out,
            spec.identity(),
            parsed.options.overwrite_output_dir,
            args.resume_from_checkpoint,
            main_process,
        )
    screen = console()
    if main_process:
        screen.print(
            f"[bold]deltatune train[/] {spec.name} · model {parsed.model} · dataset {parsed.dataset} · "
            f"recipe {parsed.recipe} · output {out}"
        )
    loader_flags = (
        "--dataloader_num_workers",
        "--dataloader_persistent_workers",
        "--dataloader_prefetch_factor",
    )
    result = run_training(
        spec,
        args,
        num_threads=parsed.options.num_threads,
        precision=parsed.options.precision,
        dataloader="keep" if any(a.split("=", 1)[0] in loader_flags for a in argv) else "auto",
    )
    if not main_process:
        return 0
    screen.print(_metrics_table([result.metrics], f"{spec.name} on {parsed.dataset}"))
    if result.metrics.get("ranks"):
        screen.print(f"final ranks (allocated during training): {result.metrics['ranks']}")
    written = sorted(n for n in os.listdir(out) if not n.startswith("checkpoint-"))
    screen.print(f"wrote {out}/: {', '.join(written)}")
    if parsed.push_to_hub:
        from huggingface_hub import HfApi

        repo = args.hub_model_id or os.path.basename(os.path.abspath(out))
        api = HfApi(token=args.hub_token)
        api.create_repo(repo, private=args.hub_private_repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=out, ignore_patterns=["checkpoint-*", "*.tmp*"])
        screen.print(f"pushed the adapter to https://huggingface.co/{repo}")
    return 0


def compare(argv: list[str]) -> int:
    from .._files import write_json
    from ..tasks.compare import compare_markdown, compare_runs, plan_runs, write_compare
    from ..train.outputs import RUN_RECORD_NAME, prepare_output_dir
    from .run_args import parse_run, run_spec

    parsed = parse_run("compare", argv)
    args = parsed.training_args
    out = str(args.output_dir)
    o = parsed.options
    prepare_output_dir(out, {"kind": "compare"}, o.overwrite_output_dir, None)
    os.makedirs(out, exist_ok=True)
    write_json(
        os.path.join(out, RUN_RECORD_NAME),
        {"kind": "compare", "model": parsed.model, "dataset": parsed.dataset},
    )
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
    print(compare_markdown(rows, title))
    console().print(f"wrote {', '.join(paths)}")
    return 0


# ---- evaluate / predict / merge -----------------------------------------------------------------
def evaluate(args: argparse.Namespace) -> int:
    from .._files import write_json
    from ..tasks.inference import evaluate_adapter, load_trained
    from ..tasks.report import confusion_plot
    from ..vision import load_image_dataset

    trained = load_trained(args.adapter, args.model)
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

    table = Table(title=f"{args.adapter} on {dataset} ({report.num_examples} images)")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, value in report.per_class_accuracy.items():
        table.add_row(name, f"{value:.4f}")
    screen = console()
    screen.print(table)
    top5 = "" if report.top5_accuracy is None else f" · top-5 {report.top5_accuracy:.4f}"
    screen.print(
        f"[bold]accuracy {report.accuracy:.4f}[/]{top5} · wrote {out}/eval_results.json, confusion_matrix.png"
    )
    return 0


def predict(args: argparse.Namespace) -> int:
    from ..tasks.inference import collect_images, load_trained, predict_images

    images = collect_images(args.images)
    trained = load_trained(args.adapter, args.model)
    results = predict_images(
        trained, images, top_k=args.top_k, batch_size=args.batch_size, progress=not args.json
    )
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from rich.table import Table

    table = Table(title=f"predictions ({args.adapter})")
    table.add_column("image", overflow="fold")
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("label", overflow="fold")
    table.add_column("probability", justify="right", no_wrap=True)
    for item in results:
        for rank, pred in enumerate(item["predictions"], start=1):
            table.add_row(
                item["image"] if rank == 1 else "", str(rank), pred["label"], f"{pred['score']:.4f}"
            )
    console().print(table)
    return 0


def merge(args: argparse.Namespace) -> int:
    from ..tasks.inference import load_trained, merge_adapter

    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise ValueError(f"--output {args.output!r} is not empty; pass --overwrite to write into it")
    trained = load_trained(args.adapter, args.model)
    merge_adapter(trained, args.output)
    console().print(
        f"merged {args.adapter} into {args.output}: load it with "
        f'transformers.pipeline("image-classification", model="{args.output}")'
    )
    return 0
