"""LoRA's further targets, as PEFT places them after the adapter layers: ``trainable_token_indices`` (a few
embedding rows train, :mod:`._token_rows`) and ``ensure_weight_tying`` (what an adapter does to a tied input
embedding, the tied output layer follows)."""

from __future__ import annotations

import re
import warnings
from typing import Any

from torch import nn

from ..layers import AdapterLayer
from ..modules_to_save import ModulesToSaveWrapper
from ..registry import spec_for
from ..tuner import AdapterModel
from ._token_rows import TrainableTokensLayer, TrainableTokensWrapper, input_embedding, tied_embedding_names

__all__ = ["check_tied_modules", "inject_trainable_tokens", "tie_adapters", "token_targets"]


def _ties_embeddings(model: nn.Module) -> bool:
    """The model config's ``tie_word_embeddings`` (False without a config)."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    data = to_dict() if callable(to_dict) else {}
    return bool(data.get("tie_word_embeddings", False)) if isinstance(data, dict) else False


def token_targets(model: nn.Module, indices: Any) -> dict[str, list[int]]:
    """``trainable_token_indices`` as {module name entry: indices}: a list means the input embedding
    (``embed_tokens`` when the model cannot say which it is)."""
    if isinstance(indices, dict):
        return {str(k): list(v) for k, v in indices.items()}
    found = input_embedding(model)
    return {found[0] if found else "embed_tokens": list(indices)}


def _tied_entries(model: nn.Module, targets: dict[str, list[int]], ensure: bool) -> tuple[set[str], bool]:
    """PEFT's handling of several targets that are tied to each other: (the entries left to the tying, whether
    their indices differ).

    Raises:
        ValueError: with ``ensure_weight_tying`` when tied entries list different indices.
    """
    if len(targets) < 2 or not _ties_embeddings(model):
        return set(), False
    tied = set(tied_embedding_names(model))
    found = input_embedding(model)
    embed_name = found[0] if found else ""
    keys = [
        entry
        for entry in targets
        if embed_name.endswith(entry) or any(t.endswith(entry) or entry in t.split(".") for t in tied)
    ]
    if len(keys) < 2:
        return set(), False
    mismatch = any(targets[k] != targets[keys[0]] for k in keys[1:])
    if mismatch and ensure:
        info = ", ".join(f"{k}: {targets[k]}" for k in keys)
        raise ValueError(
            "Cannot ensure weight tying when different token indices are specified for tied layers. "
            f"Conflicting layers: {info}. Please use the same indices for all tied layers or set "
            "ensure_weight_tying=False."
        )
    return (set(), True) if mismatch else (set(keys) & tied, False)


def _wrap(
    tuner: AdapterModel,
    adapter_name: str,
    entry: str,
    indices: list[int],
    tied_to: TrainableTokensLayer | None = None,
) -> list[TrainableTokensLayer]:
    """Adds ``adapter_name``'s trainable rows to every module whose name ends with ``entry``.

    Raises:
        ValueError: when no module matches, or a match is neither an embedding nor a linear head.
    """
    model = tuner.model
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n.endswith(entry)]
    layers: list[TrainableTokensLayer] = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokensWrapper):  # another adapter's rows are there already
            layer = module.token_adapter
        elif isinstance(module, nn.Embedding | nn.Linear) and not _inside_wrapper(model, name):
            layer = TrainableTokensLayer(module, tied_to)
            model.set_submodule(name, TrainableTokensWrapper(layer))
        else:
            if _inside_wrapper(model, name):
                continue
            raise ValueError(
                f"trainable_token_indices: {name} is a {type(module).__name__}; only nn.Embedding layers (and "
                "an output layer tied to the input embedding) can train single tokens"
            )
        if not layer.holds(adapter_name):
            layer.update_layer(adapter_name, indices)
            layers.append(layer)
    if not layers and not names:
        raise ValueError(
            f"trainable_token_indices names {entry!r}, which matches no module of {type(model).__name__}"
        )
    return layers


def _inside_wrapper(model: nn.Module, name: str) -> bool:
    """Whether ``name`` lies inside a trainable-tokens wrapper (its held layer or base module)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), TrainableTokensWrapper):
            return True
    return False


