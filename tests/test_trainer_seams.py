"""A deltatune model under plain ``transformers.Trainer``, compared with peft on the same tiny models (the u-lib
tester's L12, L13): the Trainer must see the wrapped model's label names, return-loss flag and loss kwargs, as
transformers sees them through peft's classes, without ``label_names`` in the arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny import Blobs, tiny_vit
from torch import nn
from transformers import Trainer, TrainingArguments

import deltatune as dt

peft = pytest.importorskip("peft")
LIBRARIES = pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
#: As most scripts write them: no label_names (transformers' default, taken from the model).
PLAIN_ARGS = {
    "remove_unused_columns": False,
    "report_to": "none",
    "use_cpu": True,
    "seed": 0,
    "disable_tqdm": True,
}


def _accuracy(prediction: Any) -> dict[str, float]:
    return {"acc": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


class NoKwargsNet(nn.Module):
    """A custom model whose forward takes no ``**kwargs`` (so no ``num_items_in_batch``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(3 * 32 * 32, 16)
        self.head = nn.Linear(16, 3)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.head(torch.relu(self.lin0(pixel_values.flatten(1))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class ReturnLossNet(NoKwargsNet):
    """A model that computes its loss without labels when ``return_loss`` (CLIP's pattern)."""

    def forward(  # type: ignore[override]
        self, pixel_values: torch.Tensor, return_loss: bool = True, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        logits = self.head(torch.relu(self.lin0(pixel_values.flatten(1))))
        return {"loss": logits.logsumexp(-1).mean(), "logits": logits}


class Unlabelled(Blobs):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i]}


@LIBRARIES
def test_plain_trainer_evaluates_with_the_base_models_labels(library: Any, tmp_path: Path) -> None:
    model = library.get_peft_model(tiny_vit(), library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(tmp_path, max_steps=1, per_device_eval_batch_size=4, **PLAIN_ARGS)
    trainer = Trainer(model=model, args=args, eval_dataset=Blobs(8, 1), compute_metrics=_accuracy)
    metrics = trainer.evaluate()  # before any training step
    assert {"eval_loss", "eval_acc"} <= set(metrics)
    assert trainer.label_names == ["labels"]
    assert trainer.predict(Blobs(4, 2)).label_ids is not None


@LIBRARIES
def test_plain_trainer_loads_the_best_model_without_label_names(library: Any, tmp_path: Path) -> None:
    model = library.get_peft_model(tiny_vit(), library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=1,
        save_steps=1,
        load_best_model_at_end=True,
        **PLAIN_ARGS,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blobs(8, 0), eval_dataset=Blobs(4, 1))
    trainer.train()  # was: KeyError, metric_for_best_model 'eval_loss' not in the evaluation metrics
    assert trainer.state.best_metric is not None


@LIBRARIES
def test_plain_trainer_takes_return_loss_from_the_base_model(library: Any, tmp_path: Path) -> None:
    model = library.get_peft_model(ReturnLossNet(), library.LoraConfig(r=2, target_modules=["lin0"]))
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, **PLAIN_ARGS)
    trainer = Trainer(model=model, args=args, eval_dataset=Unlabelled(8, 1))
    assert "eval_loss" in trainer.evaluate()
    assert trainer.label_names == [] and trainer.can_return_loss


@LIBRARIES
def test_plain_trainer_keeps_label_names_the_arguments_give(library: Any, tmp_path: Path) -> None:
    model = library.get_peft_model(tiny_vit(), library.LoraConfig(r=2, target_modules=["q_proj"]))
    args = TrainingArguments(tmp_path, label_names=["other"], per_device_eval_batch_size=4, **PLAIN_ARGS)
    trainer = Trainer(model=model, args=args, eval_dataset=Blobs(4, 1))
    assert "eval_loss" not in trainer.evaluate()  # no "other" in the batch: no labels, as the user said
    assert trainer.label_names == ["other"]


@LIBRARIES
def test_plain_trainer_passes_no_loss_kwargs_to_a_forward_without_kwargs(
    library: Any, tmp_path: Path
) -> None:
    model = library.get_peft_model(NoKwargsNet(), library.LoraConfig(r=2, target_modules=["lin0"]))
    args = TrainingArguments(
        tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, **PLAIN_ARGS
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blobs(16, 0))
    assert trainer.model_accepts_loss_kwargs is False
    trainer.train()  # was: TypeError, unexpected keyword argument 'num_items_in_batch'
    assert trainer.state.global_step == 2


@pytest.mark.parametrize(
    "make", [tiny_vit, NoKwargsNet, ReturnLossNet], ids=["vit", "no-kwargs", "return-loss"]
)
def test_accepts_loss_kwargs_answers_as_transformers_does_for_peft(make: Any, tmp_path: Path) -> None:
    answers = []
    for library in (dt, peft):
        model = library.get_peft_model(make(), library.LoraConfig(r=2, target_modules=["lin0", "q_proj"]))
        trainer = Trainer(model=model, args=TrainingArguments(tmp_path, **PLAIN_ARGS))
        answers.append(trainer.model_accepts_loss_kwargs)
    assert answers[0] == answers[1]


@LIBRARIES
def test_plain_trainer_keeps_the_base_models_inputs_with_remove_unused_columns(
    library: Any, tmp_path: Path
) -> None:
    model = library.get_peft_model(tiny_vit(), library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    defaults = {
        k: v for k, v in PLAIN_ARGS.items() if k != "remove_unused_columns"
    }  # True: transformers' default
    args = TrainingArguments(tmp_path, max_steps=1, per_device_train_batch_size=4, **defaults)
    trainer = Trainer(model=model, args=args, train_dataset=Blobs(4, 0), eval_dataset=Blobs(4, 1))
    assert "eval_loss" in trainer.evaluate()  # was: every column dropped, the batch empty
    trainer.train()
    assert trainer.state.global_step == 1
