"""``PeftModel``: the user-facing wrapper — adapters, save/load, merge, counting.

Attribute access falls through to the wrapped model, so ``model.config``, ``main_input_name`` and
friends work, and ``transformers.Trainer`` and pipelines can drive it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .config import AdapterConfig, PeftConfig
from .registry import available_methods, get_method, spec_for
from .serialization import (
    check_config_fits_file,
    get_adapter_state_dict,
    load_adapter_weights,
    save_adapter_weights,
    set_adapter_state_dict,
)
from .tuner import AdapterModel

logger = logging.getLogger(__name__)

__all__ = ["PeftModel", "get_peft_model"]


def _adapter_config(config: Any) -> AdapterConfig:
    """``config`` itself, checked to be one of deltatune's adapter configs."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(
            f"expected a deltatune adapter config ({', '.join(_config_names())}), got {type(config).__name__}"
        )
    return config


def _config_names() -> list[str]:
    return list(dict.fromkeys(get_method(m).config_cls.__name__ for m in available_methods()))


def _tuner_class(config: PeftConfig) -> type[AdapterModel]:
    tuner = spec_for(config).tuner_cls or AdapterModel
    if not issubclass(tuner, AdapterModel):
        raise TypeError(f"the tuner of {type(config).__name__} is not an AdapterModel: {tuner!r}")
    return tuner


