"""LoRA: low-rank adaptation (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    y = W x + s · B A dropout(x),   A ∈ R^{r×in}, B ∈ R^{out×r},   s = alpha / r  (alpha / √r with rsLoRA)

For a Conv2d, A is a conv with the base kernel (in → r) and B a 1×1 conv (r → out), so
ΔW[o, i, …] = s · Σ_k B[o, k] A[k, i, …].

The config and the registration live here (no torch); the maths and the layers in :mod:`._lora_layer`,
:mod:`._lora_kinds` and :mod:`._lora_model`, imported on first use.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import AdapterConfig, check_choice, check_range, help_field
from ..registry import MethodSpec, register_method
from ._lazy import forward_attributes
from ._lora_options import BdLoraConfig, CordaConfig, EvaConfig, KasaConfig, LoftQConfig, sub_config
from ._lora_variants import requested_variants
from ._target_defaults import LORA_DEFAULT_TARGETS

__all__ = [
    "BdLoraConfig",
    "CordaConfig",
    "EvaConfig",
    "KasaConfig",
    "LoftQConfig",
    "LoraConfig",
    "pissa_iterations",
]

INIT_CHOICES = (True, False, "gaussian")
#: The initialisers computed from the base weight (:mod:`._lora_init`); ``pissa_niter_N`` is accepted too.
BASE_INITS = ("pissa", "olora", "orthogonal", "loftq", "mica")
#: The initialisers computed from data: EVA (:mod:`._lora_eva`) and CorDA (:mod:`._lora_corda`).
DATA_INITS = ("eva", "corda")

BIAS_CHOICES = ("none", "all", "lora_only")
#: The tag of a field that selects a variant of LoRA when set (PEFT's; see :mod:`._lora_variants`).
VARIANT = {"is_lora_variant": True}


@dataclass
class LoraConfig(AdapterConfig):
    """Configuration of LoRA (same fields, defaults and JSON keys as PEFT's ``LoraConfig``).

    Each field's description is its ``help`` metadata. The fields after ``init_lora_weights`` exist so that
    configs written by PEFT round-trip unchanged; values other than their defaults are rejected with a clear
    error when they would change behaviour.
    """

    r: int = help_field("Rank of the update B A, a positive integer.", 8)
    lora_alpha: float = help_field("Scale numerator: the update is scaled by lora_alpha / r.", 8)
    lora_dropout: float = help_field(
        "Dropout probability on the adapter's input, at least 0 and below 1.", 0.0
    )
    fan_in_fan_out: bool = help_field(
        "Whether the base weight is stored as (in, out), as in transformers' Conv1D; corrected to the layer's "
        "real layout with a warning.",
        False,
    )
    bias: str = help_field(
        "Which biases train: 'none', 'all', or 'lora_only' (the biases of the targeted layers).", "none"
    )
    use_rslora: bool = help_field("Whether to scale by lora_alpha / sqrt(r) (rank-stabilised LoRA).", False)
    init_lora_weights: bool | str = help_field(
        "Initialisation: true (A Kaiming-uniform, B zero), 'gaussian' (A normal with standard deviation 1/r, "
        "B zero), false (both random, so the adapter starts as a non-zero update), 'pissa' (A and B from the "
        "base weight's top-r SVD, the base keeps the residual; 'pissa_niter_N' uses a randomized SVD with N "
        "iterations), 'olora' (from the base weight's QR, the base keeps the residual), 'orthogonal' "
        "(random orthogonal A and B, even r), 'loftq' (the base becomes its 4- or 8-bit quantization and A, "
        "B the SVD of what it lost; set loftq_config), 'eva' (A from the SVD of the layers' inputs over data, "
        "with ranks redistributed: call initialize_lora_eva_weights) or 'corda' (A and B from the base weight "
        "decomposed with the inputs' covariance, the base keeps the residual: call preprocess_corda first) or "
        "'mica' (B the base weight's r minor left singular vectors, frozen; A zero and trained).",
        True,
        metadata={"lora_variants": ["mica"]},  # the values that select a variant of LoRA (MiCA)
    )
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = help_field(
        "Embedding rows that train, the rest of the embedding frozen: a list of token ids (the input "
        "embedding) or a dict of module name to token ids; with tied embeddings the output layer follows.",
        None,
    )
    loftq_config: dict[str, Any] = help_field(
        "LoftQ's options with init_lora_weights='loftq': loftq_bits (4 or 8) and loftq_iter (at least 1).",
        default_factory=dict,
    )
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = help_field(
        "Whether to use weight-decomposed LoRA (DoRA), which the 'dora' method implements.",
        False,
        metadata=VARIANT,
    )
    velora_config: Any = None
    alora_invocation_tokens: Any = help_field(  # list[int] | None; Any keeps it off the image CLI's flags
        "Activated LoRA (aLoRA, for causal language models): the token ids of the invocation sequence; the "
        "adapter applies from its last occurrence in the input on (and to every generated token), the base "
        "model before it.",
        None,
        metadata=VARIANT,
    )
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: list[list[int]] | None = help_field(
        "Rebuild the decoder stack from [start, end) ranges of its layers (e.g. [[0, 4], [2, 5]] gives layers "
        "0, 1, 2, 3, 2, 3, 4); repeated layers share their base weights and get adapters of their own.",
        None,
    )
    lora_bias: bool = help_field("Whether B gets a trainable bias.", False)
    target_parameters: list[str] | None = help_field(
        "Parameters to adapt directly (for weights no Linear holds, e.g. the stacked expert weights of "
        "mixture-of-experts layers): names that a parameter's full name equals or ends with.",
        None,
    )
    use_bdlora: BdLoraConfig | None = help_field(
        "BD-LoRA (a BdLoraConfig): A or B block-diagonal in the modules it names, for sharded serving. Linear "
        "layers only.",
        None,
        metadata=VARIANT,
    )
    arrow_config: Any = None
    kasa_config: KasaConfig | None = help_field(
        "KaSA (a KasaConfig): the base weight loses its r smallest singular components once, at creation, and "
        "the update is s·B diag(lora_diag) A with a learnt diagonal; add LoraModel._get_kasa_loss() to the loss "
        "for its regularisers. Linear layers only; not combinable with non-KaSA adapters.",
        None,
        metadata=VARIANT,
    )
    ensure_weight_tying: bool = help_field(
        "Whether adapters on a tied input embedding (modules_to_save, target_modules, "
        "trainable_token_indices) are tied to the output layer too, as the base weights are.",
        False,
    )

    #: The string initialisers this config accepts beside 'gaussian' (AdaLoRA accepts none).
    BASE_INITS: ClassVar[tuple[str, ...]] = (*BASE_INITS, *DATA_INITS)
    ALPHA_FIELD: ClassVar[str] = "lora_alpha"
    DROPOUT_FIELD: ClassVar[str | None] = "lora_dropout"
    RECIPE_DEFAULTS: ClassVar[dict[str, Any]] = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.1}
    #: What a command line offers for a field (``_N``: a whole number), read by the CLI; the values a config
    #: class accepts are those it can be built with, so a subclass (AdaLoRA) offers fewer.
    FLAG_CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "init_lora_weights": (
            "gaussian", "true", "false", "pissa", "olora", "orthogonal", "loftq", "eva"
        )
    }  # fmt: skip
    #: Values the library takes but a command line refuses, with the reason: the saved adapter of such a run
    #: would not reload to the run's numbers in ``evaluate``/``predict``/a pipeline (the base weights were
    #: rewritten by something a reload cannot recompute). The library's conversion on save fixes that.
    FLAG_REFUSED: ClassVar[dict[str, dict[str, str]]] = {
        "init_lora_weights": {
            "corda": "CorDA rewrites the base weights from the training data's covariances, which a reload of "
            "the adapter (evaluate, predict, merge) cannot recompute",
            "pissa_niter_N": "its randomized SVD rewrites the base weights differently at each reload (evaluate, "
            "predict, merge); 'pissa' (the exact SVD) reloads to the run's numbers",
        }
    }
    #: Initialisers computed from data (PEFT's EVA and CorDA): value → (when the library function runs:
    #: "before" or "after" ``get_peft_model``, its name in the package); the CLI runs them on training batches.
    DATA_INITS: ClassVar[dict[str, tuple[str, str]]] = {
        "eva": ("after", "initialize_lora_eva_weights"),
        "corda": ("before", "preprocess_corda"),
    }
    #: The CLI's optimiser options that apply to this method (LoRA+, :mod:`deltatune.optimizers`).
    OPTIMIZER_OPTIONS: ClassVar[tuple[str, ...]] = ("loraplus_lr_ratio", "loraplus_lr_embedding")
    #: Fields that select a variant of LoRA implemented by another registered method (DoRA, KaSA, aLoRA).
    VARIANT_FLAGS: ClassVar[tuple[str, ...]] = ("use_dora", "kasa_config", "alora_invocation_tokens")
    #: Options for language models (tied embeddings, decoder stacks, MoE parameters), which the CLI's
    #: image recipe takes but its ``--help`` leaves to ``--help-all``.
    HELP_ALL_FIELDS: ClassVar[tuple[str, ...]] = (
        "layer_replication",
        "target_parameters",
        "ensure_weight_tying",
        "trainable_token_indices",
    )
    PEFT_TYPE: ClassVar[str] = "LORA"
    #: Hot-swapping (``deltatune.utils.hotswap``) is for LoRA; two adapters must agree on these fields, which
    #: change the output without being in the tensors (PEFT's list).
    HOTSWAP_FIELDS: ClassVar[tuple[str, ...] | None] = (
        "use_rslora",
        "lora_dropout",
        "alpha_pattern",
        "use_dora",
    )
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = LORA_DEFAULT_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lora_dropout", self.lora_dropout, 0, 1)
        # ``bias`` is checked when the adapter is applied (PEFT's NotImplementedError, see LoraModel)
        self._check_init()
        self._check_data_inits()
        self.kasa_config = sub_config(self.kasa_config, KasaConfig, "kasa_config")
        self.use_bdlora = sub_config(self.use_bdlora, BdLoraConfig, "use_bdlora")
        chosen = requested_variants(self)
        if len(chosen) > 1:  # PEFT's message (it raises when the layers are built)
            raise ValueError(f"Invalid or unsupported variant combination: {chosen}; choose one of them")
        self._check_rslora_conversion()
        self._check_token_indices()
        self._check_replication()
        task = str(getattr(self.task_type, "value", self.task_type))
        if self.alora_invocation_tokens is not None and task != "CAUSAL_LM":
            warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.", stacklevel=3)
        if self.use_dora and self.megatron_config:  # PEFT's check, before megatron_config is refused below
            raise ValueError("DoRA does not support megatron_core, please set `use_dora=False`.")
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)
        unsupported = {
            "use_qalora": self.use_qalora,
            "lora_ga_config": self.lora_ga_config,
            "velora_config": self.velora_config,
            "monteclora_config": self.monteclora_config,
            "megatron_config": self.megatron_config,
            "layer_replication": self.layer_replication if self.PEFT_TYPE != "LORA" else None,
            "target_parameters": self.target_parameters if self.PEFT_TYPE != "LORA" else None,
            "trainable_token_indices": self.trainable_token_indices if self.PEFT_TYPE != "LORA" else None,
            "alora_invocation_tokens": self.alora_invocation_tokens if self.PEFT_TYPE != "LORA" else None,
            "arrow_config": self.arrow_config,
            "kasa_config": self.kasa_config if self.PEFT_TYPE != "LORA" else None,
            "use_bdlora": self.use_bdlora if self.PEFT_TYPE != "LORA" else None,
        }
        used = [k for k, v in unsupported.items() if v]
        if used:
            raise ValueError(
                f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} not supported by deltatune's "
                f"{type(self).__name__}; supported options: r, lora_alpha, lora_dropout, target_modules, "
                "exclude_modules, modules_to_save, bias, use_rslora, init_lora_weights, lora_bias, "
                "fan_in_fan_out, rank_pattern, alpha_pattern, layers_to_transform, layers_pattern, "
                "trainable_token_indices, ensure_weight_tying, target_parameters, layer_replication, "
                + ", ".join(self.VARIANT_FLAGS)
            )

    def _check_rslora_conversion(self) -> None:
        """PEFT's warning: with rsLoRA and a rank or alpha pattern, the adapter of a base-changing initialiser
        (PiSSA, OLoRA, CorDA) cannot later be converted back with ``path_initial_model_for_weight_conversion``."""
        init = self.init_lora_weights
        base_changing = isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda"))
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and base_changing:
            warnings.warn(
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of "
                f"modified base weights (init_lora_weights={init!r}) means that `save_pretrained` cannot take "
                "`path_initial_model_for_weight_conversion` to restore the initial base weights; to keep that "
                "possible, use neither use_rslora nor rank_pattern/alpha_pattern.",
                UserWarning,
                stacklevel=4,
            )

    def _check_replication(self) -> None:
        """``layer_replication``: a list of [start, end) pairs of integers.

        Raises:
            ValueError: naming the value and the accepted form.
        """
        pairs = self.layer_replication
        if pairs is None:
            return
        ok = isinstance(pairs, list | tuple) and all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in pairs
        )
        if not ok:
            raise ValueError(
                f"layer_replication={pairs!r} is not valid; give a list of [start, end) pairs of layer indices, "
                "e.g. [[0, 4], [2, 5]]"
            )
        self.layer_replication = [list(p) for p in pairs]

    def _check_token_indices(self) -> None:
        """``trainable_token_indices``: a list of token ids, or a dict of module name to such a list.

        Raises:
            ValueError: naming the value and the accepted forms.
        """
        indices = self.trainable_token_indices
        if indices is None:
            return
        lists = list(indices.values()) if isinstance(indices, dict) else [indices]
        ok = isinstance(indices, dict | list | tuple) and all(
            isinstance(v, list | tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            for v in lists
        )
        if not ok or (isinstance(indices, dict) and not all(isinstance(k, str) for k in indices)):
            raise ValueError(
                f"trainable_token_indices={indices!r} is not valid; give a list of token ids or a dict of "
                "module name to a list of token ids"
            )

    def _check_init(self) -> None:
        """``init_lora_weights`` is one of the choices (the base-weight ones only where the class allows them);
        ``lora_bias`` only with true or false and without DoRA (PEFT's rules).

        Raises:
            ValueError: naming the value and the choices.
        """
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() == "olora" and "olora" in self.BASE_INITS:
            init = self.init_lora_weights = "olora"  # PEFT takes any case here ("OLoRA")
        self._check_loftq()
        if self.BASE_INITS and isinstance(init, str) and init.startswith("pissa"):
            pissa_iterations(init)
        elif not (isinstance(init, str) and init in self.BASE_INITS):
            check_choice("init_lora_weights", init, (*INIT_CHOICES, *self.BASE_INITS))
        if self.lora_bias and init not in (True, False):
            raise ValueError(
                "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                f"init_lora_weights={init} instead."
            )
        if self.lora_bias and getattr(self, "use_dora", False):
            raise ValueError(
                "The argument lora_bias=True is not supported with DoRA (use_dora=True), as in PEFT; set "
                "lora_bias=False or use_dora=False."
            )

    def _check_loftq(self) -> None:
        """PEFT's rules for ``loftq_config``: required with LoftQ (a ``LoftQConfig`` becomes a dict), dropped with
        a warning otherwise; deltatune also checks its values.

        Raises:
            ValueError: when LoftQ has no ``loftq_config``, or bits other than 4 and 8, or under 1 iteration.
        """
        if self.init_lora_weights != "loftq" or "loftq" not in self.BASE_INITS:
            if self.loftq_config:
                self.loftq_config = {}
                warnings.warn(
                    "`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                    stacklevel=4,
                )
            return
        if not self.loftq_config:
            raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
        if not isinstance(self.loftq_config, dict):
            self.loftq_config = dict(vars(self.loftq_config))
        options = {"loftq_bits": 4, "loftq_iter": 1, **self.loftq_config}
        if options["loftq_bits"] not in (4, 8):
            raise ValueError(
                f"loftq_config: loftq_bits={options['loftq_bits']!r} is not valid; choose 4 or 8"
            )
        if isinstance(options["loftq_iter"], bool) or not isinstance(options["loftq_iter"], int):
            raise ValueError(
                f"loftq_config: loftq_iter={options['loftq_iter']!r} must be an integer of at least 1"
            )
        if options["loftq_iter"] < 1:
            raise ValueError(
                f"loftq_config: loftq_iter={options['loftq_iter']!r} must be an integer of at least 1"
            )

    def _check_data_inits(self) -> None:
        """PEFT's rules for ``eva_config`` and ``corda_config``: a dict becomes the config class; with its
        initialiser and no config, the default config with a warning; without it, a warning that it is ignored.

        Raises:
            TypeError: for a value that is neither None, the config class nor a dict.
        """
        self.eva_config = sub_config(self.eva_config, EvaConfig)
        self.corda_config = sub_config(self.corda_config, CordaConfig)
        init = self.init_lora_weights
        for name, cls in (("eva", EvaConfig), ("corda", CordaConfig)):
            field = f"{name}_config"
            if init == name and getattr(self, field) is None:
                warnings.warn(
                    f"`init_lora_weights` is '{name}' but `{field}` is not specified. Using default "
                    f"{'EVA' if name == 'eva' else 'CorDA'} config.",
                    stacklevel=4,
                )
                setattr(self, field, cls())
            elif init != name and getattr(self, field) is not None:
                warnings.warn(
                    f"`{field}` specified but will be ignored when `init_lora_weights` is not '{name}'.",
                    stacklevel=4,
                )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict; the option classes (``eva_config``, ``kasa_config``, ...) as dicts
        (PEFT's layout), paths as strings."""
        data = super().to_dict()
        for field in ("eva_config", "corda_config", "kasa_config", "use_bdlora"):
            value = data.get(field)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                data[field] = {
                    k: os.fspath(v) if isinstance(v, os.PathLike) else v
                    for k, v in dataclasses.asdict(value).items()
                }
        return data

    @classmethod
    def recipe_defaults(cls, planned_steps: int, given: dict[str, Any]) -> dict[str, Any]:
        """:attr:`RECIPE_DEFAULTS`, plus LoftQ's default options (4 bits, 1 iteration) when the user chose
        ``init_lora_weights="loftq"`` without ``loftq_config``."""
        defaults = super().recipe_defaults(planned_steps, given)
        if given.get("init_lora_weights") == "loftq" and "loftq" in cls.BASE_INITS:
            defaults.setdefault("loftq_config", {"loftq_bits": 4, "loftq_iter": 1})
        return defaults

    @property
    def selects_variant(self) -> bool:
        """True when a variant flag (``use_dora``, ``kasa_config``, ``alora_invocation_tokens``) is set: another
        registered method handles this config."""
        return any(getattr(self, flag, False) for flag in self.VARIANT_FLAGS)


def pissa_iterations(init: str) -> int | None:
    """PiSSA's subspace iterations for ``init``: None for ``"pissa"`` (full SVD), N for ``"pissa_niter_N"``.

    Raises:
        ValueError: when ``init`` is neither.
    """
    if init == "pissa":
        return None
    head, sep, tail = init.partition("_niter_")
    if head == "pissa" and sep and tail.isdigit():
        return int(tail)
    raise ValueError(
        f"init_lora_weights={init!r} is not valid; PiSSA is 'pissa' or 'pissa_niter_N' with N a non-negative "
        "number of iterations"
    )


register_method(
    MethodSpec(
        name="lora",
        config_cls=LoraConfig,
        layer="deltatune.methods._lora_layer:LoraLayer",
        layer_kinds=(
            "deltatune.methods._lora_kinds:LoraEmbeddingLayer",
            "deltatune.methods._lora_kinds:LoraMultiheadAttentionLayer",
        ),
        prefix="lora_",
        tuner="deltatune.methods._lora_model:LoraModel",
        selects=lambda config: not config.selects_variant,
        display_name="LoRA",
        listing_order=10,
    )
)

__getattr__ = forward_attributes(__name__, "._lora_layer", "._lora_model", "._lora_kinds")
