"""Imports of peft.<anything> resolve to internal stand-ins (sys.meta_path finder)."""

import importlib.abc
import importlib.machinery
import importlib.util
import sys

import _parity_markers as _m


def _is_ge_v5():
    import transformers
    from packaging import version

    return version.parse(transformers.__version__) >= version.parse("5.0.0")


def _harness(fullname):
    if fullname == "peft.utils":
        return {"infer_device": lambda: "cpu"}
    if fullname == "peft.import_utils":
        return {"is_transformers_ge_v5": _is_ge_v5()}
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
                if name.startswith("__"):
                    raise AttributeError(name)
                if name in _h:
                    return _h[name]
                if name.endswith(("Config", "Sampler")):  # a variant's config: out of scope, like a method
                    value = _m.other_method(name)
                    setattr(_mod, name, value)
                    return value
                value = _m.internal(_mod.__name__ + "." + name)
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
