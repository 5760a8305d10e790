"""The ``deltatune`` command line: thin parsing over library calls.

deltatune train                        # offline default: bundled digits + bundled pretrained ViT
deltatune train --method adalora --model google/vit-base-patch16-224-in21k --dataset food101
deltatune evaluate --adapter DIR       deltatune predict IMG_OR_DIR... --adapter DIR [--json]
deltatune merge --adapter DIR --output DIR
deltatune compare                      # every method + linear probe, full fine-tuning, random backbone
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

COMMANDS = ("train", "evaluate", "predict", "merge", "compare", "quickstart")


def _console() -> Any:
    from rich.console import Console

    return Console()


def _setup_logging(verbose: bool = True) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[deltatune] %(message)s"))
    root = logging.getLogger("deltatune")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_warning()


# ---- quickstart ---------------------------------------------------------------------------------
def _quickstart(args: argparse.Namespace) -> int:
    """Applies each method at the guide's settings to a ViT-base-shaped model and prints what trains."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from . import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

    common: dict[str, Any] = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
    configs = {
        "lora": LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, **common),
        "loha": LoHaConfig(r=16, alpha=16, module_dropout=0.1, **common),
        "lokr": LoKrConfig(r=16, alpha=16, module_dropout=0.1, **common),
        "adalora": AdaLoraConfig(init_r=12, target_r=8, tinit=200, tfinal=1000, deltaT=10, **common),
    }
    for name, config in configs.items():
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


def _train(argv: list[str]) -> int:
    from .train.commands import check_hub_access, parse_run, prepare_output_dir, run_spec
    from .train.recipe import run_training

    parsed = parse_run("train", argv)
    args = parsed.training_args
    out = str(args.output_dir)
    spec = run_spec(parsed, parsed.options.method)
    if parsed.push_to_hub:
        check_hub_access(args.hub_model_id)
    main_process = args.process_index == 0  # torchrun / accelerate launch: rank 0 checks, cleans, reports
    with args.main_process_first(desc="preparing the output directory"):
        args.resume_from_checkpoint = prepare_output_dir(
            out, spec, parsed.options.overwrite_output_dir, args.resume_from_checkpoint, main_process
        )
    console = _console()
    if main_process:
        console.print(
            f"[bold]deltatune train[/] {spec.name} · model {parsed.model} · dataset {parsed.dataset} · "
            f"recipe {parsed.recipe} · output {out}"
        )
    result = run_training(
        spec, args, num_threads=parsed.options.num_threads, precision=parsed.options.precision
    )
    if not main_process:
        return 0
    console.print(_metrics_table([result.metrics], f"{spec.name} on {parsed.dataset}"))
    if result.metrics.get("ranks"):
        console.print(f"AdaLoRA final ranks: {result.metrics['ranks']}")
    written = sorted(n for n in os.listdir(out) if not n.startswith("checkpoint-"))
    console.print(f"wrote {out}/: {', '.join(written)}")
    if parsed.push_to_hub:
        from huggingface_hub import HfApi

        repo = args.hub_model_id or os.path.basename(os.path.abspath(out))
        api = HfApi(token=args.hub_token)
        api.create_repo(repo, private=args.hub_private_repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=out, ignore_patterns=["checkpoint-*", "*.tmp*"])
        console.print(f"pushed the adapter to https://huggingface.co/{repo}")
    return 0


def _compare(argv: list[str]) -> int:
    from .train.commands import parse_run, prepare_output_dir, run_spec
    from .train.compare import compare_markdown, compare_runs, plan_runs, write_compare

    parsed = parse_run("compare", argv)
    args = parsed.training_args
    out = str(args.output_dir)
    o = parsed.options
    prepare_output_dir(out, None, o.overwrite_output_dir, None)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "deltatune_run.json"), "w", encoding="utf-8") as fh:
        json.dump({"kind": "compare", "model": parsed.model, "dataset": parsed.dataset}, fh)
    runs = plan_runs(lambda m, **kw: run_spec(parsed, m, strict=False, **kw), o.methods, o.baselines)
    rows = compare_runs(
        runs,
        args,
        full_learning_rate=o.full_learning_rate,
        num_threads=o.num_threads,
        precision=o.precision,
    )
    title = f"{os.path.basename(parsed.model.rstrip('/'))} on {parsed.dataset}, seed {args.seed}"
    _console().print(_metrics_table(rows, title))
    paths = write_compare(rows, out, title)
    print(compare_markdown(rows, title))
    _console().print(f"wrote {', '.join(paths)}")
    return 0