def inject_trainable_tokens(tuner: AdapterModel, adapter_name: str, config: Any) -> None:
    """``trainable_token_indices``: wraps the named embeddings (and, with tied embeddings, the tied output
    layer, following the input embedding's rows) as PEFT's ``set_additional_trainable_modules`` does.

    Raises:
        ValueError: when an entry is also in ``modules_to_save``, names no module, or (with
            ``ensure_weight_tying``) tied entries list different indices.
    """
    indices = getattr(config, "trainable_token_indices", None)
    if indices is None:
        return
    model = tuner.model
    targets = token_targets(model, indices)
    for entry in targets:
        if entry in (config.modules_to_save or []):
            raise ValueError(
                "The embedding layer is already marked to be trained fully, either specify "
                f"`modules_to_save=[..., \"{entry}\", ...]` or `trainable_tokens={{'{entry}': x}}` but not both."
            )
    ensure = bool(getattr(config, "ensure_weight_tying", False))
    tied_now = _ties_embeddings(model)
    skip, mismatch = _tied_entries(model, targets, ensure)
    tied_names = tied_embedding_names(model) if tied_now else []  # before the embedding is wrapped
    new: list[TrainableTokensLayer] = []
    for entry, rows in targets.items():
        if entry not in skip:
            new += _wrap(tuner, adapter_name, entry, rows)
    if not tied_now and ensure:
        warnings.warn(
            "ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
            "Weight tying will not be applied for trainable_token_indices.",
            stacklevel=5,
        )
    found = input_embedding(model)
    embedding = found[1] if found else None
    if tied_now and isinstance(embedding, TrainableTokensWrapper) and (ensure or not mismatch):
        source = embedding.token_adapter
        for name in tied_names:
            new += _wrap(tuner, adapter_name, name, source.token_indices[adapter_name], tied_to=source)
    if adapter_name not in tuner.active_adapters:  # a later adapter stays inactive and frozen (PEFT)
        for layer in new:
            layer.active_adapters = list(tuner.active_adapters)
            for p in layer.adapter_parameters(adapter_name):
                p.requires_grad_(False)


