"""scripts/peft_parity.py's bookkeeping (not the run itself: that needs PEFT's test files and minutes):
how a case is classified, what the per-file table counts, how failures are grouped, and the placeholders
that stand in for what deltatune lacks."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path
from types import ModuleType

import pytest

SHIM = Path(__file__).resolve().parents[1] / "scripts" / "peft_parity_shim"


def _load(name: str) -> ModuleType:
    if str(SHIM) not in sys.path:  # parity_report imports _parity_classify as the script does
        sys.path.insert(0, str(SHIM))
    return importlib.import_module(name)


classify_mod = _load("_parity_classify")
markers = _load("_parity_markers")
report = _load("parity_report")
classify = classify_mod.classify


def test_classify_orders_the_outcomes():
    assert classify(passed=True, skipped=False, out_of_scope=True) == "out_of_scope"
    assert classify(passed=False, skipped=True) == "skipped"
    assert classify(passed=True, skipped=False, network=True, internal=True) == "passed"
    assert classify(passed=False, skipped=False, network=True, internal=True) == "needs_network"
    assert classify(passed=False, skipped=False, internal=True) == "internal"
    assert classify(passed=False, skipped=False, typename="ValueError", message="r must be > 0") == "failed"


def test_classify_reads_network_and_private_attributes_from_the_error():
    offline = "We couldn't connect to 'https://huggingface.co' to load the files"
    assert classify(passed=False, skipped=False, typename="OSError", message=offline) == "needs_network"
    assert classify(passed=False, skipped=False, typename="NetworkNeeded", message="x") == "needs_network"
    private = "'Linear' object has no attribute '_active_adapter'"
    assert classify(passed=False, skipped=False, typename="AttributeError", message=private) == "internal"
    module = "<module 'peft.config' (<_Loader>)> has no attribute '__version__'"
    assert classify(passed=False, skipped=False, typename="AttributeError", message=module) == "internal"
    constant = "unsupported operand type(s) for +: '_InternalMeta' and 'int'"
    assert classify(passed=False, skipped=False, typename="TypeError", message=constant) == "internal"
    other = "'Linear' object has no attribute 'weight_x'"
    assert classify(passed=False, skipped=False, typename="AttributeError", message=other) == "failed"


def _results() -> dict:
    lines = [
        {"__meta__": {"file": "tests/test_a.py", "deselected_other_methods": 5}},
        {"tests/test_a.py::T::test_x[1]": {"status": "passed"}},
        {"tests/test_a.py::T::test_x[2]": {"status": "failed", "message": "ValueError: bad 12 and 3"}},
        {
            "tests/test_a.py::test_y": {
                "status": "internal",
                "internals": ["peft.tuners.lora.layer.LoraLayer"],
            }
        },
        {"tests/test_a.py::test_net": {"status": "failed", "message": "AssertionError: assert 1 == 2"}},
        {"tests/test_b.py::test_z": {"status": "skipped"}},
        {"tests/test_b.py::test_w": {"status": "needs_network"}},
    ]
    return report.merge_lines([json.dumps(line) for line in lines])


def _peft() -> dict:
    return {
        "tests/test_a.py::T::test_x[1]": {"status": "passed"},
        "tests/test_a.py::T::test_x[2]": {"status": "passed"},
        "tests/test_a.py::test_y": {"status": "failed"},
        "tests/test_a.py::test_net": {"status": "needs_network"},
    }


def test_per_file_counts_scope_and_both_libraries():
    rows = report.per_file(_results(), _peft())
    a, b = rows["test_a.py"], rows["test_b.py"]
    # test_net failed here but needs the network in peft: left aside, not in scope
    assert (a["in_scope"], a["deltatune_passed"], a["peft_passed"], a["both_passed"]) == (3, 1, 2, 1)
    assert (a["failed"], a["internal"], a["needs_network"], a["out_of_scope"]) == (1, 1, 1, 5)
    assert (b["in_scope"], b["skipped"], b["needs_network"]) == (0, 1, 1)


def test_table_has_a_row_per_file_and_the_totals():
    table = report.table_markdown(report.per_file(_results(), _peft()))
    lines = table.splitlines()
    assert lines[2] == "| `test_a.py` | 3 | 1 | 2 | 1 (50%) | 1 | 1 | 1 | 5 | 0 |"
    assert lines[-1] == "| **all** | 3 | 1 | 2 | 1 (50%) | 1 | 1 | 2 | 5 | 1 |"
    without_oracle = report.table_markdown(report.per_file(_results()), oracle=False)
    assert "| `test_a.py` | 4 | 1 | not run | – |" in without_oracle


def test_cases_peft_did_not_run_are_named_in_the_row():
    theirs = {"tests/test_a.py::T::test_x[1]": {"status": "passed"}}
    table = report.table_markdown(report.per_file(_results(), theirs))
    assert "| `test_a.py` (peft did not run 3 of them) | 4 | 1 | 1 | 1 (100%) |" in table


def test_a_note_of_the_run_shows_in_its_row():
    results = report.merge_lines([json.dumps({"__meta__": {"file": "tests/test_c.py", "note": "timed out"}})])
    assert "| `test_c.py` (timed out) | 0 |" in report.table_markdown(report.per_file(results))


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (
            {
                "status": "failed",
                "message": "ValueError: eva_config is not supported by deltatune's LoraConfig; ...",
            },
            "unsupported LoraConfig option: eva_config",
        ),
        (
            {"status": "failed", "message": "NotImplementedError: deltatune has no public get_model_status"},
            "missing public name: get_model_status",
        ),
        (
            {"status": "failed", "message": "TypeError: x", "missing": ["EvaConfig"]},
            "LoRA feature missing: EvaConfig",
        ),
        (
            {
                "status": "failed",
                "message": "Failed: Regex pattern did not match.\n Regex: 'Oops'\n Input: 'x'",
            },
            "error message differs from PEFT's (expects 'Oops')",
        ),
        (
            {"status": "failed", "message": "Failed: DID NOT RAISE <class 'TypeError'>"},
            "DID NOT RAISE <class 'TypeError'> in test_a.py::T::test_x",
        ),
        (
            {"status": "failed", "message": "AssertionError: assert 1 == 2"},
            "assertion failed in test_a.py::T::test_x",
        ),
        ({"status": "failed", "message": "ValueError: bad 12 and 3\nmore"}, "ValueError: bad N and N"),
        ({"status": "internal", "internals": ["peft.utils.other.X"]}, "peft internal peft.utils.other.X"),
        (
            {
                "status": "failed",
                "message": "AttributeError: 'SmallModel' object has no attribute 'get_model_status'",
            },
            "AttributeError: no attribute 'get_model_status'",
        ),
        (
            {"status": "failed", "message": "ValueError: Expected a BaseException type, but got 'PeftError'"},
            "missing public name: PeftError",
        ),
        (
            {
                "status": "failed",
                "message": "ValueError: init_lora_weights='pissa_niter_4' is not one of ...",
            },
            "init_lora_weights=pissa refused",
        ),
    ],
)
def test_failure_reason_groups_by_the_missing_feature_or_error(entry, reason):
    assert report.failure_reason("tests/test_a.py::T::test_x[p1]", entry) == reason


def test_failure_groups_put_what_peft_passes_first_and_name_an_area():
    groups = report.failure_groups(_results(), _peft())
    assert [g["reason"] for g in groups] == [
        "ValueError: bad N and N",
        "peft internal peft.tuners.lora.layer.LoraLayer",
    ]
    assert groups[0]["peft_passes"] == 1 and groups[1]["area"] == "internals (not public API)"
    assert report.area_of("unsupported LoraConfig option: target_parameters") == "targets"
    assert report.area_of("missing public name: get_model_status") == "status-swap"
    assert report.area_of("LoRA feature missing: EvaConfig") == "init-data"
    assert report.area_of("DID NOT RAISE ValueError in test_x.py::test_adalora_bounds") == "behaviour / other"
    text = report.failures_markdown(groups, "t")
    assert "| 1 | ValueError: bad N and N | behaviour / other | 1 | 1 | test_a.py 1 |" in text
    assert "| behaviour / other | 1 | 1 |" in text and "| internals (not public API) | 1 | 0 |" in text


def test_report_reads_earlier_results_by_the_current_rules():
    module = "AttributeError: <module 'peft.config'> has no attribute '__version__'"
    offline = "OSError: We couldn't connect to 'https://huggingface.co' to load the files"
    results = {
        "a::x": {"status": "failed", "message": module},
        "a::y": {"status": "failed", "message": offline},
    }
    assert [v["status"] for v in report.cases(results).values()] == ["internal", "needs_network"]


def test_an_internal_module_attribute_groups_without_the_loader_address():
    message = (
        "AttributeError: <module 'peft.config' (<_Loader object at 0x7fba>)> has no attribute '__version__'"
    )
    reason = report.failure_reason("a::b", {"status": "internal", "message": message})
    assert reason == "peft internal: <module 'peft.config'> has no attribute '__version__'"


def test_load_reads_the_json_and_the_json_lines_forms(tmp_path):
    merged = _results()
    (tmp_path / "a.json").write_text(json.dumps(merged, indent=1), encoding="utf-8")
    assert report.load(tmp_path / "a.json") == merged
    (tmp_path / "b.jsonl").write_text('{"t::x": {"status": "passed"}}\n{"t::y": {"status": "failed"}}\n')
    assert set(report.cases(report.load(tmp_path / "b.jsonl"))) == {"t::x", "t::y"}


def test_placeholders_keep_lora_features_in_scope_and_other_methods_out():
    markers.CURRENT["test"] = "case"
    try:
        eva = markers.placeholder_for("EvaConfig")(rho=2)  # builds (PEFT's modules build some at import)
        with pytest.raises(NotImplementedError, match="deltatune has no public EvaConfig"):
            _ = eva.rho
        assert markers.MISSING_USED["case"] == {"EvaConfig"}
        psoft = markers.placeholder_for("PsoftConfig")
        with pytest.raises(AttributeError):
            _ = psoft.__dataclass_fields__  # dataclasses.fields() on the class marks the case too
        assert markers.OTHER_METHOD_USED["case"] == {"PsoftConfig"}
        vera = markers.placeholder_for("VeraConfig")()
        assert (
            isinstance(vera, markers.OtherMethodConfig) and "VeraConfig" in markers.OTHER_METHOD_USED["case"]
        )
        with pytest.raises(NotImplementedError, match="no public hotswap_adapter"):
            markers.placeholder_for("hotswap_adapter")()
    finally:
        markers.CURRENT["test"] = None


def test_network_guard_fails_fast_and_marks_the_case(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [("resolved", host)])
    markers.install_network_guard(hub=False)
    markers.CURRENT["test"] = "net-case"
    try:
        assert socket.getaddrinfo("localhost", 80) == [("resolved", "localhost")]
        with pytest.raises(markers.NetworkNeeded, match=r"huggingface\.co"):
            socket.getaddrinfo("huggingface.co", 443)
        assert not isinstance(markers.NetworkNeeded("x"), OSError)  # nothing retries it
        assert markers.NETWORK_USED["net-case"] == {"huggingface.co"}
    finally:
        markers.CURRENT["test"] = None


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent that is a module, not a package
        return False


@pytest.fixture
def finder() -> ModuleType:
    """_parity_finder, with the import hook it installs for ``peft.*`` taken out again (this process may use
    the real peft)."""
    before = list(sys.meta_path)
    module = _load("_parity_finder")
    sys.meta_path[:] = [f for f in sys.meta_path if f in before]
    return module


def test_every_counterpart_names_a_peft_internal_and_a_deltatune_object(finder):
    peft = pytest.importorskip("peft")
    for peft_name, target in finder.INTERNAL_COUNTERPARTS.items():
        parts = peft_name.split(".")
        cut = max(i for i in range(1, len(parts)) if _is_module(".".join(parts[:i])))
        module_name, names = ".".join(parts[:cut]), parts[cut:]
        assert module_name not in finder.PUBLIC_MODULES and names[0] not in peft.__all__, peft_name
        obj = importlib.import_module(module_name)
        for name in names:
            assert hasattr(obj, name), f"peft has no {peft_name}"
            obj = getattr(obj, name)
        value = finder.internal_counterpart(peft_name)
        assert value is not finder._MISSING, peft_name
        assert callable(value) or isinstance(value, type), (peft_name, target)
    for peft_module, deltatune_module in finder.MODULE_COUNTERPARTS.items():
        loader = finder._CounterpartLoader()
        spec = importlib.machinery.ModuleSpec(peft_module, loader)
        assert loader.create_module(spec) is importlib.import_module(deltatune_module)
    assert finder.internal_counterpart("peft.tuners.tuners_utils.onload_layer") is finder._MISSING
    base_tuner = markers.internal("peft.tuners.tuners_utils.BaseTuner")  # an internal class's attribute
    assert base_tuner.get_model_config is finder.internal_counterpart(
        "peft.tuners.tuners_utils.BaseTuner.get_model_config"
    )
    assert isinstance(base_tuner.inject_adapter, markers._InternalMeta)


def test_a_base_class_split_over_several_classes_checks_against_each(finder):
    import torch
    from torch import nn

    import deltatune

    lora_layer = finder.internal_counterpart("peft.tuners.lora.layer.LoraLayer")
    base_layer = finder.internal_counterpart("peft.tuners.tuners_utils.BaseTunerLayer")
    wrapper = finder.internal_counterpart("peft.utils.ModulesToSaveWrapper")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    config = deltatune.LoraConfig(target_modules=["0", "1"], modules_to_save=["2"])
    peft_model = deltatune.get_peft_model(model, config)
    inner = peft_model.base_model.model
    assert isinstance(inner[0], lora_layer) and isinstance(inner[1], lora_layer)  # Embedding and Linear kinds
    assert (
        isinstance(inner[0], base_layer)
        and isinstance(inner[2], wrapper)
        and not isinstance(inner[2], lora_layer)
    )
    assert issubclass(type(inner[0]), lora_layer) and not issubclass(nn.Linear, lora_layer)
    # PEFT's tests subclass LoraLayer: the subclass derives from the first class, deltatune's LoraLayerBase
    from deltatune.methods._lora_base import LoraLayerBase

    mock = type("MockLayer", (lora_layer,), {"lora_variants": property(lambda self: {("use_dora",): None})})
    layer = mock(base_layer=nn.Linear(4, 4))
    assert type(mock) is type and issubclass(mock, LoraLayerBase) and isinstance(layer, lora_layer)
    assert layer.resolve_lora_variant(config=deltatune.LoraConfig(use_dora=True)) is None
    with pytest.raises(markers.PeftInternalUsed):
        lora_layer()  # building the stand-in itself: no such single class here
    ia3 = deltatune.get_peft_model(nn.Sequential(nn.Linear(8, 8)), deltatune.IA3Config(target_modules=["0"]))
    assert isinstance(ia3.base_model.model[0], base_layer) and not isinstance(
        ia3.base_model.model[0], lora_layer
    )
