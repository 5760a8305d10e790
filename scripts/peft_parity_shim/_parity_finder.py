"""Imports of peft.<anything> resolve to internal stand-ins (sys.meta_path finder)."""

import importlib
import importlib.abc
import importlib.machinery
import json
import sys
from pathlib import Path

import _parity_markers as _m

#: peft's module names and its top-level public names, read from the installed peft's files (not imported)
#: by scripts/peft_parity.py into this JSON beside the stand-ins.
_FACTS = Path(__file__).with_name("_parity_peft.json")
_facts = json.loads(_FACTS.read_text(encoding="utf-8")) if _FACTS.is_file() else {}
PEFT_MODULES = set(_facts.get("modules", ()))
PEFT_PUBLIC = set(_facts.get("public", ()))


_MISSING = object()

#: PEFT's modules whose names are public API (documented imports), besides the top-level package: a name
#: of theirs that deltatune lacks is a missing public name, not an internal.
PUBLIC_MODULES = {
    "peft",
    "peft.optimizers",
    "peft.helpers",
    "peft.functional",
    "peft.utils.hotswap",
    "peft.tuners.lora.config",
    "peft.tuners.lora.corda",
    "peft.tuners.lora.eva",
}


def deltatune_public(name, module="peft"):
    """deltatune's object for ``module.name`` of peft, or ``_MISSING`` (imports only what is asked for).

    Looked up in deltatune's module of the same path (``peft.optimizers`` -> ``deltatune.optimizers``), then,
    for PEFT's public names and public modules, in deltatune's top level.
    """
    import deltatune

    if name.startswith("_"):
        return _MISSING
    if module != "peft":
        try:
            same = importlib.import_module("deltatune" + module[len("peft") :])
        except ImportError:
            same = None
        if same is not None and hasattr(same, name):
            return getattr(same, name)
    public = name in PEFT_PUBLIC or module in PUBLIC_MODULES or not PEFT_PUBLIC
    if public and name in dir(deltatune):
        return getattr(deltatune, name)
    return _MISSING


def _is_ge_v5():
    import transformers
    from packaging import version

    return version.parse(transformers.__version__) >= version.parse("5.0.0")


def _harness(fullname):
    """Plain values for the test harness's helpers (they test nothing of the library)."""
    if fullname == "peft.utils":
        return {"infer_device": lambda: "cpu", "INCLUDE_LINEAR_LAYERS_SHORTHAND": "all-linear"}
    if fullname == "peft.import_utils":
        return {"is_transformers_ge_v5": _is_ge_v5()}
    if fullname == "diffusers":  # not installed: its cases fail in both runs
        return {"__version__": "0.0.0"}
    return {}


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        harness = _harness(module.__name__)
        if module.__name__ == "peft.import_utils":

            def _getattr(name, _h=harness):
                if name in _h:
                    return _h[name]
                if name.startswith("is_") and name.endswith("_available"):
                    return lambda: False
                raise AttributeError(name)
        else:

            def _getattr(name, _h=harness, _mod=module):
                if name in _h:
                    return _h[name]
                if name.startswith("__"):
                    raise AttributeError(name)
                full = f"{_mod.__name__}.{name}"
                if full in PEFT_MODULES:  # a submodule (`from peft.tuners import lora`)
                    return importlib.import_module(full)
                value = deltatune_public(name, _mod.__name__)  # re-exported (peft.tuners.lora.LoraConfig)
                if value is _MISSING:
                    configish = name in _m.LORA_FEATURE_CONFIGS or name.endswith(("Config", "Sampler"))
                    public = configish or _mod.__name__ in PUBLIC_MODULES
                    value = _m.placeholder_for(name) if public else _m.internal(full)
                setattr(_mod, name, value)
                return value

        module.__getattr__ = _getattr
        module.__path__ = []


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("peft.") or fullname == "diffusers" or fullname.startswith("diffusers."):
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None


sys.meta_path.insert(0, _Finder())
