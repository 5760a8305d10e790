"""Training with ``transformers.Trainer``: adapter-only checkpoints, AdaLoRA allocation, metrics.

from deltatune.train import DeltaTrainer, TrainingArguments

args = TrainingArguments("out", evaluation_strategy="epoch", save_strategy="epoch", ...)
trainer = DeltaTrainer(peft_model, args, train_dataset=..., eval_dataset=..., data_collator=collate_fn)
trainer.train()
"""

from .arguments import TrainingArguments, accelerator_name, check_precision, precision_label
from .callbacks import AdaLoraCallback, rank_summary
from .checkpoint import (
    ADALORA_STATE_NAME,
    LABELS_NAME,
    load_adapter_checkpoint,
    load_label_maps,
    save_label_maps,
)
from .guards import NonFiniteLossError, NonFiniteLossGuard
from .metrics import (
    ClassificationReport,
    classification_report,
    compute_classification_metrics,
    top_k_accuracy,
)
from .trainer import DeltaTrainer

__all__ = [
    "ADALORA_STATE_NAME",
    "LABELS_NAME",
    "AdaLoraCallback",
    "ClassificationReport",
    "DeltaTrainer",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "TrainingArguments",
    "accelerator_name",
    "check_precision",
    "classification_report",
    "compute_classification_metrics",
    "load_adapter_checkpoint",
    "load_label_maps",
    "precision_label",
    "rank_summary",
    "save_label_maps",
    "top_k_accuracy",
]
