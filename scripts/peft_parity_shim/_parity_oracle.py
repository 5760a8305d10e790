"""pytest plugin for the oracle run (the real peft): keep only the listed cases, record each outcome."""

import json
import os
import sys
import types
from pathlib import Path

import pytest

sys.modules.setdefault("diffusers", types.SimpleNamespace(StableDiffusionPipeline=None))
KEEP = set(json.loads(Path(os.environ["PARITY_KEEP"]).read_text(encoding="utf-8")))
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
        RESULTS[item.nodeid] = {
            "status": "skipped" if rep.skipped else ("passed" if rep.passed else "failed")
        }


def pytest_sessionfinish(session, exitstatus):
    with open(os.environ["PARITY_RESULTS"], "w", encoding="utf-8") as fh:
        json.dump(RESULTS, fh, indent=1, sort_keys=True)
