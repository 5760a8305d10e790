"""The training engine: ``transformers.Trainer`` for deltatune models, knowing no task.

Adapter-only checkpoints and exact resumption, the method's training hooks (AdaLoRA's allocation), a
NaN/inf guard, automatic precision, the output-folder rules and default classification metrics. What a task
trains on (images, a classification head, its report) lives in :mod:`deltatune.tasks`.

    from deltatune.train import DeltaTrainer, TrainingArguments

    args = TrainingArguments("out", eval_strategy="epoch", save_strategy="epoch", ...)
    trainer = DeltaTrainer(peft_model, args, train_dataset=..., eval_dataset=..., data_collator=collate_fn)
    trainer.train()
"""

from .arguments import TrainingArguments, accelerator_name, check_precision, precision_label
from .callbacks import AdapterHooksCallback, tuner_of
from .checkpoint import (
    LABELS_NAME,
    load_adapter_checkpoint,
    load_label_maps,
    save_label_maps,
    save_tuner_state,
)
from .guards import NonFiniteLossError, NonFiniteLossGuard
from .metrics import (
    ClassificationReport,
    classification_report,
    compute_classification_metrics,
    top_k_accuracy,
)
from .outputs import RUN_RECORD_NAME, OutputDirError, prepare_output_dir
from .run import PeakMemory, logged_final_evaluation, planned_steps
from .trainer import DeltaTrainer

__all__ = [
    "LABELS_NAME",
    "RUN_RECORD_NAME",
    "AdapterHooksCallback",
    "ClassificationReport",
    "DeltaTrainer",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "OutputDirError",
    "PeakMemory",
    "TrainingArguments",
    "accelerator_name",
    "check_precision",
    "classification_report",
    "compute_classification_metrics",
    "load_adapter_checkpoint",
    "load_label_maps",
    "logged_final_evaluation",
    "planned_steps",
    "precision_label",
    "prepare_output_dir",
    "save_label_maps",
    "save_tuner_state",
    "top_k_accuracy",
    "tuner_of",
]
