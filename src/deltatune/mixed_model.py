"""Adapters of different types in one model: ``get_peft_model(model, config, mixed=True)`` returns a
:class:`PeftMixedModel` (PEFT's API), which holds LoRA (DoRA included), LoHa, LoKr and AdaLoRA adapters side by
side, several active at once.

Where two adapters of different methods target the same module, their layers nest as in PEFT: the layer of the
adapter added later wraps the earlier one (its ``base_layer`` child is that layer, see
:class:`deltatune._layer_helpers.BaseLayerSlot`), so its term is added to the earlier layer's output, and the
state dict has PEFT's layout (``q.base_layer.lora_A.<name>.weight``). Adapters of the same method share a layer,
and a DoRA adapter joins plain LoRA ones in their layer. As in PEFT, the order in which adapters apply is the
order they were added, not the order given to :meth:`PeftMixedModel.set_adapter`.

What PEFT leaves out, left out here with the same errors: saving (``save_pretrained`` raises
``NotImplementedError``; adapters are loaded with :meth:`~PeftMixedModel.load_adapter`), model cards,
``add_weighted_adapter`` and the layer and model status. IA³ is refused (PEFT's mixed model does not take it
either: it scales inputs or outputs rather than adding a term). Mixed-adapter batches (``adapter_names=``) are
not offered: the argument goes to the wrapped model, as in PEFT.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from torch import nn

from ._checkpointing import prepare_for_checkpointing
from .config import PeftConfig
from .layers import AdapterLayer
from .model import PeftModel
from .model_io import adapter_config
from .registry import available_methods, get_method, spec_for
from .serialization import LoadResult
from .tuner import AdapterModel

__all__ = ["MixedAdapterModel", "PeftMixedModel", "compatible_types", "mixable"]


def mixable(spec: Any) -> bool:
    """Whether a method's adapters can join a mixed model: each of its layer classes leaves the input alone and
    adds a term to the output of what it wraps (the default ``transform_output``), so layers of different
    methods nest and their terms sum. IA³ scales inputs or outputs instead (PEFT's mixed model refuses it too)."""
    return all(
        not cls.transforms_input and cls.transform_output is AdapterLayer.transform_output
        for cls in spec.layer_classes()
    )


def compatible_types() -> tuple[str, ...]:
    """The ``peft_type`` values a mixed model takes (PEFT's list, less the methods deltatune does not have)."""
    specs = [get_method(name) for name in available_methods()]
    return tuple(dict.fromkeys(spec.peft_type for spec in specs if mixable(spec)))


def check_config_compatible(config: PeftConfig) -> None:
    """Raises ``ValueError`` (PEFT's wording) for a config whose type a mixed model cannot hold."""
    if str(config.peft_type) not in compatible_types():
        raise ValueError(
            f"The provided `peft_type` '{config.peft_type}' is not compatible with the `PeftMixedModel`. "
            f"Compatible types are: {compatible_types()}"
        )


class MixedAdapterModel(AdapterModel):
    """The tuner of a mixed model: every method's layers, nested where they target one module. Of the methods'
    hooks it runs only the trainable extras (LoRA's ``bias``), as PEFT's mixed tuner does; AdaLoRA's rank
    allocation and regulariser do not run in a mixed model (PEFT's neither)."""

    NESTS_METHODS: ClassVar[bool] = True

    def check_new_adapter(self, adapter_name: str, config: Any) -> None:
        check_config_compatible(config)

    def extra_trainable_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        """What the adapter's own method trains besides its layers (LoRA's biases with ``bias="all"``)."""
        method_tuner: Any = spec_for(self.peft_config[adapter_name]).tuner_cls or AdapterModel
        return list(method_tuner.extra_trainable_parameters(self, adapter_name))

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activates the named adapters (unmerging a merged model first, with PEFT's warning)."""
        for _, layer in self.adapter_layers():
            if layer.merged:
                warnings.warn(
                    "Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=3
                )
                layer.unmerge()
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"Weighted adapters are not supported for {type(self).__name__} (yet).")


class PeftMixedModel(PeftModel):
    """A model with adapters of different types (PEFT's ``PeftMixedModel``; made by ``get_peft_model(...,
    mixed=True)``).

    Args:
        model: The base model (changed in place).
        peft_config: The first adapter's config (LoRA, DoRA, LoHa, LoKr or AdaLoRA).
        adapter_name: Its name.

    Raises:
        ValueError: for a config of another type (IA³).
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        check_config_compatible(peft_config)
        nn.Module.__init__(self)
        config = adapter_config(peft_config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self.base_model: AdapterModel = MixedAdapterModel(model, config, adapter_name)
        prepare_for_checkpointing(model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The model's forward with the active adapters (every argument goes to the model, as in PEFT)."""
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The model's ``generate`` with the active adapters."""
        generate = getattr(self.base_model.model, "generate", None)
        if not callable(generate):
            raise AttributeError(f"{type(self.base_model.model).__name__} has no generate()")
        return generate(*args, **kwargs)

    @property
    def active_adapter(self) -> Any:
        """The active adapter, or the list of them when several are active (as PEFT's mixed model)."""
        return self.base_model.active_adapter

    def _check_names(self, names: Sequence[str]) -> None:
        mismatched = sorted(set(names) - set(self.peft_config))
        if mismatched:
            raise ValueError(
                f"Adapter(s) {mismatched} not found, available adapters: {sorted(self.peft_config)}"
            )

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Adds an adapter of any compatible type, inactive and frozen (:meth:`set_adapter` activates it).

        Raises:
            ValueError: for a taken name or an incompatible type.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        check_config_compatible(peft_config)
        super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage, autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:  # type: ignore[override]
        """Activates one adapter or several (a list); they are applied in the order they were added, not in the
        order given. The active adapters become trainable unless ``inference_mode``.

        Raises:
            ValueError: naming unknown adapters.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        self.base_model.set_adapter(names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:  # type: ignore[override]
        """Deletes one adapter or several; the active ones that remain stay active.

        Raises:
            ValueError: naming unknown adapters, or merged ones (unmerge first, as in PEFT).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        merged = sorted(
            {n for _, layer in self.base_model.adapter_layers() for n in layer.merged_adapters} & set(names)
        )
        if merged:
            raise ValueError(
                f"Cannot delete adapter(s) {merged} while they are merged. Please unmerge them first."
            )
        remaining = [n for n in self.base_model.active_adapters if n not in names]
        for name in names:
            self.base_model.delete_adapter(name)
        if remaining:
            self.base_model.set_adapter(
                remaining, inference_mode=bool(self.peft_config[remaining[0]].inference_mode)
            )

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        strict: bool = True,
        **kwargs: Any,
    ) -> LoadResult:
        """Loads a saved adapter of any compatible type (PEFT's files) under ``adapter_name``, inactive; see
        :meth:`deltatune.PeftModel.load_adapter`.

        Raises:
            ValueError: for an adapter of an incompatible type.
        """
        return super().load_adapter(
            model_id, adapter_name, is_trainable=is_trainable, strict=strict, **kwargs
        )

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> PeftMixedModel:
        """A mixed model from a saved adapter (PEFT's files); more are added with :meth:`load_adapter`.

        Raises:
            ValueError: for an adapter type a mixed model cannot hold.
        """
        subfolder = kwargs.get("subfolder")
        if config is None:
            hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token") if k in kwargs}
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub)
        if str(config.peft_type) not in compatible_types():
            raise ValueError(f"Adapter of type {config.peft_type} is not supported for mixed models.")
        config.inference_mode = not is_trainable
        mixed = cls(model, config, adapter_name)
        mixed.load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)
        return mixed

    # ---- what PEFT's mixed model does not offer -------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        """Not supported, as in PEFT: save each adapter from a :class:`~deltatune.PeftModel`."""
        raise NotImplementedError(f"Saving is not supported for {type(self).__name__} (yet).")

    def create_or_update_model_card(self, output_dir: str) -> None:
        raise NotImplementedError(f"Model card creation is not supported for {type(self).__name__} (yet).")

    def get_layer_status(self) -> Any:
        raise TypeError(f"get_layer_status is not supported for {type(self).__name__}.")

    def get_model_status(self) -> Any:
        raise TypeError(f"get_model_status is not supported for {type(self).__name__}.")

    def push_to_hub(self, *args: Any, **kwargs: Any) -> str:
        raise NotImplementedError(f"Saving is not supported for {type(self).__name__} (yet).")
