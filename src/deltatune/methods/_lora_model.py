"""LoRA's tuner: the ``bias`` option's trainable and saved biases, ``add_weighted_adapter`` and PEFT's warning
when disabling adapters whose biases were trained (the layer lives in :mod:`.lora`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import NoMatchingPeftModuleError, TargetingConfig
from ..tuner import AdapterModel
from ._lora_layer import LoraBiasMergeError
from ._lora_weighted import add_weighted_adapter
from .lora import BIAS_CHOICES

__all__ = ["LoraBiasError", "LoraBiasMergeError", "LoraModel", "all_bias_tensors"]


def base_rewriting_init(config: TargetingConfig) -> str | None:
    """ "PiSSA", "OLoRA" or "CorDA" when ``config``'s initialisation rewrites the base weight, else None."""
    init = getattr(config, "init_lora_weights", None)
    if isinstance(init, str) and init.startswith("pissa"):
        return "PiSSA"
    return {"olora": "OLoRA", "corda": "CorDA"}.get(init) if isinstance(init, str) else None


class LoraBiasError(NotImplementedError, ValueError):
    """A ``bias`` value other than ``"none"``, ``"all"`` and ``"lora_only"``, found when the adapter is applied (a
    ``NotImplementedError`` there as in PEFT, and a ``ValueError`` as deltatune's config raised before)."""


