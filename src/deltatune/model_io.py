"""Saving and loading for :class:`~deltatune.PeftModel` (a mixin): PEFT's files, model card, embeddings,
``load_adapter``'s result, trainability and dtype of loaded adapters.

Files: ``adapter_config.json`` (``inference_mode`` written ``true`` as PEFT does), ``adapter_model.safetensors``
(or ``.bin``), ``README.md``. The default adapter goes into the directory, others into ``<dir>/<name>/``.
Every file is written atomically.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from torch import nn

from ._version import __version__
from ._weights_io import refuse_non_float_tensors
from .config import PeftConfig, TargetingConfig
from .functional import get_peft_model_state_dict
from .matching import task_heads
from .model_card import update_model_card
from .names import model_config_dict
from .registry import available_methods, get_method
from .serialization import (
    LoadResult,
    check_config_fits_file,
    load_adapter_weights,
    save_adapter_weights,
    set_adapter_state_dict,
)
from .tuner import AdapterModel

logger = logging.getLogger(__name__)

__all__ = ["SaveLoadMixin", "adapter_config", "refuse_non_float_tensors", "remap_checkpoint_keys"]

#: ``from_pretrained``/``load_adapter`` options that are not Hub download options.
_LOAD_OPTIONS = (
    "autocast_adapter_dtype",
    "low_cpu_mem_usage",
    "ignore_mismatched_sizes",
    "torch_device",
    "key_mapping",
)
#: The prefix of the module keys in a saved adapter file.
_SAVED_PREFIX = "base_model.model."


def remap_checkpoint_keys(tensors: dict[str, Any], key_mapping: dict[str, str]) -> dict[str, Any]:
    """The adapter tensors with their module paths renamed as transformers renames a checkpoint's keys for a model
    whose layout changed (its ``_checkpoint_conversion_mapping``, ``{regex: replacement}``; PEFT applies it on
    load too): for each key, the first pattern that matches below ``base_model.model.`` rewrites it."""
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.startswith(_SAVED_PREFIX):
            rest = key[len(_SAVED_PREFIX) :]
            for pattern, replacement in key_mapping.items():
                renamed, count = re.subn(pattern, replacement, rest)
                if count:
                    key = _SAVED_PREFIX + renamed
                    break
        out[key] = value
    return out


def adapter_config(config: Any) -> TargetingConfig:
    """``config`` itself, checked to be one of deltatune's adapter configs, its ``modules_to_save`` extended
    by the heads its ``task_type`` trains (``["classifier", "score"]`` for ``SEQ_CLS`` and ``TOKEN_CLS``,
    ``["qa_outputs"]`` for ``QUESTION_ANS``), as PEFT's task classes record them (each once here; PEFT appends
    them again to a list that holds them).

    Raises:
        TypeError: naming the class that was given.
    """
    if not isinstance(config, TargetingConfig):
        names = ", ".join(dict.fromkeys(get_method(m).config_cls.__name__ for m in available_methods()))
        raise TypeError(f"expected a deltatune adapter config ({names}), got {type(config).__name__}")
    heads = task_heads(config)
    if heads and hasattr(config, "modules_to_save"):
        entries = list(config.modules_to_save or [])
        config.modules_to_save = entries + [head for head in heads if head not in entries]
    return config


class SaveLoadMixin(nn.Module):
    """``save_pretrained``, ``from_pretrained`` and ``load_adapter`` of :class:`~deltatune.PeftModel`."""

    base_model: AdapterModel

    @property
    def peft_config(self) -> dict[str, TargetingConfig]:
        """Adapter name → config."""
        return self.base_model.peft_config

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:  # defined in model.py
        raise NotImplementedError

    # ---- save -----------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Writes each adapter in PEFT's format, with a model card.

        Args:
            save_directory: Target directory (created); non-default adapters go to ``<dir>/<name>``.
            safe_serialization: safetensors (default) or a legacy ``adapter_model.bin``.
            selected_adapters: Adapters to save (None: all; an empty list: none, as PEFT).
            save_embedding_layers: Also save the full input/output embedding weights: ``"auto"`` when an
                embedding layer is targeted (``embed_tokens``, ``lm_head``), ``True`` or ``False``.
            is_main_process: Only the main process writes (distributed training).
            kwargs: ``state_dict``: save the values of this state dict of the model (what it lacks is left
                out), as a ``state_dict`` method set on the model does.
            path_initial_model_for_weight_conversion: The folder a PiSSA or OLoRA adapter was saved to right
                after initialisation: the adapter is saved converted to a plain LoRA adapter of twice the rank on
                the original base weights, and that folder's config is rewritten to plain LoRA (as PEFT does).

        Raises:
            ValueError: if ``save_directory`` is a file or an adapter name is unknown.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file, not a directory")
        if not is_main_process:
            return
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)  # []: none
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapters named {unknown}; adapters: {sorted(self.peft_config)}")
        os.makedirs(save_directory, exist_ok=True)
        for name in names:
            directory = os.path.join(save_directory, name) if name != "default" else os.fspath(save_directory)
            os.makedirs(directory, exist_ok=True)
            self.base_model.prepare_save(name)
            tensors = get_peft_model_state_dict(
                self,
                state_dict=self._state_dict_to_save(kwargs.get("state_dict")),
                adapter_name=name,
                save_embedding_layers=save_embedding_layers,
            )
            if any(t.numel() == 0 for t in tensors.values()):
                logger.info(
                    "adapter %r has modules pruned to rank 0 (empty tensors are saved as PEFT does)", name
                )
            config = self._config_to_save(name)
            if path_initial_model_for_weight_conversion is not None:
                initial_dir = os.fspath(path_initial_model_for_weight_conversion)
                tensors, config, initial_config = self.base_model.convert_initial_adapter(
                    tensors, load_adapter_weights(initial_dir), config
                )
                initial_config.save_pretrained(initial_dir, inference_mode=True)
            save_adapter_weights(tensors, directory, safe_serialization=safe_serialization)
            config.save_pretrained(directory, inference_mode=True)
            update_model_card(directory, config, __version__, self._base_model_id())

    def _state_dict_to_save(self, given: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """The state dict the values are saved from: ``state_dict=`` of ``save_pretrained``, or what a
        ``state_dict`` set on this model returns (DeepSpeed and FSDP gather it so), as PEFT reads
        ``model.state_dict()``; None: the model's own tensors."""
        if given is None and "state_dict" in vars(self):
            return self.state_dict()
        return given

    def _base_model_id(self) -> str | None:
        """The transformers base model's name or path (``config._name_or_path``), None for other models."""
        name = model_config_dict(self.base_model.model).get("_name_or_path")
        return str(name) if name else None

    def _config_to_save(self, adapter_name: str) -> TargetingConfig:
        """The config as written: legacy target names replaced by the ones this model uses (so PEFT can
        load the file on the same transformers version), and ``auto_mapping`` filled as PEFT does."""
        config = self.peft_config[adapter_name]
        data = config.to_dict()
        renamed = self.base_model.renamed_targets.get(adapter_name, {})
        for name in type(config).MODULE_LIST_FIELDS:  # target_modules, and lists that name targets too
            entries = getattr(config, name)
            if renamed and isinstance(entries, set | list):
                modern: set[str] = set()
                for entry in entries:
                    modern.update(renamed[entry].split(",") if entry in renamed else [entry])
                data[name] = sorted(modern)
        if config.task_type is None and config.auto_mapping is None:
            base = self.base_model.model
            data["auto_mapping"] = {
                "base_model_class": type(base).__name__,
                "parent_library": type(base).__module__,
            }
        return adapter_config(type(config).from_dict(data))

    # ---- load -----------------------------------------------------------------------------------
    @classmethod
    def _split_load_options(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: kwargs.pop(k) for k in _LOAD_OPTIONS if k in kwargs}

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        strict: bool = True,
        **kwargs: Any,
    ) -> LoadResult:
        """Loads a saved adapter into this model under ``adapter_name`` (a new one, inactive; or, for an existing
        name, its weights only, as the Trainer does when resuming: its ``requires_grad`` stays as it was, as PEFT).

        Args:
            model_id: Local directory or Hub repo id.
            adapter_name: Name for the adapter.
            is_trainable: Load the adapter for training: a new adapter's tensors require grad at once,
                though it stays inactive until ``set_adapter`` (as PEFT 0.21 does; other adapters keep their
                ``requires_grad``). Otherwise it is frozen for good (a frozen model stays frozen) and the model
                is put in eval mode.
            strict: Refuse tensors that match nothing and adapter tensors the file lacks.
            **kwargs: ``autocast_adapter_dtype`` (default True), ``ignore_mismatched_sizes``,
                ``low_cpu_mem_usage`` (no memory for the tensors until the file fills them), ``key_mapping``
                (``{regex: replacement}`` for the saved module paths; default: the model's
                ``_checkpoint_conversion_mapping``, as PEFT), ``subfolder`` and Hub download options.

        Returns:
            PEFT's load result: ``missing_keys`` (this adapter's tensors the file lacked) and
            ``unexpected_keys``.
        """
        options = self._split_load_options(kwargs)
        subfolder = kwargs.pop("subfolder", None)
        saved: TargetingConfig | None = None
        is_new = adapter_name not in self.peft_config
        if is_new:
            saved = adapter_config(PeftConfig.from_pretrained(model_id, subfolder=subfolder, **kwargs))
            saved.inference_mode = not is_trainable
            check_config_fits_file(
                saved, model_id, subfolder=subfolder, **kwargs
            )  # before allocating anything
            self.add_adapter(
                adapter_name,
                saved,
                low_cpu_mem_usage=bool(options.get("low_cpu_mem_usage", False)),
                autocast_adapter_dtype=options.get("autocast_adapter_dtype", True),
            )  # inactive, so created frozen
            if is_trainable:
                self.base_model.set_requires_grad(adapter_name, True)
        else:  # reloading an existing adapter (the Trainer resuming): the saved config may adapt the tensors
            try:
                saved = adapter_config(PeftConfig.from_pretrained(model_id, subfolder=subfolder, **kwargs))
            except FileNotFoundError:
                saved = None
        result = self._load_weights(
            model_id,
            adapter_name,
            strict=strict,
            subfolder=subfolder,
            saved_config=saved,
            ignore_mismatched_sizes=bool(options.get("ignore_mismatched_sizes", False)),
            key_mapping=options.get("key_mapping"),
            **kwargs,
        )
        if not is_trainable:
            if is_new:  # an existing adapter keeps its trainability: only its weights were replaced (PEFT)
                self.base_model.set_requires_grad(adapter_name, False)
            self.eval()
        return result

    def _load_weights(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        strict: bool,
        saved_config: TargetingConfig | None = None,
        ignore_mismatched_sizes: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> LoadResult:
        allow_base_weights = bool(kwargs.pop("allow_base_weights", False))
        tensors = load_adapter_weights(model_id, **kwargs)
        if (
            key_mapping is None
        ):  # PEFT's default: the model's own mapping of old checkpoint keys, if it has one
            key_mapping = getattr(self.base_model.model, "_checkpoint_conversion_mapping", None)
        if key_mapping:
            tensors = remap_checkpoint_keys(tensors, key_mapping)
        tensors = self.base_model.adapt_loaded_tensors(tensors, adapter_name, saved_config)
        return set_adapter_state_dict(
            self.base_model,
            tensors,
            adapter_name,
            strict=strict,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            allow_base_weights=allow_base_weights,
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


def load_peft_weights(
    model_id: str | os.PathLike[str],
    device: str | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """PEFT's ``load_peft_weights``: a saved adapter's tensors under their saved keys (safetensors preferred,
    a legacy ``.bin`` read with ``weights_only=True``); ``key_mapping`` (``{regex: replacement}``) renames the
    saved module paths; ``subfolder`` and Hub download options as in :meth:`PeftModel.load_adapter`.

    Raises:
        FileNotFoundError: when the folder or repo holds no adapter weights.
    """
    subfolder = hf_hub_download_kwargs.pop("subfolder", None)
    tensors = load_adapter_weights(
        model_id, subfolder=subfolder, device=device or "cpu", **hf_hub_download_kwargs
    )
    return remap_checkpoint_keys(tensors, key_mapping) if key_mapping else tensors
