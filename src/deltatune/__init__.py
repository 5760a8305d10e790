"""deltatune: parameter-efficient fine-tuning (LoRA, LoHa, LoKr, AdaLoRA, DoRA), drop-in for PEFT's API and
file format.

    from deltatune import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["query", "value"]))
"""

from . import methods  # registers every built-in method (one module each)
from ._version import __version__
from .config import AdapterConfig, PeftConfig, PeftWarning, TaskType
from .functional import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .methods.adalora import AdaLoraConfig, AdaLoraModel
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import LoraConfig
from .model import PeftModel, PeftModelForSequenceClassification, get_peft_model
from .registry import MethodSpec, available_methods, get_method, register_method, spec_for

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdapterConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MethodSpec",
    "PeftConfig",
    "PeftModel",
    "PeftModelForSequenceClassification",
    "PeftWarning",
    "TaskType",
    "__version__",
    "available_methods",
    "get_base_model_state_dict",
    "get_method",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "methods",
    "register_method",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "spec_for",
]
