"""Trainable tokens: only chosen rows of an embedding train (PEFT's ``TrainableTokensConfig``; the method
PEFT's LoRA uses for ``trainable_token_indices``).

    E'[i] = t_i  for i in token_indices,   E'[j] = E[j] otherwise

The new rows ``t`` start as the old ones (``init_weights=True``), so the model starts unchanged; only they
train, and they are all an adapter file holds (``…embed_tokens.trainable_tokens_delta``). With tied input
and output embeddings the output layer follows. The layer is shared with LoRA (:mod:`._token_rows`); the
tuner is :mod:`._trainable_tokens_model`. Not a general-purpose adapter, so it is not listed among the CLI's
methods (:attr:`deltatune.registry.MethodSpec.listed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import TargetingConfig, help_field
from ..registry import MethodSpec, register_method
from ._lazy import forward_attributes

__all__ = ["TrainableTokensConfig"]

#: Fields of deltatune's targeting base that PEFT's ``TrainableTokensConfig`` does not have (not written).
_NOT_PEFTS = ("exclude_modules", "modules_to_save")


@dataclass
class TrainableTokensConfig(TargetingConfig):
    """Configuration of trainable tokens (PEFT's ``TrainableTokensConfig``: fields, defaults, JSON keys).

    ``target_modules`` None means the model's input embedding (``get_input_embeddings``), else
    ``embed_tokens``.
    """

    token_indices: list[int] = help_field(
        "The token ids whose embedding rows train (the fewer, the cheaper).", default_factory=list
    )
    init_weights: bool = help_field(
        "Whether the trainable rows start as the embedding's rows (the model unchanged); false starts them "
        "random.",
        True,
    )

    PEFT_TYPE: ClassVar[str] = "TRAINABLE_TOKENS"

    def __post_init__(self) -> None:
        super().__post_init__()
        indices = self.token_indices
        if not isinstance(indices, list | tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices
        ):
            raise ValueError(f"token_indices={indices!r} is not valid; give a list of token ids")
        self.token_indices = list(indices)
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights={self.init_weights!r} must be true or false")
        for name in _NOT_PEFTS:
            if getattr(self, name):
                raise ValueError(
                    f"{name} is not an option of TrainableTokensConfig; its options: token_indices, "
                    "target_modules, init_weights"
                )

    def to_dict(self) -> dict[str, Any]:
        """PEFT's keys (without the targeting base's ``exclude_modules`` and ``modules_to_save``)."""
        data = super().to_dict()
        for name in _NOT_PEFTS:
            data.pop(name, None)
        return data


register_method(
    MethodSpec(
        name="trainable_tokens",
        config_cls=TrainableTokensConfig,
        layer="deltatune.methods._token_rows:TrainableTokensLayer",
        prefix="trainable_tokens_",
        tuner="deltatune.methods._trainable_tokens_model:TrainableTokensModel",
        display_name="Trainable tokens",
        listing_order=90,
        listed=False,
    )
)

__getattr__ = forward_attributes(__name__, "._token_rows", "._trainable_tokens_model")
