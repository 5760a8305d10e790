"""Built-in adapter methods; importing this package registers them."""

from .adalora import AdaLoraConfig, AdaLoraModel, SVDLayer
from .loha import LoHaConfig, LoHaLayer
from .lokr import LoKrConfig, LoKrLayer
from .lora import LoraConfig, LoraLayer

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "LoHaConfig",
    "LoHaLayer",
    "LoKrConfig",
    "LoKrLayer",
    "LoraConfig",
    "LoraLayer",
    "SVDLayer",
]
