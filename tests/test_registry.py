"""The one registry: methods are discovered without torch, the package's exports follow the registry, the
CLI's flag help is each config field's own help, and test fixtures live in the tests."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import deltatune
from deltatune import registry
from deltatune.cli.flags import adapter_flags


def _run(code: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(deltatune.__file__)), env.get("PYTHONPATH", "")]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_methods_and_their_config_fields_are_discoverable_without_torch() -> None:
    code = """
import dataclasses, sys
import deltatune, deltatune.registry, deltatune.cli
from deltatune.registry import available_methods, get_method, load_methods
load_methods()
fields = {}
for name in available_methods():
    spec = get_method(name)
    fields[name] = [(f.name, f.metadata.get("help", "")) for f in dataclasses.fields(spec.config_cls)]
    assert spec.display_name and spec.peft_type, name
from deltatune import LoraConfig
LoraConfig(r=4, target_modules=["q"]).to_json_string()
from deltatune.cli.flags import adapter_flags
adapter_flags()
print(len(fields), sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    count, loaded = _run(code).split(" ", 1)
    assert int(count) == len(registry.available_methods()) >= 5
    assert loaded == "[]"


def test_package_exports_are_the_core_names_plus_every_methods_classes() -> None:
    exported = set(deltatune.__all__)
    for name in registry.available_methods():
        spec = registry.get_method(name)
        assert spec.config_cls.__name__ in exported
        assert getattr(deltatune, spec.config_cls.__name__) is spec.config_cls
        if spec.tuner_cls is not None:
            assert getattr(deltatune, spec.tuner_cls.__name__) is spec.tuner_cls
    assert exported <= set(dir(deltatune))
    for name in ("LoraConfig", "get_peft_model", "PeftModel", "PeftConfig", "TaskType", "__version__"):
        assert name in exported
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchConfig'"):
        _ = deltatune.NoSuchConfig


def test_star_import_gives_every_export() -> None:
    namespace: dict[str, object] = {}
    exec("from deltatune import *", namespace)
    assert set(deltatune.__all__) <= set(namespace)


def test_every_spec_resolves_its_layers_and_tuner() -> None:
    for name in registry.available_methods():
        spec = registry.get_method(name)
        assert spec.layer_cls.__name__ == spec.layer.rpartition(":")[2]
        for kind in spec.layer_classes()[1:]:
            assert kind.supported_layers, (name, kind)
        assert spec.adapter_param_names(), name


def test_a_layer_path_that_is_not_module_colon_class_is_refused() -> None:
    spec = registry.get_method("lora")
    bad = dataclasses.replace(spec, name="lora_bad_path", layer="deltatune.methods._lora_layer.LoraLayer")
    with pytest.raises(ValueError, match=r"is not a 'package\.module:Class' path"):
        registry.register_method(bad)
    assert "lora_bad_path" not in registry.available_methods()


def test_flag_help_is_the_fields_own_help_in_whole_sentences() -> None:
    for name, flag in adapter_flags().items():
        owners = [registry.get_method(m).config_cls for m in flag.methods]
        helps = {
            f.metadata.get("help", "") for cls in owners for f in dataclasses.fields(cls) if f.name == name
        }
        assert flag.help in helps
        if not flag.help:
            continue  # PEFT's round-trip-only fields carry no help
        assert flag.help[0].isupper() and flag.help.endswith("."), (name, flag.help)
        assert not re.search(r"``|:mod:|:class:|:meth:", flag.help), (name, flag.help)


def test_documented_flags_cover_every_method_field_a_user_sets() -> None:
    flags = adapter_flags()
    for field_name in (
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "init_r",
        "alpha",
        "decompose_both",
    ):
        assert flags[field_name].help, field_name


def test_registry_holds_no_test_fixtures() -> None:
    names = {f.name for f in dataclasses.fields(registry.MethodSpec)}
    assert not names & {"example_kwargs", "nonzero_init"}


def test_a_single_regex_in_a_module_list_flag_becomes_the_string_form() -> None:
    import argparse

    from deltatune.cli.flags import adapter_kwargs_for

    namespace = argparse.Namespace(target_modules=["fc1", "fc2"], feedforward_modules=[r".*fc\d"])
    assert adapter_kwargs_for("ia3", namespace) == {
        "target_modules": ["fc1", "fc2"],
        "feedforward_modules": r".*fc\d",
    }


@pytest.mark.parametrize(
    ("flag", "lacks"), [("alpha", "has no scale numerator"), ("dropout", "has no dropout field")]
)
def test_alpha_and_dropout_flags_set_each_methods_own_field_or_are_refused(flag: str, lacks: str) -> None:
    import argparse

    from deltatune.cli.flags import adapter_kwargs_for

    namespace = argparse.Namespace(**{flag: 0.25})
    for method in registry.available_methods():
        config_cls = registry.get_method(method).config_cls
        field = config_cls.ALPHA_FIELD if flag == "alpha" else config_cls.DROPOUT_FIELD
        if field is None:
            with pytest.raises(ValueError, match=rf"^--{flag}: {method} {lacks}$"):
                adapter_kwargs_for(method, namespace)
            assert adapter_kwargs_for(method, namespace, strict=False) == {}
        else:
            assert adapter_kwargs_for(method, namespace) == {field: 0.25}
    assert adapter_kwargs_for("lora", argparse.Namespace()) == {}


def test_a_failed_method_import_leaves_the_registry_unloaded_and_names_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    package = tmp_path / "fake_methods_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import pkgutil\nfrom deltatune.registry import import_method_modules\n"
        "import_method_modules(__name__, pkgutil.iter_modules(__path__))\n"
    )
    (package / "a_good.py").write_text(
        "from deltatune.registry import MethodSpec, register_method\n"
        "class ToyConfig:\n    PEFT_TYPE = 'TOY'\n"
        "register_method(MethodSpec(name='toy', config_cls=ToyConfig, layer='toy_layers:ToyLayer', prefix='toy_'))\n"
    )
    (package / "b_bad.py").write_text("import deltatune_no_such_dependency\n")
    (package / "_private.py").write_text("raise RuntimeError('private modules are not imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setattr(registry, "BUILTIN_METHODS", "fake_methods_pkg")
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_METHODS", {})
    try:
        for _ in range(2):  # the failure is not remembered as "loaded": every lookup meets it again
            with pytest.raises(
                ImportError, match=r"^method module fake_methods_pkg\.b_bad failed to import: "
            ):
                registry.available_methods()
            assert registry._loaded is False
        with pytest.raises(ImportError) as failure:
            registry.get_method("toy")
        assert isinstance(failure.value.__cause__, ModuleNotFoundError)
        assert "deltatune_no_such_dependency" in str(failure.value)
        (package / "b_bad.py").unlink()
        importlib.invalidate_caches()
        assert registry.available_methods() == ["toy"]
        assert registry._loaded is True
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "fake_methods_pkg"]:
            del sys.modules[name]


