"""Measure how much of PEFT's own custom-model test suite passes with deltatune behind PEFT's public names.

Usage::

    python scripts/peft_parity.py /path/to/peft/tests [--workdir DIR] [-k EXPR] [--json OUT] [pytest args...]

The folder must hold PEFT's ``test_custom_models.py`` with its ``testing_common.py``, ``testing_utils.py`` and
``conftest.py`` (e.g. ``git show HEAD:tests/<file>`` from a clone of huggingface/peft). Nothing of PEFT is
copied into this repository: the files are copied into a scratch folder next to a generated stand-in ``peft``
package, and pytest runs there.

The stand-in ``peft`` package:

- maps PEFT's **public** names (``from peft import LoraConfig, get_peft_model, ...``) to deltatune's;
- turns the configs of methods deltatune does not have (IA3, VeRA, ...) into inert placeholders: every case
  that involves one is *out of scope* (deselected when its parameters name one, else recorded when touched);
- answers every import from PEFT's **internals** (``peft.tuners.*``, ``peft.utils.*``, private modules) with
  placeholders that record their use and raise when used: a failing case that used one *depends on
  internals*;
- supplies the test harness's own helpers with plain values (``infer_device() -> "cpu"``,
  ``peft.import_utils.is_*_available() -> False``, ``is_transformers_ge_v5`` from the installed transformers);
  these test nothing of the library;
- a public name deltatune lacks becomes a placeholder that raises ``NotImplementedError`` when called (a
  genuine failure of the public API, counted as such).

Each case ends in one of: ``passed``, ``failed`` (public API only), ``internal`` (failed after touching a
PEFT internal), ``skipped``, or ``out_of_scope`` (touched another method). The summary is printed and, with
``--json``, written as JSON with the failing case ids.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PEFT_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py", "conftest.py")

#: The methods deltatune implements, by the config class names PEFT uses for them.
OWN_CONFIGS = ("LoraConfig", "LoHaConfig", "LoKrConfig", "AdaLoraConfig")

_MARKERS = '''
"""Bookkeeping shared by the stand-in peft package and the pytest plugin."""
import sys

CURRENT = {"test": None}
INTERNAL_USED: dict = {}
OTHER_METHOD_USED: dict = {}


def _note(table, what):
    test = CURRENT["test"]
    if test is not None:
        table.setdefault(test, set()).add(what)


class PeftInternalUsed(NotImplementedError):
    """A case used something of PEFT that is not its public API."""


class _InternalMeta(type):
    def _touch(cls):
        _note(INTERNAL_USED, cls.__qualname__)
        raise PeftInternalUsed(f"peft internal {cls.__qualname__} used")

    def __instancecheck__(cls, obj):
        cls._touch()

    def __subclasscheck__(cls, sub):
        cls._touch()

    def __call__(cls, *args, **kwargs):
        cls._touch()

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return internal(f"{cls.__qualname__}.{name}")

    def __iter__(cls):
        cls._touch()

    def __getitem__(cls, key):
        cls._touch()

    def __contains__(cls, key):
        cls._touch()


def internal(name):
    """A placeholder class for PEFT internal ``name`` (classes may subclass it at import time)."""
    return _InternalMeta(name, (), {"__qualname__": name})


class OtherMethodConfig:
    """Placeholder for the config of a method deltatune does not implement."""

    _name = "other"

    def __init__(self, *args, **kwargs):
        _note(OTHER_METHOD_USED, self._name)
        self.args, self.kwargs = args, kwargs

    def __getattr__(self, name):
        _note(OTHER_METHOD_USED, self._name)
        raise AttributeError(f"{self._name} is not implemented by deltatune ({name})")


def other_method(name):
    cls = type(name, (OtherMethodConfig,), {"_name": name})
    return cls


def missing_public(name):
    def missing(*args, **kwargs):
        raise NotImplementedError(f"deltatune has no public {name}")

    missing.__name__ = name
    return missing
'''

_PEFT_INIT = '''
"""Stand-in for peft: its public names point at deltatune (see scripts/peft_parity.py)."""
import deltatune as _dt
import _parity_markers as _m

__version__ = "0.21.2"
_PUBLIC = {n: getattr(_dt, n) for n in dir(_dt) if not n.startswith("_")}
_OWN = __OWN__
_HARNESS_ONLY = {"PromptLearningConfig"}


def __getattr__(name):
    if name in _PUBLIC:
        return _PUBLIC[name]
    if name in _HARNESS_ONLY:  # an isinstance() target: nothing here is prompt learning
        value = _m.other_method(name)
    elif name.endswith("Config") or name.endswith("Sampler"):
        value = _m.other_method(name)
    else:
        value = _m.missing_public(name)
    globals()[name] = value
    return value
'''


_FINDER = '''
"""Imports of peft.<anything> resolve to internal stand-ins (sys.meta_path finder)."""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

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
'''

_PLUGIN = '''
"""pytest plugin: deselects cases of other methods, classifies every outcome, writes the summary."""
import json
import os

import pytest

import _parity_finder  # noqa: F401  (installs the import hook)
import _parity_markers as _m

RESULTS = {}


def _names_other_method(value, depth=0):
    if depth > 3:
        return False
    if isinstance(value, type) and issubclass(value, _m.OtherMethodConfig):
        return True
    if isinstance(value, _m.OtherMethodConfig):
        return True
    if isinstance(value, (list, tuple, set)):
        return any(_names_other_method(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_names_other_method(v, depth + 1) for v in value.values())
    return False


#: LoRA options deltatune does not implement (its LoraConfig rejects them with a clear ValueError).
UNSUPPORTED_OPTIONS = {
    "target_parameters", "trainable_token_indices", "use_qalora", "layer_replication", "alora_invocation_tokens",
    "kasa_config", "arrow_config", "velora_config", "monteclora_config", "use_bdlora", "megatron_config",
    "eva_config", "corda_config", "lora_ga_config", "loftq_config",
}
UNSUPPORTED_INITS = {"mica", "pissa", "olora", "eva", "corda", "loftq", "orthogonal", "lora_ga"}


def _uses_unsupported_option(value, depth=0):
    if depth > 3:
        return False
    if isinstance(value, dict):
        if any(k in UNSUPPORTED_OPTIONS and v not in (None, False, {}, []) for k, v in value.items()):
            return True
        init = value.get("init_lora_weights")
        if isinstance(init, str) and init.split("_niter")[0] in UNSUPPORTED_INITS:
            return True
        return any(_uses_unsupported_option(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_uses_unsupported_option(v, depth + 1) for v in value)
    return False


def pytest_collection_modifyitems(config, items):
    keep, other, unsupported = [], [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(_names_other_method(v) for v in params.values()):
            other.append(item)
        elif any(_uses_unsupported_option(v) for v in params.values()):
            unsupported.append(item)
        else:
            keep.append(item)
    config.hook.pytest_deselected(items=other + unsupported)
    items[:] = keep
    RESULTS["__deselected_other_methods__"] = len(other)
    RESULTS["__deselected_unsupported_options__"] = len(unsupported)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _m.CURRENT["test"] = item.nodeid
    yield
    _m.CURRENT["test"] = None


#: Attributes of PEFT's layer and config classes that are implementation details (not its public API).
PRIVATE_ATTRIBUTES = ("adapter_layer_names", "_restore_weights", "_register_custom_module", "_active_adapter")


def _private_attribute(excinfo):
    text = str(excinfo.value)
    return excinfo.typename == "AttributeError" and any(f"attribute '{a}'" in text for a in PRIVATE_ATTRIBUTES)


def _needs_network(excinfo):
    text = f"{excinfo.typename} {excinfo.value}"
    return any(s in text for s in ("HF_HUB_OFFLINE", "offline mode", "LocalEntryNotFound", "huggingface.co"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    nodeid = item.nodeid
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        if nodeid in _m.OTHER_METHOD_USED:
            status = "out_of_scope"
        elif rep.skipped:
            status = "skipped"
        elif rep.passed:
            status = "passed"
        elif call.excinfo is not None and _needs_network(call.excinfo):
            status = "needs_network"
        elif nodeid in _m.INTERNAL_USED or (call.excinfo is not None and _private_attribute(call.excinfo)):
            status = "internal"
        elif call.excinfo is not None and "is not supported by deltatune's" in str(call.excinfo.value):
            status = "unsupported_option"
        else:
            status = "failed"
        message = ""
        if rep.failed and call.excinfo is not None:
            message = f"{call.excinfo.typename}: {str(call.excinfo.value)[:300]}"
        RESULTS[nodeid] = {
            "status": status,
            "message": message,
            "internals": sorted(_m.INTERNAL_USED.get(nodeid, ())),
        }


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("PARITY_RESULTS")
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(RESULTS, fh, indent=1, sort_keys=True)
'''


_ORACLE_PLUGIN = '''
"""pytest plugin for the oracle run (the real peft): keep only the listed cases, record each outcome."""
import json
import os
import sys
import types

import pytest

sys.modules.setdefault("diffusers", types.SimpleNamespace(StableDiffusionPipeline=None))
KEEP = set(json.load(open(os.environ["PARITY_KEEP"], encoding="utf-8")))
RESULTS = {}


def pytest_collection_modifyitems(config, items):
    drop = [i for i in items if i.nodeid not in KEEP]
    config.hook.pytest_deselected(items=drop)
    items[:] = [i for i in items if i.nodeid in KEEP]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        RESULTS[item.nodeid] = {"status": "skipped" if rep.skipped else ("passed" if rep.passed else "failed")}


def pytest_sessionfinish(session, exitstatus):
    with open(os.environ["PARITY_RESULTS"], "w", encoding="utf-8") as fh:
        json.dump(RESULTS, fh, indent=1, sort_keys=True)
'''


def build_workdir(source: Path, workdir: Path) -> Path:
    """Copies PEFT's test files into ``workdir/tests`` and writes the stand-ins; returns the tests folder."""
    tests = workdir / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    (tests / "__init__.py").write_text("", encoding="utf-8")
    for name in PEFT_FILES:
        shutil.copy(source / name, tests / name)
    shim = workdir / "shim"
    (shim / "peft").mkdir(parents=True, exist_ok=True)
    (shim / "peft" / "__init__.py").write_text(
        textwrap.dedent(_PEFT_INIT).replace("__OWN__", repr(set(OWN_CONFIGS))), encoding="utf-8"
    )
    (shim / "_parity_markers.py").write_text(textwrap.dedent(_MARKERS), encoding="utf-8")
    (shim / "_parity_finder.py").write_text(textwrap.dedent(_FINDER), encoding="utf-8")
    (shim / "_parity_plugin.py").write_text(textwrap.dedent(_PLUGIN), encoding="utf-8")
    return tests


