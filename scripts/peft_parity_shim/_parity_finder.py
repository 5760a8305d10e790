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


#: PEFT's internal modules that a deltatune module stands for as a whole: the stand-in *is* deltatune's module,
#: so a case that replaces one of its names (``monkeypatch.setattr(peft.config, "__version__", ...)``) changes
#: what deltatune does. A name the deltatune module lacks is then a plain AttributeError, not an internal.
MODULE_COUNTERPARTS = {
    # __version__ and _get_commit_hash: the version a new config records as peft_version
    "peft.config": "deltatune.config",
}

#: PEFT's internal names (not its public API) whose job a deltatune object does: ``"module:qualname"`` of
#: deltatune, or a tuple of classes for a PEFT base class whose role deltatune splits over several classes
#: (an ``isinstance`` check against any of them; a case's own subclass derives from the first). A case that uses one is judged on deltatune's behaviour,
#: pass or fail, instead of being counted as internal; every other internal stays a raising placeholder.
#: Only names whose deltatune object does that job belong here (tests/test_peft_parity_script.py checks each
#: resolves).
INTERNAL_COUNTERPARTS = {
    # does PEFT's targeting config select the module of this name (exclusions, layers_to_transform)?
    "peft.tuners.tuners_utils.check_target_module_exists": "deltatune.matching:check_target_module_exists",
    # the fewest dotted suffixes that select these module names and no others
    "peft.tuners.tuners_utils._find_minimal_target_modules": "deltatune.matching:find_minimal_target_modules",
    # the base of every adapter layer that wraps a base layer
    "peft.tuners.tuners_utils.BaseTunerLayer": "deltatune.layers:AdapterLayer",
    # a LoRA layer of any kind (the base of Linear/Conv/Conv1D/MultiheadAttention and Embedding, with the variant
    # protocol lora_variants/resolve_lora_variant), or AdaLoRA's SVD layer
    "peft.tuners.lora.layer.LoraLayer": (
        "deltatune.methods._lora_base:LoraLayerBase",
        "deltatune.methods._adalora_layer:SVDLayer",
    ),
    # LoRA on a Linear or transformers Conv1D (deltatune's layer of that kind also takes ConvNd), DoRA/KaSA/aLoRA
    # layers included; built as PEFT's Linear(base_layer, adapter_name, config, r=..., lora_alpha=...)
    "peft.tuners.lora.layer.Linear": "deltatune.methods._lora_layer:LoraLayer",
    # the base model's config as a plain dict (an attribute of the internal class BaseTuner)
    "peft.tuners.tuners_utils.BaseTuner.get_model_config": "deltatune.tuner:AdapterModel.get_model_config",
    # the frozen original plus one trained copy per adapter of a modules_to_save module
    "peft.utils.other.ModulesToSaveWrapper": "deltatune.modules_to_save:ModulesToSaveWrapper",
    # the wrappers of modules trained beside the adapter: modules_to_save copies and trainable-token holders
    "peft.utils.other.AuxiliaryTrainingWrapper": (
        "deltatune.modules_to_save:ModulesToSaveWrapper",
        "deltatune.modules_to_save:AdapterLayerHolder",
    ),
    "peft.utils.other.TrainableTokensWrapper": "deltatune.methods._token_rows:TrainableTokensWrapper",
    # (parent, module, attribute name) of a dotted module name
    "peft.utils.other._get_submodules": "deltatune.utils:get_submodules",
    # the state-dict key prefixes of what the adapter method added, told by structure; and the filter by them
    "peft.tuners.tuners_utils._get_tuner_state_dict_key_prefixes": "deltatune.serialization:adapter_key_prefixes",
    "peft.tuners.tuners_utils._filter_state_dict_by_key_prefixes": (
        "deltatune.serialization:filter_state_dict_by_key_prefixes"
    ),
    # aLoRA's offsets per row from input_ids (the last invocation), and the forward/generate kwargs with them
    "peft.tuners.lora.variants.calculate_alora_offsets": "deltatune.methods.alora:calculate_alora_offsets",
    "peft.tuners.lora.variants.get_alora_offsets_for_forward": (
        "deltatune.methods.alora:get_alora_offsets_for_forward"
    ),
    "peft.tuners.lora.variants.get_alora_offsets_for_generate": (
        "deltatune.methods.alora:get_alora_offsets_for_generate"
    ),
}
# where PEFT re-exports them
INTERNAL_COUNTERPARTS["peft.tuners.lora.LoraLayer"] = INTERNAL_COUNTERPARTS[
    "peft.tuners.lora.layer.LoraLayer"
]
INTERNAL_COUNTERPARTS["peft.utils.ModulesToSaveWrapper"] = INTERNAL_COUNTERPARTS[
    "peft.utils.other.ModulesToSaveWrapper"
]
INTERNAL_COUNTERPARTS["peft.utils.AuxiliaryTrainingWrapper"] = INTERNAL_COUNTERPARTS[
    "peft.utils.other.AuxiliaryTrainingWrapper"
]
INTERNAL_COUNTERPARTS["peft.utils.TrainableTokensWrapper"] = INTERNAL_COUNTERPARTS[
    "peft.utils.other.TrainableTokensWrapper"
]
INTERNAL_COUNTERPARTS["peft.utils._get_submodules"] = INTERNAL_COUNTERPARTS[
    "peft.utils.other._get_submodules"
]