class PeftModel(nn.Module):
    """A model with one or more named adapters.

    Args:
        model: The base model (changed in place: targeted modules are wrapped).
        peft_config: Config of the first adapter.
        adapter_name: Its name (default ``"default"``).

    Attributes:
        base_model: The tuner (:class:`~deltatune.inject.AdapterModel`); ``base_model.model`` is the
            user's model.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(peft_config, AdapterConfig):
            raise TypeError(f"expected a deltatune adapter config, got {type(peft_config).__name__}")
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self.base_model: AdapterModel = _tuner_class(peft_config)(model, peft_config, adapter_name)
        self.modules_to_save = set(peft_config.modules_to_save or [])

    # ---- fall-through ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """Adapter name → config."""
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self.base_model.active_adapter]

    @property
    def peft_type(self) -> str | None:
        return self.peft_config[self.active_adapter].peft_type

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

    # ---- adapters -------------------------------------------------------------------------------
    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Adds a new adapter (not activated; call :meth:`set_adapter`)."""
        if not isinstance(peft_config, AdapterConfig):
            raise TypeError(f"expected a deltatune adapter config, got {type(peft_config).__name__}")
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = self.peft_config[
                self.active_adapter
            ].base_model_name_or_path
        self.base_model.inject_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str) -> None:
        """Activates ``adapter_name`` and makes it the trainable one."""
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Deletes ``adapter_name`` from the model."""
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model behaves exactly like the base model."""
        self.base_model.enable_adapter_layers(False)
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers(True)

    # ---- merge ----------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Folds the adapter into the base weights in place (undo with :meth:`unmerge_adapter`)."""
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

    # ---- save / load ----------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's format).

        The default adapter goes into ``save_directory``, others into ``save_directory/<name>``. Files
        are written atomically: an interrupted save leaves any previous files intact.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file, not a directory")
        if not is_main_process:
            return
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapters named {unknown}; adapters: {sorted(self.peft_config)}")
        for name in names:
            directory = os.path.join(save_directory, name) if name != "default" else os.fspath(save_directory)
            os.makedirs(directory, exist_ok=True)
            self.base_model.prepare_save(name)
            tensors = get_adapter_state_dict(self.base_model, name)
            if any(t.numel() == 0 for t in tensors.values()):
                logger.info(
                    "adapter %r has modules pruned to rank 0 (empty tensors are saved as PEFT does)", name
                )
            save_adapter_weights(tensors, directory, safe_serialization=safe_serialization)
            self._config_to_save(name).save_pretrained(directory)

    def _config_to_save(self, adapter_name: str) -> AdapterConfig:
        """The config as written: legacy target names replaced by the ones this model uses (so PEFT can
        load the file on the same transformers version), and ``auto_mapping`` filled as PEFT does."""
        config = self.peft_config[adapter_name]
        data = config.to_dict()
        renamed = self.base_model.renamed_targets.get(adapter_name, {})
        if renamed and isinstance(config.target_modules, set):
            targets: set[str] = set()
            for entry in config.target_modules:
                targets.update(renamed[entry].split(",") if entry in renamed else [entry])
            data["target_modules"] = sorted(targets)
        if config.task_type is None and config.auto_mapping is None:
            base = self.base_model.model
            data["auto_mapping"] = {
                "base_model_class": type(base).__name__,
                "parent_library": type(base).__module__,
            }
        return _adapter_config(type(config).from_dict(data))

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
            **kwargs: Hub options (``revision``, ``token``, ...) and ``allow_base_weights=True`` to load a file
                whose tensors overwrite frozen base-model weights (refused by default).

        Raises:
            ValueError: for a config that does not fit its weights file (checked before allocating), tensors
                holding NaN/inf, or tensors that would overwrite base weights.
        """
        subfolder = kwargs.pop("subfolder", None)
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **kwargs)
        config = _adapter_config(config)
        config.inference_mode = not is_trainable
        check_config_fits_file(config, model_id, subfolder=subfolder, **kwargs)  # before allocating anything
        peft_model = cls(model, config, adapter_name)
        peft_model._load_weights(
            model_id, adapter_name, strict=strict, subfolder=subfolder, saved_config=config, **kwargs
        )
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        strict: bool = True,
        **kwargs: Any,
    ) -> None:
        """Loads another saved adapter into this model under ``adapter_name`` (or reloads an existing
        one's weights, e.g. when the Trainer resumes)."""
        subfolder = kwargs.pop("subfolder", None)
        saved: AdapterConfig | None = None
        if adapter_name not in self.peft_config:
            saved = _adapter_config(PeftConfig.from_pretrained(model_id, subfolder=subfolder, **kwargs))
            saved.inference_mode = not is_trainable
            check_config_fits_file(
                saved, model_id, subfolder=subfolder, **kwargs
            )  # before allocating anything
            self.add_adapter(adapter_name, saved)
        else:  # reloading an existing adapter (the Trainer resuming): the saved config may adapt the tensors
            try:
                saved = _adapter_config(PeftConfig.from_pretrained(model_id, subfolder=subfolder, **kwargs))
            except FileNotFoundError:
                saved = None
        self._load_weights(
            model_id, adapter_name, strict=strict, subfolder=subfolder, saved_config=saved, **kwargs
        )
        if not is_trainable:
            for _, layer in self.base_model.adapter_layers():
                for p in layer.adapter_parameters(adapter_name):
                    p.requires_grad_(False)

    def _load_weights(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        strict: bool,
        saved_config: AdapterConfig | None = None,
        **kwargs: Any,
    ) -> None:
        allow_base_weights = bool(kwargs.pop("allow_base_weights", False))
        tensors = load_adapter_weights(model_id, **kwargs)
        tensors = self.base_model.adapt_loaded_tensors(tensors, adapter_name, saved_config)
        set_adapter_state_dict(
            self.base_model, tensors, adapter_name, strict=strict, allow_base_weights=allow_base_weights
        )

    def push_to_hub(
        self, repo_id: str, private: bool | None = None, token: str | None = None, **kwargs: Any
    ) -> str:
        """Saves the adapter to a temporary directory and uploads it to the Hub; returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=kwargs.get("commit_message", "Upload adapter"),
            )
        return str(info)


class PeftModelForSequenceClassification(PeftModel):
    """Alias returned for ``task_type="SEQ_CLS"`` (behaves as :class:`PeftModel`)."""


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wraps ``model`` with a new adapter described by ``peft_config`` (PEFT's signature).

    Raises:
        ValueError: for an invalid config or targets (the message lists what exists).
    """
    if mixed:
        raise ValueError("mixed adapter types in one model are not supported by deltatune (mixed=True)")
    if any(isinstance(m, PeftModel) for m in [model]):
        warnings.warn("the model is already a PeftModel; wrapping it again nests adapters", stacklevel=2)
    if revision is not None:
        peft_config.revision = revision
    if peft_config.task_type == "SEQ_CLS":
        return PeftModelForSequenceClassification(model, peft_config, adapter_name)
    return PeftModel(model, peft_config, adapter_name)
