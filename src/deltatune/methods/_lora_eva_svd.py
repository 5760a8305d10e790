"""EVA's streaming SVD and its plumbing (hooks, input preparation, devices): an incremental PCA of each
targeted layer's inputs, fed batch by batch by a forward hook, with PEFT's numerical choices (so the same data
in the same order gives PEFT's components).

Per batch X (n rows, float32): the running mean and variance are updated in float64; the SVD is taken of the
centred batch (first batch) or of [S·Vᵀ ; X − mean(X) ; √(n_seen·n / n_total)·(mean_old − mean(X))] (later
batches, which makes the computation float64), by ``torch.svd_lowrank`` with q = 2k and 4 subspace iterations
from seed 42 (the global generator is left untouched); each component's sign makes its largest entry positive.
The explained-variance ratio of a component is S² / (n_total · Σ var). A component has converged when its
cosine similarity to the previous batch's is at least ``tau``.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EvaHook",
    "IncrementalSVD",
    "default_layer_inputs",
    "forward_fn_dict",
    "model_device",
    "prepare_layer_inputs_fn_language_modeling",
    "prepare_model_inputs_fn_language_modeling",
    "to_device",
]

logger = logging.getLogger(__name__)
LayerInputsFn = Callable[[Any, Any, str], torch.Tensor]


class IncrementalSVD:
    """The top ``n_components`` right singular vectors of a stream of centred row batches.

    Attributes:
        components: (k, features) after the first update, else None.
        singular_values: (k,).
        explained_variance_ratio: (k,).
    """

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4) -> None:
        self.n_components = n_components
        self.seed = seed
        self.niter = niter
        self.components: torch.Tensor | None = None
        self.singular_values = torch.empty(0)
        self.explained_variance_ratio = torch.empty(0)
        self._mean = torch.empty(0)
        self._var = torch.empty(0)
        self._seen = torch.zeros(1, dtype=torch.long)

    def update(self, rows: torch.Tensor) -> None:
        """Folds the batch ``rows`` (n, features) into the decomposition.

        Raises:
            ValueError: when there are fewer features or rows than components.
        """
        x = rows.clone() if rows.dtype in (torch.float32, torch.float64) else rows.to(torch.float32)
        n, features = x.shape
        k = self.n_components
        if k > features:
            raise ValueError(
                f"EVA: {k} components (r * rho) for a layer with {features} input features; lower r or rho"
            )
        if k > n:
            raise ValueError(f"EVA: {k} components (r * rho) need at least {k} rows per batch, got {n}")
        first = self.components is None
        if first:
            self._seen = torch.zeros(1, dtype=torch.long, device=x.device)
        mean, var, total = self._moments(x, first)
        if first:
            x -= mean
        else:
            assert self.components is not None
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            factor = torch.sqrt((self._seen.double() / total) * n)
            correction = factor * (self._mean - batch_mean)
            x = torch.vstack((self.singular_values.view(-1, 1) * self.components, x, correction))
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            _, s, v = torch.svd_lowrank(x, q=2 * k, niter=self.niter)
        vt = v.mH
        largest = torch.argmax(vt.abs(), dim=1)
        vt = vt * torch.sign(vt[torch.arange(vt.shape[0], device=vt.device), largest]).view(-1, 1)
        self.explained_variance_ratio = (s**2 / torch.sum(var * total))[:k]
        self._seen, self._mean, self._var = total, mean, var
        self.components, self.singular_values = vt[:k], s[:k]

    def _moments(self, x: torch.Tensor, first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, variance, rows seen) after the batch ``x``; the mean and variance in float64."""
        count = torch.tensor([x.shape[0]], device=x.device)
        total = self._seen + count
        last_sum = (
            torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            if first
            else self._mean * self._seen
        )
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        centred = x - new_sum / count
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        spread = centred.square().sum(dim=0, dtype=torch.float64)
        spread -= correction / count
        if first:
            return mean, spread / total, total
        ratio = self._seen.double() / count
        combined = self._var * self._seen + spread + ratio / total * (last_sum / ratio - new_sum).square()
        return mean, combined / total, total