def summarise(results: dict[str, dict[str, str]]) -> dict[str, object]:
    """Counts per status, pass rate in scope, and the failing ids."""
    deselected = results.pop("__deselected_other_methods__", 0)
    unsupported = results.pop("__deselected_unsupported_options__", 0)
    counts: dict[str, int] = {}
    for entry in results.values():
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    public = counts.get("passed", 0) + counts.get("failed", 0)
    in_scope = public + counts.get("internal", 0)
    return {
        "counts": counts,
        "deselected_other_methods": deselected,
        "deselected_unsupported_lora_options": unsupported,
        "public_api_cases": public,
        "public_api_pass_rate": round(counts.get("passed", 0) / public, 4) if public else None,
        "in_scope_cases_incl_internal": in_scope,
        "failed": sorted(k for k, v in results.items() if v["status"] == "failed"),
        "internal": sorted(k for k, v in results.items() if v["status"] == "internal"),
    }


def run_oracle(deltatune_results: Path, workdir: Path, tests: Path, pytest_args: list[str]) -> int:
    """Runs the in-scope cases of a deltatune run with the real peft; prints how each status compares."""
    ours = json.loads(deltatune_results.read_text(encoding="utf-8"))
    ours = {k: v for k, v in ours.items() if isinstance(v, dict)}
    keep = [k for k, v in ours.items() if v["status"] in ("passed", "failed", "internal", "skipped")]
    oracle_dir = workdir / "oracle"
    oracle_dir.mkdir(exist_ok=True)
    (oracle_dir / "_parity_oracle.py").write_text(textwrap.dedent(_ORACLE_PLUGIN), encoding="utf-8")
    (workdir / "keep.json").write_text(json.dumps(keep), encoding="utf-8")
    results_path = workdir / "oracle_results.json"
    results_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(oracle_dir), PARITY_KEEP=str(workdir / "keep.json"), PARITY_RESULTS=str(results_path))
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [
        sys.executable, "-m", "pytest", str(tests / "test_custom_models.py"), "-p", "_parity_oracle", "-q",
        "-p", "no:cacheprovider", "--rootdir", str(workdir), "-o", "addopts=", "--tb=no", "-W", "ignore",
    ]  # fmt: skip
    subprocess.run(cmd + pytest_args, cwd=workdir, env=env, check=False)
    theirs = json.loads(results_path.read_text(encoding="utf-8"))
    table: dict[str, int] = {}
    for key in keep:
        pair = f"deltatune {ours[key]['status']} / peft {theirs.get(key, {}).get('status', 'not run')}"
        table[pair] = table.get(pair, 0) + 1
    print(json.dumps(dict(sorted(table.items())), indent=1))
    fails = sorted(k for k in keep if ours[k]["status"] == "failed" and theirs.get(k, {}).get("status") == "passed")
    (workdir / "fail_here_pass_in_peft.json").write_text(json.dumps(fails, indent=1), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peft_tests", type=Path, help="folder holding PEFT's test_custom_models.py and helpers")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-case results here")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument(
        "--oracle",
        type=Path,
        default=None,
        help="run the cases of this results JSON (a deltatune run) with the real peft instead, and compare",
    )
    args, pytest_args = parser.parse_known_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peft-parity-"))
    tests = build_workdir(args.peft_tests, workdir)
    if args.oracle is not None:
        return run_oracle(args.oracle, workdir, tests, pytest_args)
    results_path = workdir / "results.json"
    results_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(workdir / "shim"), env.get("PYTHONPATH", "")])
    env["PARITY_RESULTS"] = str(results_path)
    env["HF_HUB_OFFLINE"] = "1"  # cases that download a checkpoint fail at once instead of waiting on the network
    cmd = [
        sys.executable, "-m", "pytest", str(tests / "test_custom_models.py"), "-p", "_parity_plugin",
        "-q", "-p", "no:cacheprovider", "--rootdir", str(workdir), "-o", "addopts=", "--tb=no",
        "-W", "ignore",
    ]  # fmt: skip
    if args.k:
        cmd += ["-k", args.k]
    subprocess.run(cmd + pytest_args, cwd=workdir, env=env, check=False)
    if not results_path.is_file():
        print("no results were written (collection failed?)", file=sys.stderr)
        return 2
    results = json.loads(results_path.read_text(encoding="utf-8"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True), encoding="utf-8")
    summary = summarise(results)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("failed", "internal")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
