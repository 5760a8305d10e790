"""pytest plugin: deselects cases of other methods, classifies every outcome, appends it to PARITY_RESULTS."""

import json
import os

import _parity_finder  # installs the import hook (and deltatune_public below)
import _parity_markers as _m
import pytest
from _parity_classify import classify

_m.install_network_guard()


def _load_transformers_trainer_utils():
    """transformers.trainer_utils imports ``peft.PeftModel`` at import time, and deltatune imports trainer_utils
    (through TrainerCallback): with the stand-in, that is a cycle whichever is imported first. Load
    trainer_utils with peft hidden, then give it deltatune's classes."""
    import transformers.utils

    real = transformers.utils.is_peft_available
    transformers.utils.is_peft_available = lambda: False
    try:
        import transformers.trainer_callback
        import transformers.trainer_utils
    finally:
        transformers.utils.is_peft_available = real
    mixed = _parity_finder.deltatune_public("PeftMixedModel")
    transformers.trainer_utils.PeftModel = _parity_finder.deltatune_public("PeftModel")
    transformers.trainer_utils.PeftMixedModel = mixed if isinstance(mixed, type) else type("NoMixed", (), {})


_load_transformers_trainer_utils()


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


def _write(record):
    out = os.environ.get("PARITY_RESULTS")
    if out:  # one JSON object a line, written as each case ends: a run cut short keeps what it did
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


def pytest_collection_modifyitems(config, items):
    keep, other = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (other if any(_names_other_method(v) for v in params.values()) else keep).append(item)
    config.hook.pytest_deselected(items=other)
    items[:] = keep
    files = {item.nodeid.split("::")[0] for item in keep + other}
    for name in sorted(files):
        count = sum(1 for item in other if item.nodeid.split("::")[0] == name)
        _write({"__meta__": {"file": name, "deselected_other_methods": count}})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _m.CURRENT["test"] = item.nodeid
    yield
    _m.CURRENT["test"] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    nodeid = item.nodeid
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        typename, message = "", ""
        if rep.failed and call.excinfo is not None:
            typename, message = call.excinfo.typename, str(call.excinfo.value)[:600]
        status = classify(
            passed=rep.passed,
            skipped=rep.skipped,
            typename=typename,
            message=message,
            out_of_scope=nodeid in _m.OTHER_METHOD_USED,
            network=nodeid in _m.NETWORK_USED,
            internal=nodeid in _m.INTERNAL_USED,
        )
        _write(
            {
                nodeid: {
                    "status": status,
                    "message": f"{typename}: {message}" if typename else "",
                    "internals": sorted(_m.INTERNAL_USED.get(nodeid, ())),
                    "missing": sorted(_m.MISSING_USED.get(nodeid, ())),
                    "other_methods": sorted(_m.OTHER_METHOD_USED.get(nodeid, ())),
                }
            }
        )
