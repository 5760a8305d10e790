"""CorDA (Yang et al., 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models"):
``init_lora_weights="corda"`` with :func:`preprocess_corda`, PEFT's API and numbers.

For each targeted Linear or transformers ``Conv1D`` with weight W (out, in):

1. C = the mean over the calls of ``run_model`` of x̂ᵀ x̂, x̂ the layer's input rows divided by their largest value
   (float32 unless ``use_float16_for_covariance``);
2. C' = C + d·mean(diag C)·I, with d = 0.01 doubled until ‖C' C'⁻¹ − I‖ < 0.05;
3. W C' = U S Vhᵀ; V = (Vh C'⁻¹)ᵀ, so that W = U S Vᵀ;
4. keep r components: the r largest (``ipm``, instruction-previewed) or the r smallest (``kpm``,
   knowledge-preserved);
5. at ``get_peft_model``: A = √(S/s) Vᵀ, B = U √(S/s), and the base weight becomes W − s·B A.

Steps 1-4 run in :func:`preprocess_corda`, which leaves the kept (S, U, V) on each layer as ``eigens`` (PEFT's
attribute and field names, so either library's preprocessing feeds either library's ``get_peft_model``); step 5
in :func:`corda_init`. Files are read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy
import logging
import operator
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ..layer_types import Conv1D, to_out_in
from ..layers import module_weight
from ..matching import match_target
from ..names import NameAliases
from .lora import LoraConfig

__all__ = ["CordaEigens", "corda_init", "data_init_targets", "preprocess_corda"]

logger = logging.getLogger(__name__)
_TEMPORARY = ("sample_count", "covariance_matrix", "corda_method", "rank")


@dataclass
class CordaEigens:
    """The kept components of one layer: singular values (r,), U (out, r) and V (in, r)."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def data_init_targets(model: nn.Module, config: Any) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every Linear or ``Conv1D`` of a plain model that ``config`` targets (PEFT's matching;
    ``"all-linear"`` leaves out the output embedding; no ``target_modules``: the defaults for the model's type,
    as ``get_peft_model`` takes them, else every such layer)."""
    if config.target_modules is None:
        filled = copy.copy(config)
        if filled.fill_model_defaults(getattr(getattr(model, "config", None), "model_type", None)):
            config = filled
    aliases = NameAliases(model)
    get_head = getattr(model, "get_output_embeddings", None)
    try:
        head = get_head() if callable(get_head) else None
    except (NotImplementedError, AttributeError):
        head = None
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.Linear | Conv1D):
            continue
        if config.target_modules is None:
            yield name, module
            continue
        legacy = aliases.legacy(name)
        variants = [name] if legacy == name else [name, legacy]
        if match_target(config, variants, True, partial(operator.is_, module, head)) is not None:
            yield name, module


def _device(model: nn.Module) -> torch.device:
    inner = getattr(model, "module", model)  # DataParallel / DeepSpeed
    return next(iter(inner.parameters())).device


def _load(path: str | os.PathLike[str], model: nn.Module) -> dict[str, torch.Tensor]:
    data = torch.load(path, map_location=_device(model), weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)} holds no CorDA tensors (a dict of tensors was expected)")
    return data


def _save(data: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    torch.save(data, path)


def _cached(data: dict[str, torch.Tensor], key: str, path: Any) -> torch.Tensor:
    if key not in data:
        raise ValueError(
            f"{os.fspath(path)} has no tensor {key!r}: it was built for another model or target_modules; "
            "delete it or point the config to another file"
        )
    return data[key]


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Callable[[], Any] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Computes CorDA's decomposition of every targeted layer and leaves it on the layer as ``eigens``, for
    ``get_peft_model(model, lora_config)`` to initialise from (PEFT's function).

    Args:
        model: The plain model that ``get_peft_model`` will wrap.
        lora_config: Its config; ``corda_config`` gives the method, the files and the options.
        run_model: Runs the model on the calibration data (its inputs' covariance is collected by forward hooks);
            may be None when ``cache_file`` or ``covariance_file`` exists.
        hooked_model: The model to hook instead of ``model`` (its targets' covariances are used for ``model``'s
            layers of the same name).

    Raises:
        ValueError: without ``corda_config``, without ``run_model`` when no file exists, without
            ``corda_method`` when no cache exists, or for invalid inputs or files.
    """
    options = lora_config.corda_config
    if options is None:
        raise ValueError("preprocess_corda needs lora_config.corda_config (a CordaConfig); set it")
    targets: list[tuple[str, Any]] = list(data_init_targets(model, lora_config))
    cache_file = options.cache_file
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = _load(cache_file, model)
        for name, module in targets:
            parts = (_cached(cache, f"{name}.eigens.{f}", cache_file) for f in ("S_WC", "U_WC", "V_WC"))
            module.eigens = CordaEigens(*parts)
        return
    method = options.corda_method
    if method is None:
        raise ValueError("corda_method is required when cache_file is not provided.")
    covariance, counts = _covariances(model, lora_config, targets, run_model, hooked_model)
    device = _device(model)
    for index, (name, module) in enumerate(targets):
        rank = int(lora_config.module_options([name])["r"])
        if options.verbose:
            logger.warning("CorDA: decomposing %s (%d of %d)", name, index + 1, len(targets))
        eigens = corda_eigens(to_out_in(module, module_weight(module)), covariance[name])
        module.eigens = crop_eigens(eigens, rank, method, device)
        if not options.prune_temporary_fields:
            values = (counts.get(name, 0), covariance[name], method, rank)
            for field, value in zip(_TEMPORARY, values, strict=True):
                setattr(module, field, value)
    if cache_file is not None:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in targets:
            for field in ("S_WC", "U_WC", "V_WC"):
                tensors[f"{name}.eigens.{field}"] = getattr(module.eigens, field)
        _save(tensors, cache_file)


