"""Stand-in for peft: its public names point at deltatune (see scripts/peft_parity.py)."""

import _parity_markers as _m

import deltatune as _dt

__version__ = "0.21.2"
_PUBLIC = {n: getattr(_dt, n) for n in dir(_dt) if not n.startswith("_")}
_HARNESS_ONLY = {"PromptLearningConfig"}


def __getattr__(name):
    if name in _PUBLIC:
        return _PUBLIC[name]
    if (
        name in _HARNESS_ONLY or name.endswith("Config") or name.endswith("Sampler")
    ):  # an isinstance() target: nothing here is prompt learning
        value = _m.other_method(name)
    else:
        value = _m.missing_public(name)
    globals()[name] = value
    return value