# ---- evaluate / predict / merge -----------------------------------------------------------------
def _evaluate(args: argparse.Namespace) -> int:
    from .train.inference import evaluate_adapter, load_trained
    from .train.report import confusion_plot
    from .vision import load_image_dataset

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
    with open(os.path.join(out, "eval_results.json"), "w", encoding="utf-8") as fh:
        json.dump({"dataset": dataset, **report.to_dict()}, fh, indent=2)
    confusion_plot(report.confusion, report.class_names, os.path.join(out, "confusion_matrix.png"))
    from rich.table import Table

    table = Table(title=f"{args.adapter} on {dataset} ({report.num_examples} images)")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, value in report.per_class_accuracy.items():
        table.add_row(name, f"{value:.4f}")
    console = _console()
    console.print(table)
    top5 = "" if report.top5_accuracy is None else f" · top-5 {report.top5_accuracy:.4f}"
    console.print(
        f"[bold]accuracy {report.accuracy:.4f}[/]{top5} · wrote {out}/eval_results.json, confusion_matrix.png"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .train.inference import collect_images, load_trained, predict_images

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
    _console().print(table)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .train.inference import load_trained, merge_adapter

    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise ValueError(f"--output {args.output!r} is not empty; pass --overwrite to write into it")
    trained = load_trained(args.adapter, args.model)
    merge_adapter(trained, args.output)
    _console().print(
        f"merged {args.adapter} into {args.output}: load it with "
        f'transformers.pipeline("image-classification", model="{args.output}")'
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Parameter-efficient fine-tuning: LoRA, LoHa, LoKr, AdaLoRA",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    sub.add_parser("train", help="fine-tune with an adapter (see `deltatune train --help`)", add_help=False)
    sub.add_parser(
        "compare",
        help="methods vs baselines on the same data (see `deltatune compare --help`)",
        add_help=False,
    )
    for name, func, text in (
        ("evaluate", _evaluate, "accuracy, top-5, per-class accuracy and a confusion matrix of an adapter"),
        ("predict", _predict, "top-k labels of images with a trained adapter"),
        ("merge", _merge, "fold an adapter into its base model and save a standalone transformers model"),
    ):
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        p.set_defaults(func=func)
        p.add_argument("--adapter", required=True, help="adapter directory written by `deltatune train`")
        p.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter)")
        if name == "predict":
            p.add_argument("images", nargs="+", help="image files or directories")
            p.add_argument("--top_k", type=int, default=5, help="labels per image (default 5)")
            p.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
        if name == "merge":
            p.add_argument("--output", required=True, help="directory of the merged model")
            p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
        if name == "evaluate":
            p.add_argument(
                "--dataset", default=None, help="dataset (default: the one the adapter was trained on)"
            )
            p.add_argument("--image_column", default=None)
            p.add_argument("--label_column", default=None)
            p.add_argument("--validation_split", type=float, default=None)
            p.add_argument("--max_eval_samples", type=int, default=None)
            p.add_argument(
                "--output_dir", default=None, help="where to write results (default: the adapter dir)"
            )
        if name in ("predict", "evaluate"):
            p.add_argument("--batch_size", type=int, default=32)
    quick = sub.add_parser(
        "quickstart", help="apply every method to a ViT-base-shaped model and print what trains"
    )
    quick.add_argument("--num_labels", type=int, default=101)
    quick.set_defaults(func=_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    package_logger = logging.getLogger("deltatune")
    saved = (list(package_logger.handlers), package_logger.level)
    _setup_logging(verbose="--json" not in argv)
    try:
        if argv and argv[0] in ("train", "compare"):
            return _train(argv[1:]) if argv[0] == "train" else _compare(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("DELTATUNE_DEBUG"):
            raise
        print(f"deltatune: error: {err}", file=sys.stderr)
        return 2
    finally:
        package_logger.handlers[:] = saved[0]
        package_logger.setLevel(saved[1])


if __name__ == "__main__":
    sys.exit(main())
