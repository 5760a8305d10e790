"""pytest plugin: deselects cases of other methods, classifies every outcome, writes the summary."""

import json
import os

import _parity_finder  # noqa: F401  (installs the import hook)
import _parity_markers as _m
import pytest

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
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "layer_replication",
    "alora_invocation_tokens",
    "kasa_config",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "use_bdlora",
    "megatron_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "loftq_config",
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
    return excinfo.typename == "AttributeError" and any(
        f"attribute '{a}'" in text for a in PRIVATE_ATTRIBUTES
    )


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
