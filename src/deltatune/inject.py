"""Finding target modules, wrapping them in adapter layers, trainability and unwrapping.

Matching follows PEFT: ``exclude_modules`` first; modules named by ``modules_to_save`` are never
targets; a string ``target_modules`` is a regex full match, a list matches a name exactly or as a
``.name`` suffix, ``"all-linear"`` takes every Linear except the output head. Every name is also tried
in its transformers 4.x spelling (see :mod:`deltatune.names`).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig, TaskType
from .layers import AdapterLayer, ModulesToSaveWrapper
from .names import NameAliases
from .registry import method_for_config

logger = logging.getLogger(__name__)

__all__ = ["AdapterModel", "closest_names", "match_list_entry"]

ALL_LINEAR = "all-linear"


def match_list_entry(name: str, entry: str) -> bool:
    """PEFT list semantics: exact name or ``.entry`` suffix."""
    return name == entry or name.endswith("." + entry)


def closest_names(wanted: str, names: list[str], n: int = 5) -> list[str]:
    """Module names (full or last component) closest to ``wanted``, for error messages."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names if name})
    pool = leaves + [name for name in names if name]
    return list(dict.fromkeys(difflib.get_close_matches(wanted, pool, n=n, cutoff=0.4)))


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    for pattern in patterns:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


