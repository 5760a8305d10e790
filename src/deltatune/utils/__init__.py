"""Helpers under PEFT's ``peft.utils`` paths, so code written for PEFT finds them where it looks:
:mod:`deltatune.utils.hotswap` (hot-swapping LoRA adapters, with and without ``torch.compile``)."""