def forward_fn_dict(model: nn.Module, inputs: Any) -> Any:
    """The default forward: ``model(**inputs)``."""
    return model(**inputs)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's parameters (meta ones aside); None, with a warning, when there are several."""
    devices = list({p.device for p in model.parameters() if p.device.type != "meta"})
    if len(devices) > 1:
        warnings.warn(f"Could not determine device, model has multiple devices: {devices}", stacklevel=4)
        return None
    return devices[0] if devices else None


def to_device(inputs: Any, device: torch.device | None) -> Any:
    """``inputs`` (a tensor, or mappings and sequences of them) moved to ``device``."""
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: to_device(v, device) for k, v in inputs.items()})  # type: ignore[call-arg]
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_device(v, device) for v in inputs)
    warnings.warn(f"input of type {type(inputs)} could not be moved to the correct device", stacklevel=4)
    return inputs


def default_layer_inputs(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """The layer's first positional input, every dimension but the last flattened into rows.

    Raises:
        TypeError: when the input is neither a tensor nor a tuple/list starting with one.
    """
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    x = layer_input[0] if isinstance(layer_input, tuple | list) else layer_input
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"unsupported input type {type(x)} for prepare_layer_inputs_fn in layer {layer_name}, "
            "please provide a custom prepare_layer_inputs_fn"
        )
    return x


def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: Any) -> torch.Tensor:
    """The (batch, position) indices of the tokens EVA uses: those of the ``attention_mask`` (all without one),
    less those whose ``labels`` equal ``label_mask_value`` when ``use_label_mask``.

    Raises:
        TypeError: when the model input is not a dict.
    """
    if not isinstance(model_input, dict):
        raise TypeError("When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    options = peft_config.eva_config
    if options.use_label_mask and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != options.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(
    layer_input: Any, model_input: Any, layer_name: str
) -> torch.Tensor:
    """The rows of the layer's (batch, sequence, features) input at the token indices ``model_input`` (the
    output of :func:`prepare_model_inputs_fn_language_modeling`)."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


class EvaHook:
    """The forward hook on one layer: first records a fingerprint of the layer's prepared input (so that layers
    fed the same input share one SVD), then (``svd`` set) folds each batch into the layer's SVD."""

    def __init__(self, name: str, prepare: LayerInputsFn | None, gather: bool) -> None:
        self.name = name
        self.prepare: LayerInputsFn = prepare or default_layer_inputs
        self.gather = gather
        self.model_input: Any = None
        self.fingerprints: list[str] = []
        self.svd: IncrementalSVD | None = None
        self.tau = 1.0
        self.converged = torch.zeros(0, dtype=torch.bool)

    def start_svd(self, n_components: int, tau: float) -> None:
        """From now on each call updates an SVD of ``n_components`` components."""
        self.svd = IncrementalSVD(n_components)
        self.tau = tau
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module: Any, args: Any, output: Any) -> None:
        rows = self.prepare(args, self.model_input, self.name)
        rows = gather_rows(rows) if self.gather else rows
        if self.svd is None:
            data = rows.detach().cpu().contiguous()
            digest = hashlib.sha256(f"{tuple(data.shape)}{data.dtype}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
            self.fingerprints.append(digest.hexdigest())
            return
        if rows.shape[0] < self.svd.n_components:
            logger.info("EVA: skipping a batch of %s: fewer than %d rows", self.name, self.svd.n_components)
            return
        previous = None if self.svd.components is None else self.svd.components.clone()
        self.svd.update(rows.to(torch.float32))
        if previous is not None:
            assert self.svd.components is not None
            similarity = F.cosine_similarity(self.svd.components, previous)
            self.converged = similarity >= self.tau


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Under ``torch.distributed``, every process's rows (padded to the longest for ``all_gather``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    world = dist.get_world_size()
    size = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = torch.empty(world, dtype=size.dtype, device=rows.device)
    dist.all_gather_into_tensor(sizes, size)
    counts = sizes.tolist()
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)], dim=0)