# ---- ensure_weight_tying ---------------------------------------------------------------------------
#: The module names PEFT treats as (possibly tied) embeddings.
EMBEDDING_NAMES = ("embed_tokens", "lm_head")
_NOT_TIED_WARNING = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` is "
    "not set to True. This can lead to complications, for example when merging the adapter or converting your "
    "model to formats other than safetensors. Check the discussion here: "
    "https://github.com/huggingface/peft/issues/2777"
)


def _embedding_in(entries: Any) -> bool:
    """Whether ``target_modules``/``modules_to_save`` names an embedding (PEFT's test: by the last name)."""
    if isinstance(entries, str):
        return any(re.fullmatch(entries, name) for name in EMBEDDING_NAMES)
    return any(str(m).split(".")[-1] in EMBEDDING_NAMES for m in entries or ())


def _without_tied(entries: list[str], tied: list[str]) -> list[str]:
    """``entries`` less, for each tied module, the first entry that matches it (PEFT's rule)."""
    out = list(entries)
    for key in tied:
        for entry in out:
            if re.match(rf"(^|.*\.){entry}($|\..*)", key):
                out.remove(entry)
                break
    return out


def check_tied_modules(tuner: AdapterModel, config: Any) -> None:
    """PEFT's ``_check_tied_modules`` before injection: with ``ensure_weight_tying`` and tied embeddings, the
    embedding takes the adapter or the trainable copy (added to ``target_modules``/``modules_to_save`` by its
    full name, the tied modules removed from them and recorded as ``target_modules_to_tie`` /
    ``modules_to_tie``); PEFT's warnings when the flag has nothing to do, or is missing where it would."""
    if not hasattr(config, "ensure_weight_tying"):
        return
    model = tuner.model
    to_save = list(config.modules_to_save or [])
    in_save, in_target = _embedding_in(to_save), _embedding_in(config.target_modules)
    tied = sorted(tied_embedding_names(model)) if _ties_embeddings(model) else []
    found = input_embedding(model)
    if not config.ensure_weight_tying:
        if (in_save or in_target) and tied:
            warnings.warn(_NOT_TIED_WARNING, stacklevel=5)
        return
    if not tied or found is None:
        warnings.warn(
            "You have requested `ensure_weight_tying`, but no tied modules were found in the model",
            stacklevel=5,
        )
        return
    embed_name = found[0]
    if in_save:
        config.modules_to_tie = set(tied)
        config.modules_to_save = _without_tied(
            [*to_save, *([embed_name] if embed_name not in to_save else [])], tied
        )
    elif in_target:
        config.target_modules_to_tie = set(tied)
        targets = config.target_modules
        if isinstance(targets, str):
            config.target_modules = rf"(?:{targets}|^{re.escape(embed_name)}$)"
        else:
            config.target_modules = set(_without_tied([*sorted(targets or ()), embed_name], tied))
    else:
        warnings.warn(
            "You have requested `ensure_weight_tying`, but no tied modules are added in either `modules_to_save` "
            "or `target_modules`",
            stacklevel=5,
        )


def tie_adapters(tuner: AdapterModel, adapter_name: str, config: Any) -> None:
    """After injection, ties the output layer to what the adapter put on the input embedding: its
    ``modules_to_save`` copy becomes a linear layer sharing the embedding copy's weight, or its LoRA factors
    become the embedding's, transposed (A = embedding B^T, B = embedding A^T, the same storage), as PEFT does."""
    model = tuner.model
    found = input_embedding(model)
    if found is None:
        return
    embedding = found[1]
    for name in sorted(getattr(config, "modules_to_tie", None) or ()):
        copies = getattr(embedding, "modules_to_save", None)
        if copies is None or adapter_name not in copies:
            continue
        shared = copies[adapter_name].weight
        head = nn.Linear(shared.shape[1], shared.shape[0], bias=False, device="meta")
        head.weight = shared
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module, adapter_name)
            model.set_submodule(name, module)
        module.modules_to_save[adapter_name] = head
        if adapter_name not in tuner.active_adapters and module.active_adapter == adapter_name:
            module.active_adapter = None
    for name in sorted(getattr(config, "target_modules_to_tie", None) or ()):
        _tie_lora_head(tuner, adapter_name, config, name, embedding)


def _tie_lora_head(
    tuner: AdapterModel, adapter_name: str, config: Any, name: str, embedding: nn.Module
) -> None:
    """The LoRA layer of the tied head ``name``, its factors views of the embedding's (PEFT's tied adapter)."""
    emb_a = getattr(embedding, "lora_embedding_A", None)
    emb_b = getattr(embedding, "lora_embedding_B", None)
    if emb_a is None or emb_b is None or adapter_name not in emb_a:
        return
    model = tuner.model
    module = model.get_submodule(name)
    if not isinstance(module, AdapterLayer):
        layer = spec_for(config).layer_class_for(module)(module)
        layer.add_adapter(adapter_name, config.target_spec(name, tuner.name_variants(name)))
        model.set_submodule(name, layer)
        tuner.targeted_module_names.append(name)
        module = layer
    elif not module.holds(adapter_name):
        module.add_adapter(adapter_name, config.target_spec(name, tuner.name_variants(name)))
    layer_any: Any = module
    layer_any.lora_A[adapter_name].weight = nn.Parameter(emb_b[adapter_name].t())
    layer_any.lora_B[adapter_name].weight = nn.Parameter(emb_a[adapter_name].t())
    init = config.init_lora_weights
    if init is True or init == "gaussian":  # PEFT initialises the tied factors again, through the views
        layer_any.reset_parameters(adapter_name, init)
    if adapter_name not in tuner.active_adapters:
        module.active_adapters = list(tuner.active_adapters)
        for p in module.adapter_parameters(adapter_name):
            p.requires_grad_(False)


def warn_tied_merge(tuner: AdapterModel) -> None:
    """PEFT's warning before merging adapters on modules named like tied embeddings."""
    if not _ties_embeddings(tuner.model):
        return
    tied = [n for n in tuner.targeted_module_names if n.split(".")[-1] in EMBEDDING_NAMES]
    if tied:
        warnings.warn(
            f"Model with `tie_word_embeddings=True` and the tied_target_modules={tied!r} are part of the adapter. "
            "This can lead to complications. You can opt to merge the adapter after cloning the weights (to untie "
            "the embeddings). You can untie the embeddings by loading the model with `tie_word_embeddings=False`.",
            stacklevel=4,
        )


def untie_after_merge(model: nn.Module) -> None:
    """After merging and unloading: when the input and output embeddings no longer share their weight, the
    model's config says so (``tie_word_embeddings=False``), with PEFT's warning."""
    if not _ties_embeddings(model):
        return
    try:
        out_w = getattr(model.get_output_embeddings(), "weight", None)  # type: ignore[operator]
        in_w = getattr(model.get_input_embeddings(), "weight", None)  # type: ignore[operator]
    except (NotImplementedError, AttributeError, TypeError):
        return
    if out_w is not None and in_w is not None and out_w.data_ptr() != in_w.data_ptr():
        model.config.tie_word_embeddings = False  # type: ignore[union-attr]
        warnings.warn(
            "Input and output embeddings are no longer tied after merging. Setting `tie_word_embeddings=False` in "
            "the model config.",
            stacklevel=4,
        )
