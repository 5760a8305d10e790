"""``DeltaTrainer``: ``transformers.Trainer`` for deltatune models.

What it changes, and where transformers 5 does it:

- ``_save`` (called by ``save_model`` and ``_save_checkpoint``) writes the adapter in PEFT's format plus
  ``labels.json`` (and AdaLoRA's allocator state) instead of the full model, so a ``checkpoint-N`` folder
  is a small fraction of the base model. The optimizer, scheduler and RNG states are still written by
  ``_save_checkpoint`` next to it.
- ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) and ``_load_best_model``
  (``load_best_model_at_end``) read those folders back into the live adapter.
- deltatune models get :class:`~deltatune.train.callbacks.AdapterHooksCallback` automatically, which runs
  the method's training hooks (AdaLoRA's budget allocation after each optimiser step); a method's extra loss
  term (AdaLoRA's orthogonal regulariser) is added by the tuner's forward whenever the model trains with
  labels, and ``compute_loss`` keeps its weight per optimiser step under gradient accumulation and DDP.
- A :class:`~deltatune.train.guards.NonFiniteLossGuard` is always added: ``training_step`` hands it each
  loss (checked on the device), a NaN/inf loss raises ``NonFiniteLossError`` naming the step before that
  state is logged, evaluated or saved, and ``_save_checkpoint`` refuses a non-finite loss or adapter, so
  the last good ``checkpoint-N`` is never overwritten by a poisoned one.
- ``compute_metrics`` defaults to accuracy (+ top-5 with more than 5 classes).
- A resume from a checkpoint already at the end of the run (``max_steps``, or its last epoch) trains nothing
  and saves nothing (transformers' loop would take one more optimiser step before it checks the limit:
  ``_run_epoch``), and ``train_loss``, ``train_runtime`` and the throughput after a resume are the whole
  run's, not this call's (each checkpoint records the run's loss sum, training time and peak memory so far
  in its trainer state; :attr:`DeltaTrainer.earlier_peak_memory_mb` is the last one, for the caller).
- The guide's ``Trainer(tokenizer=...)`` is accepted and mapped to ``processing_class``; an impossible
  fp16/bf16 request fails in the constructor; the precision used is logged when training starts.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints
from transformers.utils import can_return_loss, find_labels

from .._files import apply_umask, atomic_write_text
from ..model import PeftModel
from ..registry import spec_for
from .arguments import check_precision, cpu_threads
from .callbacks import (
    AdapterHooksCallback,
    DatasetEpochCallback,
    DeltaTrainerRunLoss,
    stored_run_totals,
    tuner_of,
)
from .checkpoint import load_adapter_checkpoint, save_label_maps, save_tuner_state
from .disk import disk_full_error
from .guards import NonFiniteLossGuard, observe_loss, refuse_non_finite_checkpoint
from .metrics import compute_classification_metrics
from .ranks import peer_lost_error
from .resume import resolve_resume_checkpoint
from .signals import deferred_sigterm
from .throughput import ThroughputCallback

logger = logging.getLogger(__name__)

__all__ = ["DeltaTrainer"]

TRAINING_ARGS_JSON = "training_args.json"
#: transformers 5's private ``Trainer`` methods of the training loop that DeltaTrainer extends (resume at the
#: end of a run; ``train_loss`` over the whole run); transformers 4.x has none of them.
LOOP_HOOKS = ("_init_training_state", "_run_epoch", "_finalize_training")


def _has_num_labels(model: Any) -> bool:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return int(getattr(getattr(base, "config", None), "num_labels", 0) or 0) > 1


class DeltaTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that checkpoints only the adapter and runs AdaLoRA's allocation.

    Takes every argument ``transformers.Trainer`` takes, plus:

    Args:
        tokenizer: The guide's (transformers 4) name for ``processing_class``; mapped with a notice.
        default_metrics: When ``compute_metrics`` is None and the model is a classifier, report accuracy
            (and top-5 accuracy above 5 classes) at each evaluation (default True).
        device_batch_transform: ``(batch, device) -> batch`` run on each collated batch before it is moved to
            the device and given to the model (a task's device-side preprocessing, e.g. GPU image decoding).
        loraplus_lr_ratio: When set, the optimiser is LoRA+'s (:func:`deltatune.optimizers.create_loraplus_optimizer`
            with the optimiser ``args.optim`` names, ``lr=args.learning_rate`` and ``args.weight_decay``): the B
            factors train at ``loraplus_lr_ratio`` times the learning rate.
        loraplus_lr_embedding: LoRA+'s learning rate of adapted embeddings (default 1e-6, as in PEFT).
        num_threads: CPU threads for torch while ``train`` runs. By default a small model (under 20M
            parameters) training on the CPU uses one thread, as the command line does (its matrix products
            are too small to gain from more, and on a busy machine extra threads spin: a 2-thread run was 9x
            slower than 1 thread on a shared 2-core machine); ``OMP_NUM_THREADS`` or this argument decide
            otherwise. See :func:`~deltatune.train.arguments.cpu_threads`.

    Raises:
        ValueError: if fp16/bf16 is requested where it cannot run, or ``tokenizer`` and
            ``processing_class`` disagree.
    """

    #: Read by :mod:`deltatune.plain_trainer`: this Trainer needs none of its adaptations.
    handles_deltatune_models = True
    #: The peak memory (MiB) of this ``train`` call so far, recorded in each checkpoint when set (the caller
    #: measures it, e.g. :class:`~deltatune.train.run.PeakMemory`'s ``so_far_mb``).
    memory_probe: Callable[[], float] | None = None
    #: The peak memory the resumed checkpoint recorded for the sessions before this one (None: a fresh run,
    #: or a checkpoint that recorded none).
    earlier_peak_memory_mb: float | None = None
    #: Optimiser steps the last ``train`` call took (0: a resume of a finished run; None: no call yet).
    session_steps: int | None = None

    def __init__(
        self,
        model: Any = None,
        args: transformers.TrainingArguments | None = None,
        *positional: Any,
        tokenizer: Any = None,
        default_metrics: bool = True,
        device_batch_transform: Any = None,
        num_threads: int | None = None,
        loraplus_lr_ratio: float | None = None,
        loraplus_lr_embedding: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.device_batch_transform = device_batch_transform
        self.num_threads = num_threads
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_lr_embedding = loraplus_lr_embedding
        if tokenizer is not None:
            existing = kwargs.get("processing_class")
            if existing is not None and existing is not tokenizer:
                raise ValueError("pass either tokenizer= (old spelling) or processing_class=, not both")
            if len(positional) >= 4:
                raise ValueError(
                    "pass either tokenizer= or the processing_class positional argument, not both"
                )
            kwargs["processing_class"] = tokenizer
            logger.warning("Trainer: tokenizer= is spelled processing_class= in transformers 5; mapped")
        if args is not None:
            self.precision = check_precision(args)
        wants_metrics = default_metrics and kwargs.get("compute_metrics") is None and len(positional) < 6
        if wants_metrics and _has_num_labels(model):
            kwargs["compute_metrics"] = compute_classification_metrics
        if tuner_of(model) is not None:
            callbacks = list(kwargs.get("callbacks") or [])
            if not any(isinstance(cb, AdapterHooksCallback) for cb in callbacks):
                callbacks.append(AdapterHooksCallback(model))
            kwargs["callbacks"] = callbacks
        super().__init__(model, args, *positional, **kwargs)
        if not any(isinstance(cb, NonFiniteLossGuard) for cb in self.callback_handler.callbacks):
            self.add_callback(NonFiniteLossGuard())
        if not any(isinstance(cb, DatasetEpochCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(DatasetEpochCallback())
        if not any(isinstance(cb, DeltaTrainerRunLoss) for cb in self.callback_handler.callbacks):
            self.add_callback(DeltaTrainerRunLoss())
        if not any(isinstance(cb, ThroughputCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(ThroughputCallback())
        self.precision = check_precision(self.args)
        if isinstance(self.model, PeftModel):
            self._inspect_base_model(self.model.get_base_model())
        missing = [name for name in LOOP_HOOKS if not hasattr(transformers.Trainer, name)]
        if missing:  # transformers 4.x: its training loop is one method, these overrides are never called
            logger.warning(
                "transformers %s's Trainer has no %s: on it, a resume of a finished run trains one more step "
                "and a resumed run's train_loss covers only the steps after the resume (both fixed on "
                "transformers 5)",
                transformers.__version__,
                ", ".join(missing),
            )

    def _inspect_base_model(self, base: Any) -> None:
        """Label names, loss kwargs and return-loss come from the wrapped model's ``forward``, not from
        PeftModel's ``(*args, **kwargs)``."""
        cls = type(base)
        if self.args.label_names is None:
            self.label_names = find_labels(cls)
        self.can_return_loss = can_return_loss(cls)
        if hasattr(base, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = bool(base.accepts_loss_kwargs)
        else:
            params = inspect.signature(base.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None and isinstance(self.model, PeftModel):
            signature = inspect.signature(self.model.get_base_model().forward)
            self._signature_columns = [*signature.parameters, "label", "label_ids", *self.label_names]  # type: ignore[assignment]
        super()._set_signature_columns_if_needed()

    # ---- training ---------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; logs the precision and what trains first. ``resume_from_checkpoint=True`` takes
        the newest *complete* ``checkpoint-N`` (one a kill left half-written is skipped), and an incomplete
        checkpoint path is refused (transformers would silently restart it at step 0)."""
        resume_from_checkpoint = resolve_resume_checkpoint(self.args.output_dir, resume_from_checkpoint)
        model = self.model
        if isinstance(model, PeftModel):
            trainable, total = model.get_nb_trainable_parameters()
            logger.info(
                "training %s adapter: %s of %s parameters (%.4f%%) trainable; precision: %s",
                spec_for(model.active_peft_config).display_name,
                f"{trainable:,}",
                f"{total:,}",
                100 * trainable / max(total, 1),
                self.precision,
            )
        else:
            logger.info("training %s; precision: %s", type(model).__name__, self.precision)
        if not isinstance(model, torch.nn.Module):  # model_init: transformers builds it in train()
            return super().train(resume_from_checkpoint, *args, **kwargs)
        with cpu_threads(model, self.num_threads, bool(self.args.use_cpu)):
            try:
                return super().train(resume_from_checkpoint, *args, **kwargs)
            except RuntimeError as err:  # torchrun: another process died; say so, not "connection reset"
                lost = peer_lost_error(err)
                if lost is err:
                    raise
                raise lost from err

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """``Trainer.create_optimizer``, or LoRA+'s optimiser when ``loraplus_lr_ratio`` is set."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from ..optimizers import EMBEDDING_LR, create_loraplus_optimizer

        opt_model: Any = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            optimizer_cls,
            lr,
            self.loraplus_lr_ratio,
            loraplus_lr_embedding=self.loraplus_lr_embedding or EMBEDDING_LR,
            loraplus_weight_decay=self.args.weight_decay,
            **optimizer_kwargs,
        )
        return self.optimizer

    def _init_training_state(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer._init_training_state``; also reads the totals a resumed checkpoint recorded for the steps
        it already took (each None when it did not record it)."""
        result = super()._init_training_state(*args, **kwargs)
        self._session_start = time.time()
        self._run_loss_before: float | None = 0.0
        self._runtime_before: float | None = 0.0
        self.earlier_peak_memory_mb = None
        if self.state.global_step:
            totals = stored_run_totals(self.state)
            self._run_loss_before, self._runtime_before = totals["train_loss_sum"], totals["train_runtime"]
            self.earlier_peak_memory_mb = totals["peak_memory_mb"]
        return result

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer._run_epoch``, skipped when the run already took every step (a resume of a finished run)."""
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            logger.info(
                "the checkpoint is at step %d of %d: nothing is left to train",
                self.state.global_step,
                self.state.max_steps,
            )
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer._finalize_training``, with ``train_loss``, ``train_runtime`` and the samples and steps per
        second over the whole run after a resume (transformers reports this call's)."""
        steps_now = self.state.global_step - int(self._initial_global_step)  # set by _init_training_state
        self.session_steps = steps_now
        output = super()._finalize_training(*args, **kwargs)
        if not isinstance(output, TrainOutput) or steps_now == self.state.global_step:
            return output
        metrics, step, loss = output.metrics, self.state.global_step, output.training_loss
        before, runtime = getattr(self, "_run_loss_before", None), getattr(self, "_runtime_before", None)
        if before is not None:
            loss = metrics["train_loss"] = (before + output.training_loss * steps_now) / max(step, 1)
        if runtime is not None and "train_runtime" in metrics:
            whole = runtime + float(metrics["train_runtime"])
            samples = args[1] if len(args) > 1 else kwargs.get("num_train_samples")  # the whole schedule's
            metrics["train_runtime"] = round(whole, 4)
            if isinstance(samples, int | float) and whole > 0:
                metrics["train_samples_per_second"] = round(
                    samples * step / max(self.state.max_steps, 1) / whole, 3
                )
                metrics["train_steps_per_second"] = round(step / whole, 3)
        for entry in reversed(self.state.log_history):  # the entry transformers logged with these metrics
            if "train_loss" in entry:
                entry.update({k: v for k, v in metrics.items() if k in entry})
                break
        return TrainOutput(output.global_step, loss, metrics)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """``Trainer.compute_loss``; with a loss already normalised over the whole accumulated (and, under DDP,
        all-process) batch, a method's extra loss term (added once per forward, e.g. AdaLoRA's orthogonal
        regulariser) is divided by the number of micro-batches and by the factor transformers multiplies each
        process's loss with (``average_tokens_across_devices``), so its weight per optimiser step stays what
        the config says. Nothing is mutated: the tuner scales the term within the call."""
        tuner = tuner_of(self._unwrapped())
        steps = int(getattr(self, "current_gradient_accumulation_steps", 1) or 1)
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if scaled and self.args.average_tokens_across_devices:
            # mirrors the `loss *= ...` at the end of transformers' Trainer.compute_loss
            n_gpu = self.args.n_gpu
            steps *= n_gpu if n_gpu > 1 else max(self.accelerator.num_processes // self.get_tp_size(), 1)
        if tuner is None or not (model.training and scaled and steps > 1):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with tuner.scaled_extra_loss(1.0 / steps):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _prepare_inputs(self, inputs: Any) -> Any:
        """``Trainer._prepare_inputs``, after the ``device_batch_transform`` (if any) turned the collated batch
        into model inputs on the training device (e.g. images decoded and augmented on the GPU)."""
        if self.device_batch_transform is not None and isinstance(inputs, dict):
            inputs = self.device_batch_transform(inputs, self.args.device)
        return super()._prepare_inputs(inputs)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        """``Trainer.training_step``; the loss also goes to the NaN/inf guard (compared on the device)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        observe_loss(self, loss)
        return loss

    # ---- saving -----------------------------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """``Trainer._save_checkpoint``, refused (``NonFiniteLossError``) for a non-finite loss or adapter.

        Old checkpoints beyond ``save_total_limit`` are rotated by step number, not by modification time as
        transformers does: a copied or restored folder's mtime says nothing of its step, and could get the
        newest checkpoint deleted."""
        refuse_non_finite_checkpoint(self)
        self._record_run_totals()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotated below, by step
        folder = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        existed = os.path.exists(folder)
        with deferred_sigterm():  # a SIGTERM now stops the run once this checkpoint is complete
            try:
                super()._save_checkpoint(model, trial)
            except (OSError, RuntimeError) as err:
                if self.args.should_save and not existed:  # useless and in the way: frees what it took
                    shutil.rmtree(folder, ignore_errors=True)
                raise disk_full_error(err, folder) from err
            finally:
                self.args.save_total_limit = limit
            if self.args.should_save:
                rotate_checkpoints(
                    self._get_output_dir(trial=trial),
                    limit,
                    self.state.best_model_checkpoint,
                    use_mtime=False,
                )

    def _record_run_totals(self) -> None:
        """Sets the run's totals so far on :class:`DeltaTrainerRunLoss`, which transformers writes into the
        checkpoint's trainer state (read back by ``_init_training_state`` on resume)."""
        before, runtime = getattr(self, "_run_loss_before", None), getattr(self, "_runtime_before", None)
        loss = None
        if before is not None and hasattr(self, "_tr_loss"):
            loss = before + self._total_loss_scalar + float(self._tr_loss.item())
        if runtime is not None and hasattr(self, "_session_start"):
            runtime += time.time() - self._session_start
        peaks = [self.earlier_peak_memory_mb, self.memory_probe() if self.memory_probe is not None else None]
        peak = max((p for p in peaks if p is not None), default=None)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, DeltaTrainerRunLoss):
                callback.train_loss_sum, callback.train_runtime, callback.peak_memory_mb = loss, runtime, peak

    def _unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        model = self._unwrapped()
        if not isinstance(model, PeftModel):
            super()._save(output_dir, state_dict)
            if self.args.should_save:  # JSON, not transformers' pickled training_args.bin
                folder = str(output_dir if output_dir is not None else self.args.output_dir)
                atomic_write_text(os.path.join(folder, TRAINING_ARGS_JSON), self.args.to_json_string())
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, "training_args.bin"))
                for name in os.listdir(folder):  # safetensors creates its files 0600, whatever the umask
                    if name.endswith(".safetensors"):
                        apply_umask(os.path.join(folder, name))
            return
        output_dir = str(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.debug("saving adapter to %s", output_dir)  # every checkpoint: train.log only
        model.save_pretrained(output_dir)
        save_label_maps(model, output_dir)
        if os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR):
            save_tuner_state(model, output_dir)  # resumption state: checkpoints only
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        atomic_write_text(os.path.join(output_dir, TRAINING_ARGS_JSON), self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = model if model is not None else self._unwrapped()
        if not isinstance(target, PeftModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        logger.info("resuming the adapter from %s", resume_from_checkpoint)
        load_adapter_checkpoint(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model = self._unwrapped()
        best = self.state.best_model_checkpoint
        if not isinstance(model, PeftModel) or best is None:
            super()._load_best_model()
            return
        metric = self.args.metric_for_best_model or "loss"
        score = self.state.best_metric
        shown = f"{score:.4f}" if isinstance(score, float) else str(score)
        logger.info(
            "the best adapter is %s (eval %s %s); loading it", best, metric.removeprefix("eval_"), shown
        )
        load_adapter_checkpoint(model, best)
