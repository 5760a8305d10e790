"""deltatune: parameter-efficient fine-tuning (LoRA, LoHa, LoKr, AdaLoRA, DoRA and every method registered
in :mod:`deltatune.methods`), drop-in for PEFT's API and file format.

    from deltatune import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["query", "value"]))

Names are loaded on first use (PEP 562), so ``import deltatune`` imports neither torch nor transformers.
Besides the core names below, every registered method's config class (``LoraConfig``, ...) and tuner class
(``LoraModel``, ``AdaLoraModel``, ...) is exported under its class name, read from the method registry.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

if TYPE_CHECKING:
    from . import methods as methods
    from .config import AdapterConfig as AdapterConfig
    from .config import NoMatchingPeftModuleError as NoMatchingPeftModuleError
    from .config import PeftConfig as PeftConfig
    from .config import PeftError as PeftError
    from .config import PeftWarning as PeftWarning
    from .config import TaskType as TaskType
    from .functional import get_base_model_state_dict as get_base_model_state_dict
    from .functional import get_peft_model_state_dict as get_peft_model_state_dict
    from .functional import inject_adapter_in_model as inject_adapter_in_model
    from .functional import set_base_model_state_dict as set_base_model_state_dict
    from .functional import set_peft_model_state_dict as set_peft_model_state_dict
    from .helpers import cast_mixed_precision_params as cast_mixed_precision_params
    from .helpers import prepare_model_for_kbit_training as prepare_model_for_kbit_training
    from .methods._adalora_model import AdaLoraModel as AdaLoraModel
    from .methods._ia3_layer import IA3Model as IA3Model
    from .methods._lora_corda import preprocess_corda as preprocess_corda
    from .methods._lora_eva import get_eva_state_dict as get_eva_state_dict
    from .methods._lora_eva import initialize_lora_eva_weights as initialize_lora_eva_weights
    from .methods._lora_model import LoraModel as LoraModel
    from .methods._lycoris import LoHaModel as LoHaModel
    from .methods._lycoris import LoKrModel as LoKrModel
    from .methods._trainable_tokens_model import TrainableTokensModel as TrainableTokensModel
    from .methods.adalora import AdaLoraConfig as AdaLoraConfig
    from .methods.ia3 import IA3Config as IA3Config
    from .methods.loha import LoHaConfig as LoHaConfig
    from .methods.lokr import LoKrConfig as LoKrConfig
    from .methods.lora import BdLoraConfig as BdLoraConfig
    from .methods.lora import CordaConfig as CordaConfig
    from .methods.lora import EvaConfig as EvaConfig
    from .methods.lora import KasaConfig as KasaConfig
    from .methods.lora import LoftQConfig as LoftQConfig
    from .methods.lora import LoraConfig as LoraConfig
    from .methods.trainable_tokens import TrainableTokensConfig as TrainableTokensConfig
    from .mixed_model import PeftMixedModel as PeftMixedModel
    from .model import PeftModel as PeftModel
    from .model import get_peft_model as get_peft_model
    from .model_io import load_peft_weights as load_peft_weights
    from .peft_types import PEFT_TYPE_TO_CONFIG_MAPPING as PEFT_TYPE_TO_CONFIG_MAPPING
    from .peft_types import PeftType as PeftType
    from .peft_types import get_peft_config as get_peft_config
    from .registry import MethodSpec as MethodSpec
    from .registry import available_methods as available_methods
    from .registry import get_method as get_method
    from .registry import register_method as register_method
    from .registry import spec_for as spec_for
    from .status import get_layer_status as get_layer_status
    from .status import get_model_status as get_model_status
    from .task_models import MODEL_TYPE_TO_PEFT_MODEL_MAPPING as MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from .task_models import AutoPeftModel as AutoPeftModel
    from .task_models import AutoPeftModelForCausalLM as AutoPeftModelForCausalLM
    from .task_models import AutoPeftModelForFeatureExtraction as AutoPeftModelForFeatureExtraction
    from .task_models import AutoPeftModelForQuestionAnswering as AutoPeftModelForQuestionAnswering
    from .task_models import AutoPeftModelForSeq2SeqLM as AutoPeftModelForSeq2SeqLM
    from .task_models import AutoPeftModelForSequenceClassification as AutoPeftModelForSequenceClassification
    from .task_models import AutoPeftModelForTokenClassification as AutoPeftModelForTokenClassification
    from .task_models import PeftModelForCausalLM as PeftModelForCausalLM
    from .task_models import PeftModelForFeatureExtraction as PeftModelForFeatureExtraction
    from .task_models import PeftModelForQuestionAnswering as PeftModelForQuestionAnswering
    from .task_models import PeftModelForSeq2SeqLM as PeftModelForSeq2SeqLM
    from .task_models import PeftModelForSequenceClassification as PeftModelForSequenceClassification
    from .task_models import PeftModelForTokenClassification as PeftModelForTokenClassification

#: The core's public names → the module that defines them (methods' classes come from the registry).
_CORE: dict[str, str] = {
    "AdapterConfig": "config",
    "NoMatchingPeftModuleError": "config",
    "PeftConfig": "config",
    "PeftError": "config",
    "PeftWarning": "config",
    "TaskType": "config",
    "get_base_model_state_dict": "functional",
    "get_peft_model_state_dict": "functional",
    "inject_adapter_in_model": "functional",
    "set_base_model_state_dict": "functional",
    "set_peft_model_state_dict": "functional",
    "load_peft_weights": "model_io",
    "PeftModel": "model",
    "get_peft_model": "model",
    "PeftMixedModel": "mixed_model",
    "AutoPeftModel": "task_models",
    "AutoPeftModelForCausalLM": "task_models",
    "AutoPeftModelForFeatureExtraction": "task_models",
    "AutoPeftModelForQuestionAnswering": "task_models",
    "AutoPeftModelForSeq2SeqLM": "task_models",
    "AutoPeftModelForSequenceClassification": "task_models",
    "AutoPeftModelForTokenClassification": "task_models",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING": "task_models",
    "PeftModelForCausalLM": "task_models",
    "PeftModelForFeatureExtraction": "task_models",
    "PeftModelForQuestionAnswering": "task_models",
    "PeftModelForSeq2SeqLM": "task_models",
    "PeftModelForSequenceClassification": "task_models",
    "PeftModelForTokenClassification": "task_models",
    "LoftQConfig": "methods.lora",  # LoRA's option classes and data initialisers, at the top as in PEFT
    "EvaConfig": "methods.lora",
    "CordaConfig": "methods.lora",
    "KasaConfig": "methods.lora",
    "BdLoraConfig": "methods.lora",
    "get_eva_state_dict": "methods._lora_eva",
    "initialize_lora_eva_weights": "methods._lora_eva",
    "preprocess_corda": "methods._lora_corda",
    "MethodSpec": "registry",
    "available_methods": "registry",
    "get_method": "registry",
    "register_method": "registry",
    "spec_for": "registry",
    "prepare_model_for_kbit_training": "helpers",
    "cast_mixed_precision_params": "helpers",
    "PeftType": "peft_types",
    "PEFT_TYPE_TO_CONFIG_MAPPING": "peft_types",
    "get_peft_config": "peft_types",
    "get_layer_status": "status",
    "get_model_status": "status",
}


def method_exports() -> dict[str, str]:
    """Class name → method name for the config class of every registered method, and for its tuner class
    when it has one (``"LoraConfig": "lora"``, ``"LoraModel": "lora"``); imports no torch."""
    registry = importlib.import_module(f"{__name__}.registry")
    names: dict[str, str] = {}
    for method in registry.registered_names():
        spec = registry.get_method(method)
        names.setdefault(spec.config_cls.__name__, method)
        if spec.tuner is not None:
            names.setdefault(spec.tuner.rpartition(":")[2], method)
    return names


def _all_names() -> list[str]:
    return sorted({*_CORE, *method_exports(), "__version__", "methods"})


def __getattr__(name: str) -> Any:
    if name == "__all__":
        return _all_names()
    if name.isidentifier() and not name[0].isupper() and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f"{__name__}.{name}")  # a submodule (``from . import registry``)
    if name in _CORE:
        value = getattr(importlib.import_module(f"{__name__}.{_CORE[name]}"), name)
    else:
        method = method_exports().get(name)
        if method is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        spec = importlib.import_module(f"{__name__}.registry").get_method(method)
        value = spec.config_cls if spec.config_cls.__name__ == name else spec.tuner_cls
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_all_names()})