def test_a_selector_must_accept_the_config_the_method_makes_even_without_config_defaults() -> None:
    spec = registry.get_method("dora")
    for defaults, made_from in (
        ({}, r"the config's defaults \(no config_defaults\)"),
        ({"use_dora": False}, "its config_defaults"),
    ):
        bad = dataclasses.replace(spec, name="dora_bad_selector", config_defaults=defaults)
        with pytest.raises(
            ValueError,
            match=rf"^'dora_bad_selector': {made_from} do not satisfy its own `selects` predicate$",
        ):
            registry.register_method(bad)
    assert "dora_bad_selector" not in registry.available_methods()


def test_the_type_checking_imports_are_the_core_names_and_the_registrys_exports() -> None:
    """``deltatune/__init__.py`` keeps two lists by hand, ``_CORE`` and the ``TYPE_CHECKING`` imports (for
    type checkers and editors): each name is imported there from the module that defines it."""
    import ast

    tree = ast.parse(Path(deltatune.__file__).read_text(encoding="utf-8"))
    block = next(
        node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    )
    imported: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.unparse(node)
        for alias in node.names:
            assert alias.asname == alias.name, ast.unparse(node)  # `import X as X`: a re-export
            imported[alias.name] = f"deltatune.{node.module}" if node.module else f"deltatune.{alias.name}"
    expected = {"methods": "deltatune.methods"}
    expected.update({name: f"deltatune.{module}" for name, module in deltatune._CORE.items()})
    for name, method in deltatune.method_exports().items():
        spec = registry.get_method(method)
        cls = spec.config_cls if spec.config_cls.__name__ == name else spec.tuner_cls
        expected[name] = cls.__module__
    assert imported == expected
    assert set(deltatune.__all__) == {*expected, "__version__"}
