"""PEFT's task classes: :class:`~deltatune.PeftModel` with the forward signature of a task's transformers model,
``generate`` for the language models, and the heads a task trains (``modules_to_save``).

``get_peft_model`` and ``PeftModel.from_pretrained`` pick the class from the config's ``task_type``
(:data:`MODEL_TYPE_TO_PEFT_MODEL_MAPPING`, PEFT's table); without a task type they give a plain ``PeftModel``.
The heads PEFT adds per task (``classifier``/``score`` for ``SEQ_CLS`` and ``TOKEN_CLS``, ``qa_outputs`` for
``QUESTION_ANS``) come from the config's ``task_type`` itself (:data:`deltatune.matching.TASK_HEADS`), so
they train and are saved whichever class holds the adapter; a head the model lacks is skipped.

Every forward takes ``adapter_names=[...]`` (one adapter per row, inference only), as ``PeftModel.forward`` does.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
import transformers

from ._files import resolve_file
from ._loading import MODEL_BUILD_LOCK
from .config import PeftConfig
from .model import PeftModel

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "peft_model_class",
]


def _return_dict_default(model_config: Any) -> bool:
    """transformers' default for ``return_dict`` (``config.return_dict``, never in torchscript mode)."""
    return bool(getattr(model_config, "return_dict", True)) and not getattr(
        model_config, "torchscript", False
    )


