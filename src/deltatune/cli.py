"""The ``deltatune`` command line: thin parsing over library calls."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _quickstart(args: argparse.Namespace) -> int:
    """Applies each method at the guide's settings to a ViT-base-shaped model and prints what trains."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from . import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

    configs = {
        "lora": LoraConfig(
            r=16,
            lora_alpha=16,
            target_modules=["query", "value"],
            lora_dropout=0.1,
            modules_to_save=["classifier"],
        ),
        "loha": LoHaConfig(
            r=16,
            alpha=16,
            target_modules=["query", "value"],
            module_dropout=0.1,
            modules_to_save=["classifier"],
        ),
        "lokr": LoKrConfig(
            r=16,
            alpha=16,
            target_modules=["query", "value"],
            module_dropout=0.1,
            modules_to_save=["classifier"],
        ),
        "adalora": AdaLoraConfig(
            init_r=12,
            target_r=8,
            tinit=200,
            tfinal=1000,
            deltaT=10,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        ),
    }
    for name, config in configs.items():
        torch.manual_seed(0)
        model = ViTForImageClassification(ViTConfig(num_labels=args.num_labels))
        peft_model = get_peft_model(model, config)
        print(f"{name:8s}", end=" ")
        peft_model.print_trainable_parameters()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune", description="Parameter-efficient fine-tuning: LoRA, LoHa, LoKr, AdaLoRA"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser(
        "quickstart", help="apply every method to a ViT-base-shaped model and print what trains"
    )
    quick.add_argument("--num_labels", type=int, default=101)
    quick.set_defaults(func=_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
