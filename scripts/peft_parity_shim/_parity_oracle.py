"""pytest plugin for the oracle run (the real peft): keep only the listed cases, record each outcome."""

import json
import os
import sys
import types
from pathlib import Path

import _parity_markers as _m
import pytest
from _parity_classify import classify

sys.modules.setdefault("diffusers", types.SimpleNamespace(StableDiffusionPipeline=None, __version__="0.0.0"))
_m.install_network_guard()
KEEP = set(json.loads(Path(os.environ["PARITY_KEEP"]).read_text(encoding="utf-8")))


def _write(record):
    with open(os.environ["PARITY_RESULTS"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def pytest_collection_modifyitems(config, items):
    drop = [i for i in items if i.nodeid not in KEEP]
    config.hook.pytest_deselected(items=drop)
    items[:] = [i for i in items if i.nodeid in KEEP]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _m.CURRENT["test"] = item.nodeid
    yield
    _m.CURRENT["test"] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        typename, message = "", ""
        if rep.failed and call.excinfo is not None:
            typename, message = call.excinfo.typename, str(call.excinfo.value)[:600]
        status = classify(
            passed=rep.passed,
            skipped=rep.skipped,
            typename=typename,
            message=message,
            network=item.nodeid in _m.NETWORK_USED,
        )
        _write({item.nodeid: {"status": status, "message": f"{typename}: {message}" if typename else ""}})