class _TaskModel(PeftModel):
    """Runs the base model with named arguments, within the mixed-batch context of ``adapter_names``."""

    def _run(self, kwargs: dict[str, Any], **named: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        kwargs.pop("alora_offsets", None)  # PEFT's explicit aLoRA offsets: deltatune's come from input_ids
        with self._mixed_batch(adapter_names):
            return self.base_model(**named, **kwargs)


class _ClassifierTaskModel(_TaskModel):
    """The forward of PEFT's sequence and token classifiers (the same signature in PEFT)."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The classifier's forward (``task_ids`` is accepted and unused, as in PEFT for these methods)."""
        if return_dict is None:
            return_dict = _return_dict_default(getattr(self.base_model.model, "config", None))
        return self._run(
            kwargs,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


class PeftModelForSequenceClassification(_ClassifierTaskModel):
    """``task_type="SEQ_CLS"``: the ``classifier``/``score`` head trains with the adapter and is saved with it."""


class PeftModelForTokenClassification(_ClassifierTaskModel):
    """``task_type="TOKEN_CLS"``: the ``classifier``/``score`` head trains with the adapter and is saved with it."""


class PeftModelForQuestionAnswering(_TaskModel):
    """``task_type="QUESTION_ANS"``: the ``qa_outputs`` head trains with the adapter and is saved with it."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The extractive question-answering model's forward (span start and end logits)."""
        if return_dict is None:
            return_dict = _return_dict_default(getattr(self.base_model.model, "config", None))
        return self._run(
            kwargs,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            start_positions=start_positions,
            end_positions=end_positions,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


class PeftModelForFeatureExtraction(_TaskModel):
    """``task_type="FEATURE_EXTRACTION"``: the encoder's forward (hidden states; no labels)."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward."""
        return self._run(
            kwargs,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


class PeftModelForCausalLM(_TaskModel):
    """``task_type="CAUSAL_LM"``: a decoder language model; ``generate`` runs with the active adapters (or
    ``adapter_names`` per row)."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The language model's forward (logits; the loss with ``labels``)."""
        return self._run(
            kwargs,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )

    def prepare_inputs_for_generation(
        self, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """The base model's ``prepare_inputs_for_generation`` without ``cache_position`` (PEFT's, for methods
        that add no virtual tokens: the model derives the positions itself)."""
        base: Any = self.base_model.model
        model_kwargs = base.prepare_inputs_for_generation(*args, **kwargs)
        model_kwargs.pop("cache_position", None)
        return model_kwargs


class PeftModelForSeq2SeqLM(_TaskModel):
    """``task_type="SEQ_2_SEQ_LM"``: an encoder-decoder model; ``generate`` takes keyword arguments only, as in
    PEFT."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The encoder-decoder's forward."""
        return self._run(
            kwargs,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )

    def generate(self, **kwargs: Any) -> Any:  # type: ignore[override]
        """The base model's ``generate`` (keyword arguments, ``adapter_names`` as in :meth:`forward`)."""
        return super().generate(**kwargs)

    def prepare_inputs_for_generation(
        self, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """The base model's ``prepare_inputs_for_generation``."""
        base: Any = self.base_model.model
        return base.prepare_inputs_for_generation(*args, **kwargs)


#: ``task_type`` → the class that ``get_peft_model`` and ``PeftModel.from_pretrained`` return (PEFT's table).
MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "CAUSAL_LM": PeftModelForCausalLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def peft_model_class(task_type: Any, default: type[PeftModel] = PeftModel) -> type[PeftModel]:
    """The task class for ``task_type`` (a :class:`~deltatune.TaskType` or its name); ``default`` for None or an
    unknown task."""
    name = getattr(task_type, "value", task_type)
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(name), default) if name is not None else default


# ---- AutoPeftModel: the base model named in the adapter's config, then the adapter --------------------------
#: Libraries an adapter config's ``auto_mapping`` may name (PEFT's default allowlist).
DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")


class AutoPeftModel:
    """PEFT's ``AutoPeftModel``: ``from_pretrained(adapter_dir)`` loads the base model the adapter's config names
    (``base_model_name_or_path`` and ``revision``), with the transformers auto class of the task (or, without a
    task type, the class in the config's ``auto_mapping``), then the adapter onto it. Not instantiated."""

    #: The transformers auto class (its name; None: from the config's ``auto_mapping``) and the PEFT class.
    _target_class: str | None = None
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is designed to be instantiated using the "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)` method."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Any,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Any = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """The base model, then the adapter (``PeftModel.from_pretrained``'s arguments; ``kwargs`` go to the base
        model's ``from_pretrained``).

        Raises:
            ValueError: when the class does not fit the config's task type, or no base class can be inferred, or
                ``auto_mapping`` names a library outside ``import_allowlist``.
        """
        peft_config = PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision)
        task_type = getattr(peft_config.task_type, "value", peft_config.task_type)
        target: Any = None if cls._target_class is None else getattr(transformers, cls._target_class)
        if target is None and task_type is not None:
            raise ValueError(
                "Cannot use `AutoPeftModel` with a task type, please use a specific class for your task type. "
                "(e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)"
            )
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[str(task_type)]
            if cls._target_peft_class is not expected:
                raise ValueError(
                    f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                    f"{cls._target_peft_class.__name__} make sure that you are loading the correct model for your "
                    "task type."
                )
        elif peft_config.auto_mapping is not None:
            library = str(peft_config.auto_mapping["parent_library"])
            allowed = DEFAULT_IMPORT_ALLOWLIST if import_allowlist is None else tuple(import_allowlist)
            if library not in allowed and not library.startswith(tuple(f"{a}." for a in allowed)):
                raise ValueError(
                    f"The auto mapping wants to import '{library}' which is not in the import allowlist. If you "
                    f"are sure that importing this library is safe, specify `import_allowlist=['{library}']`."
                )
            target = getattr(importlib.import_module(library), peft_config.auto_mapping["base_model_class"])
        else:
            raise ValueError(
                "Cannot infer the auto class from the config, please make sure that you are loading the correct "
                "model for your task type."
            )
        with MODEL_BUILD_LOCK:  # transformers' load swaps process-wide state (see deltatune._loading)
            base = target.from_pretrained(
                peft_config.base_model_name_or_path, revision=peft_config.revision, **kwargs
            )
        _fit_embeddings_to_saved_tokenizer(base, pretrained_model_name_or_path, revision, kwargs)
        return cls._target_peft_class.from_pretrained(
            base,
            pretrained_model_name_or_path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
        )


def _fit_embeddings_to_saved_tokenizer(
    base: Any, adapter_dir: str | os.PathLike[str], revision: str | None, kwargs: dict[str, Any]
) -> None:
    """A tokenizer saved with the adapter that holds more tokens than the base's input embeddings has them
    resized to it, as PEFT does (added tokens: the adapter's embeddings were trained for that size)."""
    if not callable(getattr(base, "get_input_embeddings", None)):
        return
    try:
        resolve_file(adapter_dir, "tokenizer_config.json", revision=revision, token=kwargs.get("token"))
    except FileNotFoundError:
        return
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        adapter_dir,
        revision=revision,
        token=kwargs.get("token"),
        trust_remote_code=kwargs.get("trust_remote_code", False),
    )
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModelForCausalLM(AutoPeftModel):
    """``transformers.AutoModelForCausalLM``, then a :class:`PeftModelForCausalLM`."""

    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    """``transformers.AutoModelForSeq2SeqLM``, then a :class:`PeftModelForSeq2SeqLM`."""

    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    """``transformers.AutoModelForSequenceClassification``, then a :class:`PeftModelForSequenceClassification`."""

    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(AutoPeftModel):
    """``transformers.AutoModelForTokenClassification``, then a :class:`PeftModelForTokenClassification`."""

    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    """``transformers.AutoModelForQuestionAnswering``, then a :class:`PeftModelForQuestionAnswering`."""

    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    """``transformers.AutoModel``, then a :class:`PeftModelForFeatureExtraction`."""

    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