class AdapterModel(nn.Module):
    """The tuner: holds the user's model (changed in place) and the adapter configs.

    Its ``model`` attribute is the user's model, so state-dict keys of a :class:`~deltatune.PeftModel`
    start with ``base_model.model.`` exactly as in PEFT.

    Args:
        model: The model to adapt.
        config: Config of the first adapter.
        adapter_name: Name of the first adapter.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str = adapter_name
        self.aliases = NameAliases(model)
        self._legacy_hits: list[tuple[str, str]] = []
        #: adapter name → {target entry written in a legacy spelling: modern entry}
        self.renamed_targets: dict[str, dict[str, str]] = {}
        self.inject_adapter(adapter_name, config)
        self._mark_trainable()

    # ---- plumbing ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

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
            if isinstance(module, AdapterLayer | ModulesToSaveWrapper):
                skip.append(name)
        return out

    def name_variants(self, name: str) -> list[str]:
        """``name`` and, where it differs, its transformers 4.x spelling."""
        legacy = self.aliases.legacy(name)
        return [name] if legacy == name else [name, legacy]

    # ---- matching ---------------------------------------------------------------------------
    def _modules_to_save(self, config: AdapterConfig) -> list[str]:
        entries = list(config.modules_to_save or [])
        if config.task_type == TaskType.SEQ_CLS:
            entries += [e for e in ("classifier", "score") if e not in entries]
        return entries

    def _is_target(self, config: AdapterConfig, name: str, module: nn.Module) -> tuple[bool, str | None]:
        """Whether ``name`` is a target; also returns the spelling that matched (for logging)."""
        variants = self.name_variants(name)
        exclude = config.exclude_modules
        if exclude:
            if isinstance(exclude, str):
                if any(re.fullmatch(exclude, v) for v in variants):
                    return False, None
            elif any(match_list_entry(v, e) for v in variants for e in exclude):
                return False, None
        for entry in self._modules_to_save(config):
            if any(re.match(rf"(^|.*\.){re.escape(entry)}($|\..*)", v) for v in variants):
                return False, None
        targets = config.target_modules
        hit: str | None = None
        if targets == ALL_LINEAR:
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            if isinstance(base, nn.Linear) and not self._is_output_head(name, config):
                hit = name
        elif isinstance(targets, str):
            return (hit := next((v for v in variants if re.fullmatch(targets, v)), None)) is not None, hit
        elif targets:
            hit = next((v for v in variants for e in targets if match_list_entry(v, e)), None)
            if hit is not None and hit != name:
                self._legacy_hits.append((next(e for e in targets if match_list_entry(hit, e)), name))
        if hit is not None and config.layers_to_transform is not None:
            layers = config.layers_to_transform
            wanted = [layers] if isinstance(layers, int) else list(layers)
            index = _layer_index(hit, config.layers_pattern)
            if index is None:
                index = next(
                    (i for v in variants if (i := _layer_index(v, config.layers_pattern)) is not None),
                    None,
                )
            if index is None or index not in wanted:
                return False, None
        return hit is not None, hit

    def _is_output_head(self, name: str, config: AdapterConfig) -> bool:
        get_out = getattr(self.model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        if head is not None and self.model.get_submodule(name) is head:
            return True
        return config.task_type == TaskType.SEQ_CLS and name.rsplit(".", 1)[-1] in ("classifier", "score")

    # ---- injection --------------------------------------------------------------------------
    def inject_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Wraps every target of ``config`` (and its ``modules_to_save``) for ``adapter_name``.

        Raises:
            ValueError: if the name is taken, the method differs from the model's, nothing matches, a
                match cannot be adapted, or a ``modules_to_save`` entry names nothing.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; choose another name")
        spec = method_for_config(config)
        existing = {str(c.peft_type) for c in self.peft_config.values()}
        if existing and config.peft_type not in existing:
            raise ValueError(
                f"this model holds {', '.join(sorted(existing))} adapters; adding a {config.peft_type} adapter "
                "is not supported (merge_and_unload() first, then wrap the merged model)"
            )
        if config.target_modules is None:
            raise ValueError(
                "target_modules is required (no default is known for this model); e.g. "
                "target_modules=['query', 'value'] or 'all-linear'"
            )
        candidates = self._candidate_modules()
        names = [n for n, _ in candidates]
        plan: list[tuple[str, nn.Module]] = []
        via_legacy: list[tuple[str, str]] = []
        wrong_type: list[str] = []
        self._legacy_hits = []
        for name, module in candidates:
            is_target, hit = self._is_target(config, name, module)
            if not is_target:
                continue
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            if not isinstance(base, spec.layer_cls.supported_layers):
                if config.target_modules != ALL_LINEAR:
                    wrong_type.append(f"{name} ({type(base).__name__})")
                continue
            if isinstance(module, AdapterLayer) and not isinstance(module, spec.layer_cls):
                raise ValueError(f"{name} already holds a {type(module).__name__}; cannot add {spec.name}")
            plan.append((name, module))
            if hit is not None and hit != name:
                via_legacy.append((hit, name))
        if wrong_type:
            supported = ", ".join(t.__name__ for t in spec.layer_cls.supported_layers)
            raise ValueError(
                f"{spec.name} cannot adapt {', '.join(wrong_type[:5])}{' …' if len(wrong_type) > 5 else ''}; "
                f"supported layer types: {supported}. Narrow target_modules to layers of those types."
            )
        if not plan:
            raise ValueError(self._no_match_message(config, names))
        self._modules_to_save_targets(config)  # raises before anything is changed
        matched = self._build_layers(plan, adapter_name, config)
        if via_legacy:
            logger.info(
                "target_modules matched %d modules through their transformers 4.x names, e.g. %s -> %s",
                len(via_legacy),
                via_legacy[0][0],
                via_legacy[0][1],
            )
        self._wrap_modules_to_save(adapter_name, config)
        self.renamed_targets[adapter_name] = self._modern_entries(self._legacy_hits, matched)
        self._legacy_hits = []
        self.peft_config[adapter_name] = config
        # A new adapter stays inactive (PEFT semantics) unless it is the first one.
        if adapter_name != self.active_adapter:
            for _, layer in self.adapter_layers():
                if adapter_name in layer.active_adapters:
                    layer.active_adapters.remove(adapter_name)
                for p in layer.adapter_parameters(adapter_name):
                    p.requires_grad_(False)

    def _build_layers(
        self, plan: list[tuple[str, nn.Module]], adapter_name: str, config: AdapterConfig
    ) -> list[str]:
        """Creates ``adapter_name`` in every planned module, then swaps the new layers in. If any layer
        refuses (e.g. a grouped conv for LoRA), the model is left exactly as it was."""
        spec = method_for_config(config)
        created: list[tuple[str, AdapterLayer]] = []
        updated: list[AdapterLayer] = []
        try:
            for name, module in plan:
                r, alpha = config.rank_and_alpha(self.name_variants(name))
                if isinstance(module, AdapterLayer):
                    updated.append(module)
                    module.update_layer(adapter_name, config, r, alpha)
                else:
                    layer = spec.layer_cls(module)
                    layer.update_layer(adapter_name, config, r, alpha)
                    created.append((name, layer))
        except Exception:
            for layer in updated:
                layer.delete_adapter(adapter_name)
            self._legacy_hits = []
            raise
        for name, layer in created:
            self.model.set_submodule(name, layer)
        return [name for name, _ in plan]

    def _modern_entries(self, hits: list[tuple[str, str]], matched: list[str]) -> dict[str, str]:
        """For list entries that matched through legacy names, the modern entry matching the same modules
        (the last as many name components as the entry has), so saved configs load in PEFT on this
        transformers version."""
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

    def _no_match_message(self, config: AdapterConfig, names: list[str]) -> str:
        targets = config.target_modules
        entries = [targets] if isinstance(targets, str) else sorted(targets or [])
        hints = {e: closest_names(e, names) for e in entries}
        hint_text = "; ".join(
            f"{e!r}: closest {h}" if h else f"{e!r}: no similar name" for e, h in hints.items()
        )
        leaves = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in self.model.named_modules()
                if isinstance(m, nn.Linear | nn.Conv2d)
            }
        )
        return (
            f"target_modules={entries} matched no module of {type(self.model).__name__} ({hint_text}). "
            f"Linear/Conv2d module names in this model: {leaves[:20]}"
        )

    def _modules_to_save_targets(self, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
        """The modules that ``modules_to_save`` names (checked, nothing changed).

        Raises:
            ValueError: if an entry names no module (``classifier``/``score`` added for SEQ_CLS may be
                absent), or names a module that is an adapter target.
        """
        candidates = self._candidate_modules()
        names = [n for n, _ in candidates]
        found: list[tuple[str, nn.Module]] = []
        for entry in self._modules_to_save(config):
            hits = [
                (name, module)
                for name, module in candidates
                if any(match_list_entry(v, entry) for v in self.name_variants(name))
            ]
            for name, module in hits:
                if isinstance(module, AdapterLayer):
                    raise ValueError(f"{name} is both a target module and in modules_to_save")
            if not hits and not (config.task_type == TaskType.SEQ_CLS and entry in ("classifier", "score")):
                raise ValueError(
                    f"modules_to_save entry {entry!r} names no module of {type(self.model).__name__}; "
                    f"closest names: {closest_names(entry, names)}"
                )
            found.extend(hits)
        return found

    def _wrap_modules_to_save(self, adapter_name: str, config: AdapterConfig) -> None:
        for name, module in self._modules_to_save_targets(config):
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
                if adapter_name != self.active_adapter:
                    module.set_adapter(module.active_adapter)
            elif self.model.get_submodule(name) is module:  # not already wrapped via another entry
                self.model.set_submodule(name, ModulesToSaveWrapper(module, adapter_name))

    # ---- trainability -----------------------------------------------------------------------
    def _mark_trainable(self) -> None:
        """Freezes everything except the active adapter, its modules_to_save copies and its biases."""
        config = self.peft_config[self.active_adapter]
        self.model.requires_grad_(False)
        inference = bool(config.inference_mode)
        for _, layer in self.adapter_layers():
            layer.set_adapter(self.active_adapter)
            if inference:
                for p in layer.adapter_parameters(self.active_adapter):
                    p.requires_grad_(False)
        for _, wrapper in self.saved_module_wrappers():
            wrapper.set_adapter(self.active_adapter)
            if inference:
                wrapper.requires_grad_(False)
        if inference:
            return
        bias = getattr(config, "bias", "none")
        if bias == "all":
            for name, p in self.model.named_parameters():
                if (
                    name.endswith(".bias")
                    and ".original_module." not in name
                    and ".modules_to_save." not in name
                ):
                    p.requires_grad_(True)
        elif bias == "lora_only":
            for _, layer in self.adapter_layers():
                layer_bias = layer.base_bias
                if self.active_adapter in layer.r and layer_bias is not None:
                    layer_bias.requires_grad_(True)

    def set_adapter(self, adapter_name: str) -> None:
        """Makes ``adapter_name`` the active (and only trainable) adapter."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes ``adapter_name`` from every layer and wrapper."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        del self.peft_config[adapter_name]
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self.saved_module_wrappers():
            wrapper.delete_adapter(adapter_name)
        if self.active_adapter == adapter_name:
            remaining = list(self.peft_config)
            if remaining:
                self.set_adapter(remaining[-1])

    # ---- enable / disable / merge -----------------------------------------------------------
    def enable_adapter_layers(self, enabled: bool = True) -> None:
        for _, layer in self.adapter_layers():
            layer.disable_adapters = not enabled
        for _, wrapper in self.saved_module_wrappers():
            wrapper.disable_adapters = not enabled

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_names or [self.active_adapter]
        for _, layer in self.adapter_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def unload_and_optionally_merge(
        self,
        merge: bool,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        progressbar: bool = False,
    ) -> nn.Module:
        """Puts the base modules back (after merging when ``merge``) and returns the user's model."""
        layers = list(self.adapter_layers())
        iterator: Any = layers
        if progressbar:
            from tqdm.auto import tqdm

            iterator = tqdm(layers, desc="Unloading" + (" and merging" if merge else ""))
        for name, layer in iterator:
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names or [self.active_adapter])
                layer.merged_adapters.clear()
            else:
                layer.unmerge()
            self.model.set_submodule(name, layer.base_layer)
        for name, wrapper in list(self.saved_module_wrappers()):
            self.model.set_submodule(name, wrapper.active_module)
        return self.model

    @torch.no_grad()
    def adapter_parameter_count(self, adapter_name: str) -> int:
        return sum(
            p.numel() for _, layer in self.adapter_layers() for p in layer.adapter_parameters(adapter_name)
        )
