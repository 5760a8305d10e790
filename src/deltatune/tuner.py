"""The tuner: wraps the targets of an adapter config in adapter layers, and unwraps them; trainability;
merging; and the hooks through which a method adds behaviour (generic code calls hooks, never names).

Target matching is :mod:`deltatune.matching`; the layer class comes from the method's registry entry
(:func:`deltatune.registry.spec_for`). A method that needs more than layers — an extra loss term, work
after each optimiser step, tensors adapted on save or load, resumable state — subclasses
:class:`AdapterModel` and overrides the hooks of :class:`~deltatune.hooks.MethodHooks` (no-op defaults).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from .config import NoMatchingPeftModuleError, TargetingConfig
from .layer_types import is_linear_like
from .layers import AdapterLayer
from .matching import (
    ALL_LINEAR,
    SEQ_CLS_HEADS,
    closest_names,
    is_excluded,
    layers_note,
    match_list_entry,
    match_target,
    matching_entry,
    modules_to_save_entries,
    task_heads,
)
from .modules_to_save import AdapterLayerHolder, ModulesToSaveWrapper
from .names import NameAliases, model_config_dict
from .plain_trainer import TRAINER_WALKS, WALKS_KEY, adapt_plain_trainer, mark_trainer_found
from .registry import spec_for
from .switching import AdapterSwitching

logger = logging.getLogger(__name__)

__all__ = ["AdapterModel"]

#: Module containers that ``modules_to_save`` cannot wrap (they have no forward of their own; PEFT's list).
CONTAINER_TYPES = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


class AdapterModel(AdapterSwitching, nn.Module):
    """The tuner: holds the user's model (changed in place) and the adapter configs.

    A method customises it by overriding the :class:`~deltatune.hooks.MethodHooks` it inherits.

    Its ``model`` attribute is the user's model, so state-dict keys of a :class:`~deltatune.PeftModel`
    start with ``base_model.model.`` exactly as in PEFT.

    Args:
        model: The model to adapt.
        config: Config of the first adapter.
        adapter_name: Name of the first adapter.
    """

    #: Whether adapters of different types may share the model, a layer of one method wrapping a layer of another
    #: as in PEFT's mixed model (:mod:`deltatune.mixed_model`); else all adapters share one ``peft_type``.
    NESTS_METHODS: ClassVar[bool] = False
    #: The base model's config as a plain dict, as PEFT's ``BaseTuner.get_model_config`` (see
    #: :func:`deltatune.names.model_config_dict`).
    get_model_config = staticmethod(model_config_dict)

    def __init__(
        self,
        model: nn.Module,
        config: TargetingConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, TargetingConfig] = {}
        self._active = [adapter_name]
        self.aliases = NameAliases(model)
        #: adapter name → {target entry written in a legacy spelling: modern entry}
        self.renamed_targets: dict[str, dict[str, str]] = {}
        #: Names (relative to the user's model) of every module an adapter wraps, in wrapping order.
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []  # "module.parameter" (LoRA's target_parameters)
        self._extra_loss_scale = 1.0
        self.inject_adapter(
            adapter_name,
            config,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        self._mark_trainable()

    @property
    def prefix(self) -> str:
        """The prefix shared by the adapter tensors' names (``"lora_"``), from the method's registry entry."""
        return spec_for(next(iter(self.peft_config.values()))).prefix

    # ---- plumbing ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; in training, :meth:`extra_loss` is added to a returned ``loss`` (PEFT's place
        for AdaLoRA's regulariser, so plain training loops get it too)."""
        walks = self.__dict__.get(WALKS_KEY, 0)
        if self.training and walks < TRAINER_WALKS:  # the first training forwards: a plain Trainer?
            mark_trainer_found(self, adapt_plain_trainer(self) is not None)
        outputs = self.model(*args, **kwargs)
        if self.training:
            loss = getattr(outputs, "loss", None)
            if isinstance(loss, torch.Tensor):
                extra = self.extra_loss()
                if extra is not None:
                    outputs.loss = loss + self._extra_loss_scale * extra
        return outputs

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """(name, layer) for every adapter layer, names relative to the user's model."""
        for name, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def saved_module_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """(name, wrapper) for every ``modules_to_save`` wrapper."""
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _candidate_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules of the user's model, skipping the insides of our wrappers."""
        out: list[tuple[str, nn.Module]] = []
        skip: list[str] = []
        for name, module in self.model.named_modules():
            if not name or any(name.startswith(p + ".") for p in skip):
                continue
            out.append((name, module))
            if isinstance(module, AdapterLayer | ModulesToSaveWrapper | AdapterLayerHolder):
                skip.append(name)
        return out

    def name_variants(self, name: str) -> list[str]:
        """``name`` and, where it differs, its transformers 4.x spelling."""
        legacy = self.aliases.legacy(name)
        return [name] if legacy == name else [name, legacy]

    def _is_output_head(self, name: str, config: TargetingConfig) -> bool:
        """Whether ``name`` is the output embedding or (SEQ_CLS) the classifier head: ``"all-linear"`` skips it."""
        get_out = getattr(self.model, "get_output_embeddings", None)
        try:
            head = get_out() if callable(get_out) else None
        except (NotImplementedError, AttributeError):  # a model without embeddings (vision) has no such head
            head = None
        if head is not None and self.model.get_submodule(name) is head:
            return True
        task_type = getattr(config.task_type, "value", config.task_type)
        return task_type == "SEQ_CLS" and name.rsplit(".", 1)[-1] in SEQ_CLS_HEADS

    @contextlib.contextmanager
    def scaled_extra_loss(self, factor: float) -> Iterator[None]:
        """Within the block, :meth:`extra_loss` is added multiplied by ``factor`` (the Trainer divides it by
        the micro-batches and processes whose losses it sums, so its weight per optimiser step stays put)."""
        previous = self._extra_loss_scale
        self._extra_loss_scale = previous * factor
        try:
            yield
        finally:
            self._extra_loss_scale = previous

    # ---- injection --------------------------------------------------------------------------
    def inject_adapter(
        self,
        adapter_name: str,
        config: TargetingConfig,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Wraps every target of ``config`` (and its ``modules_to_save``) for ``adapter_name``.

        Args:
            adapter_name: Name of the new adapter.
            config: Its config; ``target_modules=None`` takes PEFT's default for the model type.
            autocast_adapter_dtype: Keep the adapter in fp32 over an fp16/bf16 base (PEFT's default); False
                keeps it in the base weight's dtype.
            low_cpu_mem_usage: Create the adapter tensors on the ``meta`` device (no memory): loading its
                weights materialises them (``from_pretrained``/``load_adapter`` with the same flag).

        Raises:
            NoMatchingPeftModuleError: (a ``ValueError``) if nothing matches.
            ValueError: if the name is taken, the method differs from the model's, a match cannot be adapted,
                or a ``modules_to_save`` entry names nothing.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists; choose another name")
        spec = spec_for(config)
        existing = {spec_for(c).peft_type: spec_for(c).name for c in self.peft_config.values()}
        if existing and spec.peft_type not in existing and not self.NESTS_METHODS:
            raise ValueError(
                f"this model holds {', '.join(sorted(existing.values()))} adapters; adding a {spec.name} adapter "
                "needs a mixed model (get_peft_model(..., mixed=True)), or merge_and_unload() first"
            )
        if config.target_modules is None:
            self._fill_default_targets(config)
        self.check_new_adapter(adapter_name, config)
        self.prepare_model(config)
        candidates = self._candidate_modules()
        plan: list[tuple[str, nn.Module]] = []
        legacy: list[tuple[str, str]] = []  # (target entry, module) matched through a legacy spelling
        wrong_type: list[tuple[str, type[nn.Module]]] = []
        excluded_any = (
            not config.exclude_modules
        )  # whether exclude_modules excluded anything (PEFT warns if not)
        for name, module in candidates:
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            variants = self.name_variants(name)
            excluded_any = excluded_any or is_excluded(config, variants)
            hit = match_target(
                config, variants, is_linear_like(base), partial(self._is_output_head, name, config)
            )
            if hit is None:
                continue
            if not isinstance(base, spec.supported_layers):
                if config.target_modules != ALL_LINEAR:
                    wrong_type.append((name, type(base)))
                continue
            if self._layer_action(module, spec) is None:
                raise ValueError(f"{name} already holds a {type(module).__name__}; cannot add {spec.name}")
            plan.append((name, module))
            entry = matching_entry(config, hit)
            if hit != name and entry is not None:
                legacy.append((entry, name))
        if wrong_type:
            raise ValueError(spec.wrong_layers_message(wrong_type))
        if not plan and not self.targets_beyond_modules(config):
            raise NoMatchingPeftModuleError(self._no_match_message(config, [n for n, _ in candidates]))
        if not excluded_any:
            warnings.warn(
                f"You have passed exclude_modules={config.exclude_modules} but no modules were excluded: no module "
                "name of the model matches it (exact name, '.name' suffix, or regex full match).",
                stacklevel=4,
            )
        self._modules_to_save_targets(config)  # raises before anything is changed
        matched = self._build_layers(plan, adapter_name, config)
        if legacy:
            logger.info(
                "target_modules matched %d modules through their transformers 4.x names, e.g. %s -> %s",
                len(legacy),
                legacy[0][0],
                legacy[0][1],
            )
        self._wrap_modules_to_save(adapter_name, config)
        self.renamed_targets[adapter_name] = self._modern_entries(legacy, matched)
        self.peft_config[adapter_name] = config
        self.targeted_module_names.extend(n for n in matched if n not in self.targeted_module_names)
        for _, layer in self.adapter_layers():
            if not autocast_adapter_dtype:
                layer.cast_adapter(adapter_name, layer.base_weight.dtype)
            if low_cpu_mem_usage:
                layer.adapter_to_meta(adapter_name)
            # A new adapter stays inactive and frozen (PEFT semantics) unless it is the first one; every layer
            # lists the model's active adapters, held here or not.
            if adapter_name not in self._active:
                layer.active_adapters = list(self._active)
                for p in layer.adapter_parameters(adapter_name):
                    p.requires_grad_(False)
        self.after_inject(adapter_name, config)

    def _fill_default_targets(self, config: TargetingConfig) -> None:
        """``target_modules`` from the config class's table of defaults per transformers model type (PEFT's).

        Raises:
            ValueError: when the model has no known type or the method has no default for it.
        """
        model_type = self.get_model_config(self.model).get("model_type")
        if not config.fill_model_defaults(model_type):
            known = f" (no default is known for model_type={model_type!r})" if model_type else ""
            raise ValueError(
                f"Please specify `target_modules` in `peft_config`: target_modules is required{known}; e.g. "
                "target_modules=['q_proj', 'v_proj'], a regex string, or 'all-linear'"
            )

    def _build_layers(
        self, plan: list[tuple[str, nn.Module]], adapter_name: str, config: TargetingConfig
    ) -> list[str]:
        """Creates ``adapter_name`` in every planned module (each layer built from the module's
        :class:`~deltatune.config.TargetSpec`), then swaps the new layers in. If any layer refuses (e.g. a
        grouped conv for LoRA), the model is left exactly as it was."""
        spec = spec_for(config)
        created: list[tuple[str, AdapterLayer]] = []
        updated: list[AdapterLayer] = []
        try:
            for name, module in plan:
                target = config.target_spec(name, self.name_variants(name))
                action = self._layer_action(module, spec)
                if isinstance(module, AdapterLayer) and action in ("add", "extend"):
                    if (
                        action == "extend"
                    ):  # e.g. a LoRA layer becomes a DoRA layer (it keeps its LoRA adapters)
                        spec.layer_class_for(module.base_layer).extend_layer(module)
                    updated.append(module)
                    module.add_adapter(adapter_name, target)
                else:  # a new layer over the module, or in a mixed model over another method's layer
                    base = module.base_layer if isinstance(module, AdapterLayer) else module
                    layer: AdapterLayer = spec.layer_class_for(base)(module)
                    layer.add_adapter(adapter_name, target)
                    created.append((name, layer))
        except Exception:
            for layer in updated:
                layer.delete_adapter(adapter_name)
            raise
        for name, layer in created:
            self.model.set_submodule(name, layer)
        return [name for name, _ in plan]

    def _layer_action(self, module: nn.Module, spec: Any) -> str | None:
        """How an adapter of ``spec``'s method goes into the target ``module``: ``"new"`` (wrap the plain module),
        ``"add"`` (its layer holds this method's adapters), ``"extend"`` (its layer's class is extended by the
        method's layer class, which can hold both kinds: a LoRA layer taking a DoRA adapter, as in PEFT),
        ``"nest"`` (a mixed model: the method's layer wraps it); None when it cannot take the adapter."""
        if not isinstance(module, AdapterLayer):
            return "new"
        if isinstance(module, spec.layer_classes()):
            return "add"
        cls = spec.layer_class_for(module.base_layer)
        if issubclass(cls, type(module)) and hasattr(cls, "extend_layer"):
            return "extend"
        return "nest" if self.NESTS_METHODS else None

    def _modern_entries(self, hits: list[tuple[str, str]], matched: list[str]) -> dict[str, str]:
        """For list entries matched through legacy names, the modern entry matching the same modules (the
        last as many name components as the entry has), so saved configs load in PEFT on this transformers."""
        renamed: dict[str, str] = {}
        for entry in dict.fromkeys(e for e, _ in hits):
            depth = entry.count(".") + 1
            modern = {".".join(n.split(".")[-depth:]) for e, n in hits if e == entry}
            for candidate in sorted(modern):
                covered = {n for n in matched if match_list_entry(n, candidate)}
                if not covered <= set(matched):
                    break
            else:
                renamed[entry] = ",".join(sorted(modern))
        return renamed

    def _no_match_message(self, config: TargetingConfig, names: list[str]) -> str:
        targets = config.target_modules
        note, layered = layers_note(config, [self.name_variants(n) for n in names])
        if layered:  # the targets exist: layers_to_transform selects none of them
            return f"Target modules {targets} not found in the base model.{note}"
        entries = [targets] if isinstance(targets, str) else sorted(targets or [])
        hints = {e: closest_names(e, names) for e in entries}
        excluded = [n for n in names if is_excluded(config, self.name_variants(n))]
        ruled_out = {  # an entry that names modules only exclude_modules / modules_to_save keep from targeting
            e: [n for n in excluded if any(match_list_entry(v, e) for v in self.name_variants(n))]
            for e in entries
        }
        hint_text = "; ".join(
            f"{e!r}: matches {ruled_out[e][:3]}, which modules_to_save (trained in full) or exclude_modules keeps "
            "from being targeted; target other layers"
            if ruled_out[e]
            else (f"{e!r}: closest {h}" if h else f"{e!r}: no similar name")
            for e, h in hints.items()
        )
        supported = spec_for(config).supported_layers
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, supported)}
        )
        kinds = "/".join(t.__name__ for t in supported)
        # PEFT's first sentence for its three cases (its users and tests match on it), then deltatune's hints
        if excluded and len(excluded) == len(names):
            lead = (
                "All modules were excluded. This is likely unintended: check target_modules, exclude_modules "
            )
            lead += "and modules_to_save."
        elif excluded:
            lead = "No modules were targeted for adaptation. This might be caused by a combination of mismatched "
            lead += "target modules and excluded modules (exclude_modules, modules_to_save)."
        else:
            lead = f"Target modules {targets} not found in the base model."
        return (
            f"{lead}{note} target_modules={entries} matched no module of {type(self.model).__name__} "
            f"({hint_text}). {kinds} module names in this model: {leaves[:20]}"
        )

    def _modules_to_save_targets(self, config: TargetingConfig) -> list[tuple[str, nn.Module]]:
        """The modules that ``modules_to_save`` names (checked, nothing changed).

        Raises:
            ValueError: if an entry names no module (the heads a ``task_type`` adds may be absent), or names
                a module that is an adapter target.
            TypeError: if an entry names a ``ModuleDict``/``ModuleList``/``ParameterDict``/``ParameterList``
                (PEFT's type).
        """
        candidates = self._candidate_modules()
        names = [n for n, _ in candidates]
        optional = task_heads(config)
        found: list[tuple[str, nn.Module]] = []
        for entry in modules_to_save_entries(config):
            hits = [
                (name, module)
                for name, module in candidates
                if any(match_list_entry(v, entry) for v in self.name_variants(name))
            ]
            for name, module in hits:
                if isinstance(module, AdapterLayer):
                    raise ValueError(f"{name} is both a target module and in modules_to_save")
                if isinstance(module, CONTAINER_TYPES):  # PEFT's TypeError and its wording, then ours
                    raise TypeError(
                        f"modules_to_save cannot be applied to modules of type {type(module)}: {name!r} is a "
                        "container without a forward of its own; name the modules inside it instead"
                    )
            if not hits and entry not in optional:
                raise ValueError(
                    f"modules_to_save entry {entry!r} names no module of {type(self.model).__name__}; "
                    f"closest names: {closest_names(entry, names)}"
                )
            found.extend(hits)
        return found

    def _wrap_modules_to_save(self, adapter_name: str, config: TargetingConfig) -> None:
        """Adds a trainable copy for ``adapter_name`` to each ``modules_to_save`` module; the copy of an adapter
        that is not active stays frozen and unused (the module keeps what it ran before)."""
        for name, module in self._modules_to_save_targets(config):
            if isinstance(module, ModulesToSaveWrapper):
                wrapper = module
                wrapper.update(adapter_name)
            elif self.model.get_submodule(name) is module:  # not already wrapped via another entry
                wrapper = ModulesToSaveWrapper(module, adapter_name)
                self.model.set_submodule(name, wrapper)
            else:
                continue
            if adapter_name not in self._active:
                wrapper.modules_to_save[adapter_name].requires_grad_(False)
                if wrapper.active_adapter == adapter_name:
                    wrapper.active_adapter = None

    @torch.no_grad()
    def adapter_parameter_count(self, adapter_name: str) -> int:
        return sum(
            p.numel() for _, layer in self.adapter_layers() for p in layer.adapter_parameters(adapter_name)
        )
