"""LoRA's option classes, exported at the top level as in PEFT: ``LoftQConfig``, ``EvaConfig``, ``CordaConfig``
``KasaConfig`` and ``BdLoraConfig`` (``LoraConfig``'s ``loftq_config``, ``eva_config``, ``corda_config``,
``kasa_config`` and ``use_bdlora``), and
:func:`sub_config`, which reads them back from ``adapter_config.json``'s dicts. No torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from ..config import help_field

__all__ = ["BdLoraConfig", "CordaConfig", "EvaConfig", "KasaConfig", "LoftQConfig", "sub_config"]


@dataclass
class LoftQConfig:
    """LoftQ's options (PEFT's ``LoftQConfig``), passed as ``LoraConfig(init_lora_weights="loftq",
    loftq_config=LoftQConfig(...))``; stored in the config as a dict."""

    loftq_bits: int = help_field("Bits of the quantization: 4 (NF4) or 8 (int8).", 4)
    loftq_iter: int = help_field("Alternating quantization and SVD steps, at least 1.", 1)


@dataclass
class EvaConfig:
    """EVA's options (PEFT's ``EvaConfig``), passed as ``LoraConfig(init_lora_weights="eva",
    eva_config=EvaConfig(...))``; the adapter is initialised from data by ``initialize_lora_eva_weights``."""

    rho: float = help_field(
        "Rank redistribution: a layer may get up to r * rho components (at least 1; 1 keeps every rank).", 2.0
    )
    tau: float = help_field(
        "Convergence threshold: cosine similarity of the components between two batches, in [0, 1].", 0.99
    )
    use_label_mask: bool = help_field(
        "Whether positions whose label is label_mask_value are left out of the SVD.", True
    )
    label_mask_value: int = help_field("The label of the positions use_label_mask leaves out.", -100)
    whiten: bool = help_field(
        "Whether to divide each component by the square root of its singular value.", False
    )
    adjust_scaling_factors: bool = help_field(
        "Whether to scale lora_alpha by the new rank / r where the redistribution changed a layer's rank.",
        True,
    )

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError(f"`rho` must be >= 1.0, got {self.rho}")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ValueError(f"`tau` must be between 0.0 and 1.0, got {self.tau}")


@dataclass
class CordaConfig:
    """CorDA's options (PEFT's ``CordaConfig``), passed as ``LoraConfig(init_lora_weights="corda",
    corda_config=CordaConfig(...))``; ``preprocess_corda`` must run on the model before ``get_peft_model``."""

    cache_file: str | None = help_field(
        "File of the decomposition (read when it exists, else written): reused, it skips the data pass.", None
    )
    covariance_file: str | None = help_field(
        "File of the input covariances (read when it exists, else written): reusable for other ranks.", None
    )
    corda_method: str | None = help_field(
        "'ipm' (the r largest components: fastest fitting) or 'kpm' (the r smallest: keeps what the model "
        "knows).",
        "ipm",
    )
    verbose: bool = help_field("Whether to show a progress bar while decomposing.", False)
    use_float16_for_covariance: bool = help_field(
        "Whether to accumulate the covariances in float16 (half the memory, less precise).", False
    )
    prune_temporary_fields: bool = help_field(
        "Whether to remove the covariance, sample count, method and rank from the layers afterwards.", True
    )

    def __post_init__(self) -> None:
        if self.corda_method not in (None, "ipm", "kpm"):
            raise ValueError(f"corda_method={self.corda_method!r} is not valid; choose 'ipm' or 'kpm'")


@dataclass
class KasaConfig:
    """KaSA's options (PEFT's ``KasaConfig``; Wang et al., 2024, "KaSA: Knowledge-Aware Singular-Value Adaptation
    of Large Language Models"), passed as ``LoraConfig(kasa_config=KasaConfig(...))``. They weigh the two
    regularisers of ``LoraModel._get_kasa_loss``, which the user adds to the task loss."""

    beta: float = help_field(
        "Weight of the L2 penalty on the learnt singular values, sum(lora_diag ** 2); at least 0.", 1e-4
    )
    gamma: float = help_field(
        "Weight of the orthogonality penalty ||BᵀB − I||_F + ||AAᵀ − I||_F on the factors; at least 0.", 1e-3
    )

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"`beta` must be non-negative, got {self.beta}.")
        if self.gamma < 0:
            raise ValueError(f"`gamma` must be non-negative, got {self.gamma}.")


@dataclass
class BdLoraConfig:
    """BD-LoRA's options (PEFT's ``BdLoraConfig``), passed as ``LoraConfig(use_bdlora=BdLoraConfig(...))``: in
    the modules named here A or B is block-diagonal (``nblocks`` blocks), which lets a sharded inference engine
    serve the adapter without extra communication (row-sharded modules: A; column-sharded: B)."""

    target_modules_bd_a: list[str] | None = help_field(
        "Modules whose A is block-diagonal: a module is one when any entry is a substring of its name.", None
    )
    target_modules_bd_b: list[str] | None = help_field(
        "Modules whose B is block-diagonal: a module is one when any entry is a substring of its name.", None
    )
    nblocks: int = help_field("Blocks of each block-diagonal factor (the serving's sharding degree).", 1)
    match_strict: bool = help_field(
        "Whether every targeted module must match target_modules_bd_a or target_modules_bd_b.", True
    )

    def __post_init__(self) -> None:
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ValueError(
                "Found overlapping modules in target_modules_bd lists: "
                f"{self.target_modules_bd_a} (A) and {self.target_modules_bd_b} (B)."
            )


_Sub = TypeVar("_Sub", EvaConfig, CordaConfig, KasaConfig, BdLoraConfig)


def sub_config(value: Any, cls: type[_Sub], field: str | None = None) -> _Sub | None:
    """``value`` as ``cls``: None, an instance, or a dict (as read from ``adapter_config.json``; unknown keys
    are dropped, as PEFT does); ``field`` names the config field in the error.

    Raises:
        TypeError: for any other value.
    """
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in value.items() if k in names})
    raise TypeError(f"`{field or cls.__name__}` must be a `{cls.__name__}`, a dict, or None.")