class LoraModel(AdapterModel):
    """The tuner of LoRA and its variants: adds the ``bias`` option's trainable and saved biases."""

    def __init__(
        self,
        model: nn.Module,
        config: TargetingConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """The tuner (see :class:`~deltatune.tuner.AdapterModel`); a new EVA adapter created with its tensors in
        memory gets PEFT's ``get_peft_model`` warning (not one being loaded: ``inference_mode`` is set then)."""
        if getattr(config, "init_lora_weights", None) == "eva" and not (
            low_cpu_mem_usage or config.inference_mode
        ):
            warnings.warn(
                "lora with eva initialization used with low_cpu_mem_usage=False. Setting low_cpu_mem_usage=True "
                "can improve the maximum batch size possible for eva initialization.",
                stacklevel=4,
            )
        super().__init__(model, config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; with an active aLoRA adapter, its layers first get the positions it applies to
        from ``input_ids`` (see :mod:`.alora`)."""
        from ._alora_layer import ALoraLayer, offsets_from_inputs, uses_alora

        if uses_alora(self.peft_config, self.active_adapters):
            offsets = offsets_from_inputs(self.peft_config, list(self.active_adapters), args, kwargs)
            for _, layer in self.adapter_layers():
                if isinstance(layer, ALoraLayer):
                    layer.alora_offsets = offsets
        kwargs.pop("alora_offsets", None)  # PEFT's forward argument, for aLoRA only
        return super().forward(*args, **kwargs)

    def generation_context(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> contextlib.AbstractContextManager[None]:
        """aLoRA: its layers keep the prompt's offsets (or ``alora_offsets``, taken out of ``kwargs``) through
        ``generate`` (PEFT refuses beam search there).

        Raises:
            ValueError: for ``num_beams`` > 1 with an active aLoRA adapter.
        """
        from ._alora_layer import alora_offsets_kept, offsets_from_inputs, uses_alora

        if not uses_alora(self.peft_config, self.active_adapters):
            kwargs.pop("alora_offsets", None)  # PEFT's generate argument, for aLoRA only
            return contextlib.nullcontext()
        offsets = offsets_from_inputs(self.peft_config, list(self.active_adapters), args, kwargs)
        return alora_offsets_kept((layer for _, layer in self.adapter_layers()), offsets)

    def extra_trainable_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        """``bias="all"``: every bias outside the ``modules_to_save`` copies; ``"lora_only"``: the biases of
        the layers holding this adapter."""
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        if bias == "all":
            for name, p in self.model.named_parameters():
                if (
                    name.endswith(".bias")
                    and ".original_module." not in name
                    and ".modules_to_save." not in name
                ):
                    yield p
        elif bias == "lora_only":
            for _, layer in self.adapter_layers():
                layer_bias = layer.base_bias
                if layer.holds(adapter_name) and isinstance(layer_bias, nn.Parameter):
                    yield layer_bias

    def after_inject(self, adapter_name: str, config: TargetingConfig) -> None:
        """``ensure_weight_tying``'s tied output layer and ``trainable_token_indices``' trainable embedding rows
        (see :mod:`._lora_targets`)."""
        from ._lora_targets import inject_trainable_tokens, tie_adapters

        super().after_inject(adapter_name, config)
        if getattr(config, "target_parameters", None):
            from ._lora_params import LoraParamLayer, inject_parameters

            params = inject_parameters(self, adapter_name, config)
            self.targeted_parameter_names.extend(p for p in params if p not in self.targeted_parameter_names)
            modules = any(
                layer.holds(adapter_name) and not isinstance(layer, LoraParamLayer)
                for _, layer in self.adapter_layers()
            )
            if not params and not modules:
                found = (
                    f"target_parameters={list(getattr(config, 'target_parameters', []))} matched nothing in "
                )
                if not config.target_modules:  # PEFT's words first
                    raise NoMatchingPeftModuleError(
                        "No `target_modules` passed but also no `target_parameters` found. Please check the "
                        f"values for these arguments. ({found}{type(self.model).__name__})"
                    )
                raise NoMatchingPeftModuleError(
                    f"{found}{type(self.model).__name__} and neither did target_modules={config.target_modules!r}"
                )
            if config.target_modules and not modules:
                names = config.target_modules
                shown = set(names) if isinstance(names, list | tuple | set) else names  # PEFT shows a set
                warnings.warn(
                    f"target_modules={shown} were set but no module was matched.",
                    RuntimeWarning,
                    stacklevel=5,
                )
        tie_adapters(self, adapter_name, config)
        inject_trainable_tokens(self, adapter_name, config)

    def prepare_model(self, config: TargetingConfig) -> None:
        """``layer_replication``: the decoder stack rebuilt from ranges of its layers (:mod:`._lora_replication`)."""
        replication = getattr(config, "layer_replication", None)
        if replication:
            from ._lora_replication import replicate_layers

            replicate_layers(self.model, replication)

    def targets_beyond_modules(self, config: TargetingConfig) -> bool:
        """``target_parameters`` (matched after the modules)."""
        return bool(getattr(config, "target_parameters", None))

    def _fill_default_targets(self, config: TargetingConfig) -> None:
        """PEFT's defaults for the model type; with ``target_parameters``, none is needed."""
        try:
            super()._fill_default_targets(config)
        except ValueError:
            if not getattr(config, "target_parameters", None):
                raise

    def _check_merge_allowed(self) -> None:
        """PEFT's rules before merging: refused with replicated layers (their base weights are shared, so each
        copy's ΔW would land in every copy; peft 0.21 means to refuse this but its check never fires), and a
        warning when a tied embedding is a target.

        Raises:
            ValueError: when an adapter uses ``layer_replication``.
        """
        from ._lora_targets import warn_tied_merge

        if any(getattr(c, "layer_replication", None) for c in self.peft_config.values()):
            raise ValueError("Cannot merge LORA layers when base model layers are replicated")
        warn_tied_merge(self)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merges in place (see :meth:`_check_merge_allowed`)."""
        self._check_merge_allowed()
        super().merge_adapter(adapter_names, safe_merge)

    def unload_and_optionally_merge(
        self,
        merge: bool,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        progressbar: bool = False,
    ) -> nn.Module:
        """Unloads (merging first when ``merge``); with tied embeddings, PEFT's warnings, and the model's
        ``tie_word_embeddings`` set to False when merging untied them."""
        from ._lora_targets import untie_after_merge

        if merge:
            self._check_merge_allowed()
        model = super().unload_and_optionally_merge(merge, safe_merge, adapter_names, progressbar)
        if merge:
            untie_after_merge(model)
        return model

    def check_new_adapter(self, adapter_name: str, config: TargetingConfig) -> None:
        """PEFT's rules: ``bias`` is one of its values, and only one adapter of a model trains biases (the base
        biases are shared); others have ``bias="none"``.

        Raises:
            LoraBiasError: (a ``NotImplementedError``) for an unknown ``bias``.
            ValueError: when this and an existing adapter both have ``bias`` other than ``"none"``.
        """
        from ._lora_targets import check_tied_modules

        super().check_new_adapter(adapter_name, config)
        bias = getattr(config, "bias", "none")
        if bias not in BIAS_CHOICES:
            raise LoraBiasError(
                f"Requested bias: {bias}, is not implemented; bias must be one of {', '.join(map(repr, BIAS_CHOICES))}"
            )
        check_tied_modules(self, config)
        check_kasa_mixing(self.peft_config, config)
        wanted = set(getattr(config, "target_parameters", None) or ())
        for name, other in self.peft_config.items():
            theirs = set(getattr(other, "target_parameters", None) or ())
            if wanted and theirs and theirs != wanted:
                raise ValueError(
                    "When using multiple adapters with `target_parameters`, all adapters must target the same set "
                    f"of parameters, but got {sorted(wanted)} for the new adapter and {sorted(theirs)} for adapter "
                    f"'{name}'."
                )
        configs = [*self.peft_config.values(), config]
        rewriting = [base_rewriting_init(c) for c in configs if base_rewriting_init(c)]
        if len(configs) > 1 and rewriting:
            warnings.warn(
                f"{rewriting[0]} changes the base weights of the model, so it should not be combined with other "
                "adapters; save it converted to a plain LoRA adapter "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...))",
                stacklevel=4,
            )
        if sum(getattr(c, "bias", "none") != "none" for c in configs) > 1:
            raise ValueError(
                f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, set bias "
                "to 'none' for all adapters."
            )

    def _get_kasa_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """KaSA's regularisers summed over its layers (PEFT's method, for the user to add to the task loss):
        β·Σd² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) per layer and adapter, β and γ from each adapter's
        ``kasa_config``; ``adapter_names`` default the active adapters. 0.0 when no KaSA layer holds them."""
        from ._kasa_layer import KasaLayer

        names = self.active_adapters if adapter_names is None else adapter_names
        names = [names] if isinstance(names, str) else list(names)
        total: torch.Tensor | float = 0.0
        for _, layer in self.adapter_layers():
            if not isinstance(layer, KasaLayer):
                continue
            for name in names:
                options = (
                    getattr(self.peft_config[name], "kasa_config", None) if name in layer.lora_diag else None
                )
                if options is not None:
                    total = total + layer.regularization(name, options.beta, options.gamma)
        return total

    def disable_adapter_layers(self) -> None:
        """Disables every adapter layer; warns, as PEFT does, when the active adapters trained biases (those stay
        in the base layers, so the output is not the base model's)."""
        for name in self.active_adapters:
            bias = getattr(self.peft_config[name], "bias", "none")
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                    "same output as the base model would without adaption.",
                    stacklevel=3,
                )
        super().disable_adapter_layers()

    def convert_initial_adapter(
        self, tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config: TargetingConfig
    ) -> tuple[dict[str, torch.Tensor], TargetingConfig, TargetingConfig]:
        """PEFT's conversion of a PiSSA/OLoRA adapter to plain LoRA of rank 2r on the original base (see
        :mod:`._lora_init`); the initial folder's config becomes plain LoRA so that loading it does not
        decompose the base again.

        Raises:
            ValueError: with ``use_rslora`` and a rank or alpha pattern (the scaling cannot be kept).
        """
        from ._lora_init import converted_config_data, converted_lora_tensors

        data = config.to_dict()
        if data.get("use_rslora") and (data.get("rank_pattern") or data.get("alpha_pattern")):
            raise ValueError(
                "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
                "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
            )
        init = str(data.get("init_lora_weights")).lower()
        if not init.startswith(("pissa", "olora", "corda", "lora_ga", "true")):
            warnings.warn(
                "`path_initial_model_for_weight_conversion` only works for converting a PiSSA/CorDA/OLoRA/LoRA-GA "
                "adapter to a LoRA adapter",
                stacklevel=4,
            )
        with warnings.catch_warnings():  # the CorDA/EVA options stay in the files, as PEFT writes them
            warnings.filterwarnings("ignore", message=r"`(corda|eva)_config` specified but will be ignored")
            initial_config = type(config).from_dict({**data, "init_lora_weights": True})
            converted = type(config).from_dict(converted_config_data(data))
        assert isinstance(initial_config, TargetingConfig) and isinstance(converted, TargetingConfig)
        return converted_lora_tensors(tensors, initial), converted, initial_config

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any
    ) -> None:
        """Adds ``adapter_name``, a weighted combination of ``adapters`` (PEFT's ``add_weighted_adapter``:
        ``combination_type`` ``"svd"`` (default), ``"cat"``, ``"linear"``, ``"ties"``, ``"dare_linear"``,
        ``"dare_ties"``, ``"magnitude_prune"`` and the ``*_svd`` forms; see :mod:`._lora_weighted`)."""
        add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs)

    def extra_saved_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The trained biases under PEFT's keys (see :func:`all_bias_tensors` for ``bias="all"``)."""
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        if bias == "all":
            return all_bias_tensors(self, adapter_name)
        out: dict[str, torch.Tensor] = {}
        if bias == "lora_only":
            for name, layer in self.adapter_layers():
                layer_bias = layer.base_bias
                if layer.holds(adapter_name) and layer_bias is not None:
                    out[f"{name}.base_layer.bias"] = layer_bias.detach()
        return out