def _covariances(
    model: nn.Module,
    config: LoraConfig,
    targets: list[tuple[str, nn.Module]],
    run_model: Callable[[], Any] | None,
    hooked_model: nn.Module | None,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """name → the mean of x̂ᵀ x̂ over the forward calls, and name → the number of calls (empty when the
    covariances come from ``covariance_file``, which is written when given and absent)."""
    assert config.corda_config is not None
    options = config.corda_config
    path = options.covariance_file
    if path is not None and os.path.exists(path) and os.path.getsize(path) > 0:
        data = _load(path, model)
        return {name: _cached(data, name, path) for name, _ in targets}, {}
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if not options.use_float16_for_covariance:
            x = x.float()
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ValueError(f"Invalid value found in input of {name}, please check your input data.")
        product = x.t() @ x
        if not torch.isfinite(product).all():
            raise ValueError(f"CorDA: the covariance of {name}'s input is not finite (overflow)")
        sums[name] = sums[name] + product if name in sums else product
        counts[name] = counts.get(name, 0) + 1

    handles = [
        module.register_forward_hook(lambda m, a, o, n=name: hook(n, m, a, o))
        for name, module in (targets if hooked is model else data_init_targets(hooked, config))
    ]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name, _ in targets if name not in counts]
    if unseen:
        raise ValueError(
            f"CorDA: run_model never ran the targeted layers {unseen[:5]}; run the model on data that reaches "
            "them, or leave them out of target_modules"
        )
    covariance = {name: sums[name] / counts[name] for name, _ in targets}
    if path is not None:
        _save(covariance, path)
    return covariance, counts


