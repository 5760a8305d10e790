"""``PeftModel``: the user-facing wrapper — adapters, mixed-adapter batches, merge, counting; saving and
loading come from :class:`~deltatune.model_io.SaveLoadMixin`.

Attribute access falls through to the wrapped model, so ``model.config``, ``main_input_name`` and
friends work, and ``transformers.Trainer`` and pipelines can drive it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from ._checkpointing import prepare_for_checkpointing
from .config import PeftConfig, TargetingConfig
from .functional import tuner_class
from .layers import AdapterLayer
from .model_io import SaveLoadMixin, adapter_config
from .plain_trainer import (
    BaseSignatureForward,
    adapt_plain_trainer,
    adapt_trainer_files,
    inspect_base_for_trainer,
    mark_trainer_found,
)
from .serialization import check_config_fits_file
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .tuner import AdapterModel

logger = logging.getLogger(__name__)

__all__ = ["PeftModel", "get_peft_model"]

#: The name that sends a row of a mixed batch through the base model only.
BASE_ROW = "__base__"


class PeftModel(SaveLoadMixin):
    """A model with one or more named adapters.

    Args:
        model: The base model (changed in place: targeted modules are wrapped).
        peft_config: Config of the first adapter.
        adapter_name: Its name (default ``"default"``).
        autocast_adapter_dtype: Keep adapters in fp32 over an fp16/bf16 base (default, as PEFT); False keeps
            them in the base weight's dtype.
        low_cpu_mem_usage: Create the adapter tensors on the ``meta`` device, to be materialised by loading
            weights (what ``from_pretrained(..., low_cpu_mem_usage=True)`` does).

    Attributes:
        base_model: The tuner (:class:`~deltatune.tuner.AdapterModel`); ``base_model.model`` is the
            user's model.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        config = adapter_config(peft_config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = model_name_or_path(model)
        self.base_model: AdapterModel = tuner_class(config)(
            model,
            config,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        prepare_for_checkpointing(model)

    # ---- fall-through ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @BaseSignatureForward
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The model's forward. With ``adapter_names`` (one per row of the batch, ``"__base__"`` for none), each
        row runs through its own adapter: many fine-tunes served from one base in one batch (inference only).

        Raises:
            ValueError: for ``adapter_names`` in training mode, unknown names, a length that does not match
                the batch, or merged adapters.
        """
        with self._mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    def train(self, mode: bool = True) -> PeftModel:
        """``nn.Module.train``; called by a plain ``transformers.Trainer`` (``model.train()`` before each step,
        ``model.eval()`` before evaluating), it first gives that Trainer the label names and return-loss flag of
        the wrapped model's class, as transformers does for peft's models (see
        :func:`~deltatune.plain_trainer.inspect_base_for_trainer`)."""
        inspect_base_for_trainer(self, self.base_model.model)
        return super().train(mode)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the wrapped model takes the loss kwargs (``num_items_in_batch``) that ``transformers.Trainer``
        passes: its own ``accepts_loss_kwargs``, else whether its ``forward`` takes ``**kwargs`` (transformers'
        rule, applied to the base model as for peft's models)."""
        base = self.base_model.model
        if hasattr(base, "accepts_loss_kwargs"):
            return bool(base.accepts_loss_kwargs)
        params = inspect.signature(base.forward).parameters.values()
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    def to(self, *args: Any, **kwargs: Any) -> PeftModel:  # type: ignore[override]
        """``nn.Module.to``; a plain ``transformers.Trainer`` placing the model (in its ``__init__``) first gets
        deltatune's saving and checkpoint loading, so ``save_model`` writes the adapter and
        ``resume_from_checkpoint`` reads peft's checkpoints even before any training forward."""
        adapt_trainer_files(self)
        return super().to(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a non-strict load from a plain ``transformers.Trainer`` (its
        ``resume_from_checkpoint`` and ``load_best_model_at_end``, which run before any training forward)
        first adapts that Trainer, so its missing-keys warning names trained tensors only, not the frozen
        base the checkpoint leaves out on purpose."""
        if not strict and adapt_plain_trainer(self.base_model) is not None:
            mark_trainer_found(self.base_model, True)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate``, with ``adapter_names`` as in :meth:`forward`."""
        with self._mixed_batch(adapter_names), self.base_model.generation_context(args, kwargs):
            generate = getattr(self.base_model.model, "generate", None)
            if not callable(generate):
                raise AttributeError(f"{type(self.base_model.model).__name__} has no generate()")
            return generate(*args, **kwargs)

    @contextmanager
    def _mixed_batch(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        """Within the block, every adapter layer and ``modules_to_save`` wrapper sends each row of the batch
        through the adapter named for it."""
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = {n for _, layer in self.base_model.adapter_layers() for n in layer.adapter_names}
        unknown = sorted({n for n in adapter_names if n != BASE_ROW} - known)
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        names = list(adapter_names)
        modules: list[Any] = [m for _, m in self.base_model.adapter_layers()]
        modules += [m for _, m in self.base_model.saved_module_wrappers()]
        for module in modules:
            module.batch_adapter_names = names
        try:
            yield
        finally:
            for module in modules:
                module.batch_adapter_names = None

    @property
    def active_adapter(self) -> str:
        """The (first) active adapter; :attr:`active_adapters` lists them all (PEFT returns a list here when
        several are active)."""
        return self.base_model.current_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def modules_to_save(self) -> set[str] | None:
        """The ``modules_to_save`` entries of all adapters together (None when there are none)."""
        names = {m for c in self.peft_config.values() for m in (c.modules_to_save or [])}
        return names or None

    @property
    def active_peft_config(self) -> TargetingConfig:
        """The config of the (first) active adapter."""
        return self.peft_config[self.base_model.current_adapter]

    @property
    def peft_type(self) -> str | None:
        return self.active_peft_config.peft_type

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapter layers still in place)."""
        return self.base_model.model

    # ---- counting -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; shared parameters count once, as in PEFT."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Prints ``trainable params: T || all params: A || trainable%: P`` (PEFT's format)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """The state of every adapter layer (see :func:`deltatune.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The state of the model's adapters, ``"irregular"`` where layers disagree (see
        :func:`deltatune.get_model_status`)."""
        return get_model_status(self)

    # ---- adapters -------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Adds a new adapter, inactive and frozen (:meth:`set_adapter` activates it); the trainability of the
        others is unchanged."""
        config = adapter_config(peft_config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = self.active_peft_config.base_model_name_or_path
        self.base_model.inject_adapter(
            adapter_name,
            config,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Activates ``adapter_name`` and makes it the trainable one (frozen with ``inference_mode``); several
        active adapters at once: ``model.base_model.set_adapter([...])``."""
        if not isinstance(adapter_name, str):
            raise TypeError(
                f"PeftModel.set_adapter takes one name, got {adapter_name!r}; activate several with "
                "model.base_model.set_adapter([...])"
            )
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turns gradients of the named adapters on or off (active or not)."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Deletes ``adapter_name``; a merged one is unmerged first (peft refuses instead)."""
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model behaves exactly like the base model; adapter tensors are frozen inside
        and get their previous trainability and enabled state back on exit."""
        state = self.base_model.adapter_layers_enabled()
        if state == "irregular":
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is "
                "most likely unintentional. After exiting the disable_adapter context, all adapters will be "
                "enabled",
                stacklevel=3,
            )
        grads = {id(p): p.requires_grad for p in self.parameters()}
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            if state is not False:
                self.base_model.enable_adapter_layers()
            for p in self.parameters():
                p.requires_grad_(grads.get(id(p), p.requires_grad))

    # ---- merge ----------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Folds the adapters (default: the active ones) into the base weights in place (undo with
        :meth:`unmerge_adapter`)."""
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Restores the base weights after :meth:`merge_adapter`."""
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merges the adapter into the base weights and returns the plain base model (trained
        ``modules_to_save`` copies swapped in)."""
        return self.base_model.unload_and_optionally_merge(True, safe_merge, adapter_names, progressbar)

    def unload(self) -> nn.Module:
        """Removes every adapter without merging and returns the base model."""
        return self.base_model.unload_and_optionally_merge(False)

    # ---- load -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> PeftModel:
        """Loads an adapter (directory or Hub repo id, PEFT's format) onto ``model``.

        Args:
            model: The base model.
            model_id: Local directory or Hub repo id.
            adapter_name: Name to give the adapter.
            is_trainable: Keep the adapter trainable; otherwise it is frozen and the model put in eval.
            config: Use this config instead of the saved one.
            strict: Refuse adapter tensors that match nothing in the model (default True).
            **kwargs: ``autocast_adapter_dtype``, ``ignore_mismatched_sizes``, ``low_cpu_mem_usage``,
                ``key_mapping`` (default: the model's ``_checkpoint_conversion_mapping``, as PEFT), ``subfolder``
                and Hub download options (``revision``, ``token``, ...).
                ``allow_base_weights=True`` loads a file whose tensors overwrite frozen base-model weights
                (refused by default).

        Raises:
            ValueError: for a config that does not fit its weights file (checked before allocating), tensors
                holding NaN/inf, or tensors that would overwrite base weights.
        """
        options = cls._split_load_options(kwargs)
        subfolder = kwargs.pop("subfolder", None)
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **kwargs)
        config = adapter_config(config)
        config.inference_mode = not is_trainable
        check_config_fits_file(config, model_id, subfolder=subfolder, **kwargs)  # before allocating
        peft_model = _above("task_models", "peft_model_class")(config.task_type, cls)(
            model,
            config,
            adapter_name,
            autocast_adapter_dtype=options.get("autocast_adapter_dtype", True),
            low_cpu_mem_usage=bool(options.get("low_cpu_mem_usage", False)),
        )
        peft_model._load_weights(
            model_id,
            adapter_name,
            strict=strict,
            subfolder=subfolder,
            saved_config=config,
            ignore_mismatched_sizes=bool(options.get("ignore_mismatched_sizes", False)),
            key_mapping=options.get("key_mapping"),
            **kwargs,
        )
        if not is_trainable:
            peft_model.eval()
        return peft_model


def model_name_or_path(model: nn.Module) -> str | None:
    """The Hub id or path a model was loaded from (transformers' ``name_or_path``, else its config's
    ``_name_or_path``), None when it has none (a model built from a config has ``""``)."""
    name = vars(model).get("name_or_path")
    if not name:
        name = getattr(vars(model).get("config"), "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def _above(module: str, name: str) -> Any:
    """``name`` from a module of a higher layer (the task classes, the mixed model), imported at call time so
    that this module imports nothing above it (PEFT resolves its task table at call time too)."""
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> Any:
    """Wraps ``model`` with a new adapter described by ``peft_config`` (PEFT's signature): the task class of
    ``peft_config.task_type`` (:mod:`deltatune.task_models`; a plain :class:`PeftModel` without one), or with
    ``mixed=True`` a :class:`~deltatune.mixed_model.PeftMixedModel`, which can hold adapters of different types.

    As in PEFT, ``peft_config.base_model_name_or_path`` becomes the model's own name (a warning says when that
    changes a value the config had), and wrapping a model that already holds adapter layers warns.

    Raises:
        ValueError: for an invalid config or targets (the message lists what exists).
    """
    old_name = peft_config.base_model_name_or_path
    peft_config.base_model_name_or_path = new_name = model_name_or_path(model)
    if any(isinstance(m, AdapterLayer) for m in model.modules()):  # PEFT's warning, first sentence as PEFT's
        nested = " wrapping a PeftModel again nests adapters." if isinstance(model, PeftModel) else ""
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time: it already holds adapter layers;"
            f"{nested} To start again with another config, call `.unload()` on the PeftModel first.",
            stacklevel=2,
        )
    if old_name is not None and old_name != new_name:
        warnings.warn(
            f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}' (the "
            "model's own name); make sure this base model is the one loaded with the saved adapter.",
            stacklevel=2,
        )
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(
                f"peft config has already set base model revision to {peft_config.revision}, overwriting with "
                f"revision {revision} (the revision argument of get_peft_model wins)",
                stacklevel=2,
            )
        peft_config.revision = revision
    if mixed:
        return _above("mixed_model", "PeftMixedModel")(model, peft_config, adapter_name)
    cls = _above("task_models", "peft_model_class")(peft_config.task_type)
    return cls(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
