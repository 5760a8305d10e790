"""deltatune: parameter-efficient fine-tuning (LoRA, LoHa, LoKr, AdaLoRA), drop-in for PEFT's API and
file format.

    from deltatune import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["query", "value"]))
"""

__version__ = "0.1.0"

from .config import AdapterConfig, PeftConfig, TaskType
from .methods import (
    AdaLoraConfig,
    AdaLoraModel,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
)
from .model import PeftModel, PeftModelForSequenceClassification, get_peft_model
from .registry import available_methods, get_method, register_method

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdapterConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForSequenceClassification",
    "TaskType",
    "__version__",
    "available_methods",
    "get_method",
    "get_peft_model",
    "register_method",
]