def check_kasa_mixing(configs: dict[str, Any], config: TargetingConfig) -> None:
    """PEFT's rule: KaSA adapters (which truncate the base weight) share a model only with KaSA adapters.

    Raises:
        ValueError: naming the existing adapter that does (or does not) use KaSA.
    """
    new_uses = getattr(config, "kasa_config", None) is not None
    for name, other in configs.items():
        if other is not config and (getattr(other, "kasa_config", None) is not None) is not new_uses:
            raise ValueError(
                "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base weights: "
                f"the new adapter {'uses' if new_uses else 'does not use'} KaSA but adapter '{name}' "
                f"{'does not' if new_uses else 'does'}."
            )


def all_bias_tensors(tuner: AdapterModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """``bias="all"``: every state-dict key containing ``bias``, as PEFT selects them.

    PEFT's sweep also picks up the biases inside ``modules_to_save`` wrappers and writes them as
    ``<module>.original_module.bias`` and ``<module>.modules_to_save.bias`` (besides ``<module>.bias``);
    they are written here too so that both libraries produce the same key set.
    """
    skip = tuple(
        f"{name}.{attr}."
        for name, layer in tuner.adapter_layers()
        for attr in (*layer.adapter_param_names, *layer.other_param_names)
    )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tuner.model.state_dict().items():
        if "bias" not in key or key.startswith(skip):
            continue
        if ".modules_to_save." in key:
            marker = f".modules_to_save.{adapter_name}."
            if marker not in key:
                continue  # another adapter's copy
            key = key.replace(marker, ".modules_to_save.")
        out.setdefault(key, tensor)
    return out