def corda_eigens(weight: torch.Tensor, covariance: torch.Tensor) -> CordaEigens:
    """The full decomposition W = U S Vᵀ (all min(out, in) components; U and V on the CPU) of W (out, in)
    with the damped input covariance C' (see the module's docstring).

    Raises:
        ValueError: when no damping makes C' invertible.
    """
    w = weight.float()
    cov = covariance.float()
    size = cov.shape[0]
    eye = torch.eye(size, device=cov.device)
    mean_diag = torch.mean(torch.diag(cov))
    damp = 0.01
    while True:
        fixed = cov + torch.diag(torch.ones(size, device=cov.device) * mean_diag * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
        if damp > 1e6:
            raise ValueError(
                "CorDA: the input covariance cannot be inverted; give run_model more varied data"
            )
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return CordaEigens(S_WC=s, U_WC=u.cpu(), V_WC=(vh @ inverse).t().cpu())


def crop_eigens(eigens: CordaEigens, rank: int, method: str, device: torch.device) -> CordaEigens:
    """The r largest (``"ipm"``) or r smallest (``"kpm"``) components, copied (so a saved cache holds no more).

    Raises:
        ValueError: for another method, or a rank above the layer's.
    """
    if method not in ("ipm", "kpm"):
        raise ValueError(f"Invalid corda_method found: {method}, it should be 'ipm' or 'kpm'.")
    if rank > eigens.S_WC.shape[0]:
        raise ValueError(
            f"CorDA needs r <= min(out, in) = {eigens.S_WC.shape[0]}, got r={rank}; lower r or rank_pattern"
        )
    keep = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return CordaEigens(
        S_WC=eigens.S_WC[keep].clone(),
        U_WC=eigens.U_WC[:, keep].clone().to(device),
        V_WC=eigens.V_WC[:, keep].clone().to(device),
    )


def corda_init(base: nn.Module, lora_a: nn.Module, lora_b: nn.Module, r: int, scaling: float) -> None:
    """Initialises A and B from the ``eigens`` that :func:`preprocess_corda` left on ``base`` and writes the
    residual W − s·B A into the base weight; the ``eigens`` are then removed.

    Raises:
        TypeError: when the base weight is not float32, float16 or bfloat16.
        ValueError: when ``base`` is no Linear/``Conv1D``, has no ``eigens``, or they do not fit (another rank
            or model).
    """
    if not isinstance(base, nn.Linear | Conv1D):
        raise ValueError(
            f"init_lora_weights='corda' supports Linear and Conv1D layers, not {type(base).__name__}; leave "
            "this layer out of target_modules or use another initialisation"
        )
    weight = module_weight(base)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            "Please initialize CorDA under float32, float16, or bfloat16. Subsequently, re-quantize the residual "
            "model to help minimize quantization errors."
        )
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise ValueError(
            "`eigens` attribute not found for layer, please run `preprocess_corda` first (a saved CorDA adapter "
            "loads on a model preprocessed with the same data or cache_file, or save it converted to plain LoRA "
            "with path_initial_model_for_weight_conversion)."
        )
    w = to_out_in(base, weight)
    s, u, v = eigens.S_WC, eigens.U_WC, eigens.V_WC
    for label, tensor in (("S", s), ("U", u), ("V", v)):
        if not torch.isfinite(tensor).all():
            raise ValueError(
                f"Invalid value found in matrix {label} of the CorDA decomposition (NaN or inf)."
            )
    expected = {"U": (w.shape[0], r), "S": (r,), "V": (w.shape[1], r)}
    for label, tensor in (("U", u), ("S", s), ("V", v)):
        if tuple(tensor.shape) != expected[label]:
            raise ValueError(
                f"Matrix {label} size mismatch: {tuple(tensor.shape)} vs. {expected[label]}. Please make sure the "
                "`lora_config` and `model` argument of `preprocess_corda` is consistent with `get_peft_model` "
                "(and that a cache_file was built with the same model and LoRA rank)."
            )
    root = torch.sqrt(s / scaling)
    a = (v.t() * root.view(-1, 1)).contiguous()
    b = (u * root).contiguous()
    with torch.no_grad():
        residual = (w.float() - scaling * b @ a).to(weight.dtype)
        module_weight(lora_a).copy_(a)
        module_weight(lora_b).copy_(b)
        weight.copy_(residual.t() if isinstance(base, Conv1D) else residual)
    del base.eigens