class _AnyOfMeta(type):
    """A stand-in for a PEFT base class that deltatune splits over several classes: good for ``isinstance``
    and ``issubclass``; building one is PEFT internal use (no such class here); a case's subclass of it is a
    subclass of deltatune's first class."""

    def __new__(mcs, name, bases, attrs):
        if any(isinstance(b, _AnyOfMeta) for b in bases):  # a case's subclass: of the first deltatune class
            real = tuple(b._classes[0] if isinstance(b, _AnyOfMeta) else b for b in bases)
            return type(real[0])(name, real, attrs)
        return super().__new__(mcs, name, bases, attrs)

    def __call__(cls, *args, **kwargs):
        _m._note(_m.INTERNAL_USED, cls._peft_name)
        raise _m.PeftInternalUsed(
            f"peft internal {cls._peft_name} built (deltatune has no single such class)"
        )

    def __instancecheck__(cls, obj):
        return isinstance(obj, cls._classes)

    def __subclasscheck__(cls, sub):
        return isinstance(sub, type) and issubclass(sub, cls._classes)


def _resolve(path):
    module, _, qualname = path.partition(":")
    value = importlib.import_module(module)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def internal_counterpart(fullname):
    """deltatune's object for PEFT internal ``fullname`` per INTERNAL_COUNTERPARTS, or ``_MISSING``."""
    target = INTERNAL_COUNTERPARTS.get(fullname)
    if target is None:
        return _MISSING
    if isinstance(target, str):
        return _resolve(target)
    classes = tuple(_resolve(path) for path in target)
    name = fullname.rpartition(".")[2]
    attrs = {"_classes": classes, "_peft_name": fullname, "__doc__": f"Any of {', '.join(target)}."}
    return _AnyOfMeta(name, (), attrs)


_m.COUNTERPART_OF = lambda fullname: None if (v := internal_counterpart(fullname)) is _MISSING else v


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
                value = internal_counterpart(full)
                if value is _MISSING:  # re-exported (peft.tuners.lora.LoraConfig)
                    value = deltatune_public(name, _mod.__name__)
                if value is _MISSING:
                    configish = name in _m.LORA_FEATURE_CONFIGS or name.endswith(("Config", "Sampler"))
                    public = configish or _mod.__name__ in PUBLIC_MODULES
                    value = _m.placeholder_for(name) if public else _m.internal(full)
                setattr(_mod, name, value)
                return value

        module.__getattr__ = _getattr
        module.__path__ = []


class _CounterpartLoader(importlib.abc.Loader):
    """Loads a PEFT module name as the deltatune module of MODULE_COUNTERPARTS (the same object)."""

    def create_module(self, spec):
        return importlib.import_module(MODULE_COUNTERPARTS[spec.name])

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname in MODULE_COUNTERPARTS:
            return importlib.machinery.ModuleSpec(fullname, _CounterpartLoader())
        if fullname in INTERNAL_COUNTERPARTS:  # an object, not a module (``patch("peft...Linear.attr")``)
            return None
        if fullname.startswith("peft.") or fullname == "diffusers" or fullname.startswith("diffusers."):
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None


sys.meta_path.insert(0, _Finder())
