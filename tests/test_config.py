"""Adapter configs: dict/JSON round trips in PEFT's layout, ``peft_type`` dispatch, unknown keys and
validation errors that name the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from method_fixtures import example_kwargs

import deltatune
from deltatune import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from deltatune.config import TargetingConfig

NON_DEFAULT: dict[str, dict[str, Any]] = {
    "lora": {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.1,
        "bias": "lora_only",
        "use_rslora": True,
        "init_lora_weights": "gaussian",
        "target_modules": ["value", "query"],
        "exclude_modules": ["key"],
        "modules_to_save": ["classifier"],
        "layers_to_transform": [0, 2],
        "layers_pattern": "layers",
        "rank_pattern": {"query": 4},
        "alpha_pattern": {"value": 2.0},
        "task_type": "SEQ_CLS",
    },
    "loha": {
        "r": 4,
        "alpha": 2,
        "rank_dropout": 0.2,
        "module_dropout": 0.1,
        "use_effective_conv2d": True,
        "init_weights": False,
        "target_modules": r".*\.q_proj",
    },
    "lokr": {
        "r": 4,
        "decompose_both": True,
        "decompose_factor": 8,
        "rank_dropout_scale": True,
        "init_weights": "lycoris",
        "target_modules": ["q_proj"],
    },
    "adalora": {
        "init_r": 10,
        "target_r": 4,
        "tinit": 5,
        "tfinal": 7,
        "deltaT": 3,
        "beta1": 0.8,
        "beta2": 0.9,
        "orth_reg_weight": 0.1,
        "total_step": 100,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"vit.layers.0.attention.q_proj.lora_E": [True, False]},
    },
}


def config_for(method: str, **extra: Any) -> TargetingConfig:
    """A config of ``method`` with non-default values (a method not listed: r=4 if it has a rank, else
    targets and every bool field flipped)."""
    cls = deltatune.get_method(method).config_cls
    fallback: dict[str, Any] = {"target_modules": ["q_proj", "v_proj"]}
    if "r" in {f.name for f in dataclasses.fields(cls)}:
        fallback = {"r": 4}
    else:
        fallback.update(
            {f.name: not f.default for f in dataclasses.fields(cls) if isinstance(f.default, bool)}
        )
        fallback.pop("inference_mode", None)
    config = cls(**{**NON_DEFAULT.get(method, fallback), **extra})
    assert isinstance(config, TargetingConfig)
    return config


@pytest.mark.parametrize("method", deltatune.available_methods())
def test_dict_round_trip(method: str) -> None:
    config = config_for(method)
    data = config.to_dict()
    assert data["peft_type"] == deltatune.get_method(method).peft_type
    again = PeftConfig.from_dict(data)
    assert type(again) is type(config)
    assert again == config
    assert again.to_dict() == data
    # The concrete class loads its own dicts too.
    assert type(config).from_dict(data) == config


@pytest.mark.parametrize("method", deltatune.available_methods())
def test_json_layout(method: str, tmp_path: Path) -> None:
    config = config_for(method)
    assert config.inference_mode is False
    config.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    assert text == config.to_json_string()
    data = json.loads(text)
    assert list(data) == sorted(data)
    # PeftConfig.save_pretrained writes the config's own inference_mode (PeftModel.save_pretrained writes true).
    assert data["inference_mode"] is False
    assert isinstance(data["peft_version"], str) and data["peft_version"] == config.peft_version
    assert text == json.dumps(data, indent=2, sort_keys=True)
    # Sets are written as sorted lists.
    if isinstance(config.target_modules, set):
        assert data["target_modules"] == sorted(config.target_modules)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config)
    assert loaded.to_dict() == config.to_dict()
    # A version recorded by another writer is kept through a round trip (PEFT fills it only when None).
    data["peft_version"] = "0.21.2"
    assert PeftConfig.from_dict(data).peft_version == "0.21.2"


def test_target_modules_list_is_held_as_a_set() -> None:
    config = LoraConfig(target_modules=["value", "query", "query"])
    assert config.target_modules == {"query", "value"}
    assert config.to_dict()["target_modules"] == ["query", "value"]
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"


def test_unknown_keys_are_dropped_with_a_warning() -> None:
    data = LoraConfig(r=4, target_modules=["q"]).to_dict()
    data.update({"future_option": 1, "another_one": "x"})
    with pytest.warns(UserWarning) as record:
        config = PeftConfig.from_dict(data)
    assert isinstance(config, LoraConfig) and config.r == 4
    assert len(record) == 1  # one UserWarning, PEFT's
    assert str(record[0].message).startswith(
        "Unexpected keyword arguments ['another_one', 'future_option'] for class LoraConfig, these are ignored."
    )


@pytest.mark.parametrize(
    ("peft_type", "cls"),
    [
        ("LORA", LoraConfig),
        ("LOHA", LoHaConfig),
        ("LOKR", LoKrConfig),
        ("ADALORA", AdaLoraConfig),
        ("lora", LoraConfig),
    ],
)
def test_peft_type_dispatch(peft_type: str, cls: type) -> None:
    config = PeftConfig.from_dict({"peft_type": peft_type})
    assert type(config) is cls
    assert config.peft_type == cls.PEFT_TYPE


def test_peft_type_errors() -> None:
    with pytest.raises(ValueError, match=r"no 'peft_type'") as info:
        PeftConfig.from_dict({"r": 8})
    assert all(t in str(info.value) for t in ("LORA", "LOHA", "LOKR", "ADALORA"))
    with pytest.raises(ValueError, match=r"unsupported peft_type 'NO_SUCH_METHOD'.*LORA") as info:
        PeftConfig.from_dict({"peft_type": "NO_SUCH_METHOD"})
    assert "ADALORA" in str(info.value)
    with pytest.raises(ValueError, match="LoHaConfig"):
        LoHaConfig.from_dict({"peft_type": "LORA"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        PeftConfig.from_dict(["LORA"])  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="does not match LoraConfig"):  # PEFT overwrites it; we say so
        assert LoraConfig(peft_type="LOKR").peft_type == "LORA"


def test_invalid_json_file(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        PeftConfig.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda: LoraConfig(r=0), ["r=0", "positive integer"]),
        (lambda: LoHaConfig(r=-1), ["r=-1", "positive integer"]),
        (lambda: LoKrConfig(r=0), ["r=0", "positive integer"]),
        (lambda: AdaLoraConfig(init_r=0), ["init_r=0", "positive integer"]),
        (lambda: LoraConfig(init_lora_weights="pisa"), ["init_lora_weights='pisa'", "'gaussian'"]),
        (lambda: LoHaConfig(init_weights="lycoris"), ["init_weights='lycoris'", "LoHaConfig", "True, False"]),
        (lambda: LoKrConfig(init_weights="kaiming"), ["init_weights='kaiming'", "'lycoris'"]),
        (lambda: LoraConfig(lora_dropout=1.0), ["lora_dropout=1.0", "[0, 1)"]),
        (lambda: LoraConfig(lora_dropout=-0.1), ["lora_dropout=-0.1", "[0, 1)"]),
        (lambda: LoHaConfig(rank_dropout=1.5), ["rank_dropout=1.5", "[0, 1)"]),
        (lambda: LoKrConfig(module_dropout=-1), ["module_dropout=-1", "[0, 1)"]),
        (lambda: LoraConfig(lora_alpha=-2), ["lora_alpha=-2"]),
        (lambda: LoraConfig(use_qalora=True), ["use_qalora", "not supported", "supported options"]),
        (lambda: LoraConfig(task_type="IMAGE"), ["task_type='IMAGE'", "SEQ_CLS"]),
        (lambda: LoraConfig(target_modules=[1, 2]), ["target_modules", "list of strings"]),
        (lambda: LoraConfig(target_modules="x", layers_to_transform=[0]), ["layers_to_transform", "regex"]),
        (lambda: LoraConfig(layers_pattern="layers"), ["layers_pattern", "layers_to_transform"]),
        (lambda: LoraConfig(rank_pattern={"q": 0}), ["rank_pattern['q']=0", "positive integer"]),
        (lambda: AdaLoraConfig(init_r=4, target_r=8), ["target_r=8", "init_r=4"]),
        (lambda: AdaLoraConfig(tinit=10, tfinal=5, total_step=12), ["tinit=10", "total_step - tfinal"]),
        (lambda: AdaLoraConfig(beta1=1.0), ["beta1=1.0", "[0, 1)"]),
        (lambda: LoKrConfig(decompose_factor=0), ["decompose_factor", "positive integer"]),
    ],
)
def test_validation_errors(make: Any, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_adalora_total_step_may_be_left_unset() -> None:
    config = AdaLoraConfig(target_modules=["q"])
    assert config.total_step is None and config.rank_pattern is None
    assert json.loads(config.to_json_string())["rank_pattern"] is None
    with pytest.warns(UserWarning, match="ignores r=16"):
        AdaLoraConfig(r=16)


@pytest.mark.parametrize("method", deltatune.available_methods())
def test_defaults_and_keys_match_peft(method: str) -> None:
    peft = pytest.importorskip("peft")
    spec = deltatune.get_method(method)
    extra = {k: v for k, v in example_kwargs(spec.name).items() if k == "total_step"}  # peft requires it
    theirs_config = getattr(peft, spec.peft_config_name)(**spec.config_defaults, **extra)
    theirs = json.loads(json.dumps(theirs_config.to_dict(), default=sorted))
    ours = json.loads(spec.make_config(**extra).to_json_string())
    assert set(ours) == set(theirs)
    differing = {k for k in ours if ours[k] != theirs[k]}
    assert differing <= {"peft_version", "inference_mode"}, {k: (ours[k], theirs[k]) for k in differing}


def test_low_rank_options_keep_the_other_per_module_options_of_the_config() -> None:
    from deltatune.config import LowRankMixin, help_field

    @dataclasses.dataclass
    class _Tagged(TargetingConfig):
        def module_options(self, module_names: list[str]) -> dict[str, Any]:
            return {**super().module_options(module_names), "tag": module_names[0]}

    @dataclasses.dataclass
    class _LowRankTagged(LowRankMixin, _Tagged):
        alpha: float = help_field("Scale numerator.", 8.0)

    config = _LowRankTagged(r=4, rank_pattern={"^q$": 2}, target_modules=["q", "v"])
    assert config.module_options(["q"]) == {"tag": "q", "r": 2, "alpha": 8.0}
    assert config.module_options(["v"]) == {"tag": "v", "r": 4, "alpha": 8.0}
    lora = LoraConfig(r=4, lora_alpha=16, alpha_pattern={"^v$": 2.0}, target_modules=["q", "v"])
    assert lora.module_options(["v"]) == {"r": 4, "alpha": 2.0}


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_a_module_name_field_takes_a_string_or_strings(field: str) -> None:
    assert getattr(LoraConfig(**{field: ("a", "b")}), field) == {"a", "b"}
    with pytest.raises(ValueError, match=rf"^{field} must be a string or a list of strings, got \[3\]$"):
        LoraConfig(**{field: [3]})
    with pytest.raises(ValueError, match=rf"^{field} must be a string or a list of strings, got 3$"):
        LoraConfig(**{field: 3})


def test_a_wrong_typed_value_in_a_saved_config_is_named() -> None:
    """A value of the wrong type in adapter_config.json is refused naming its key and value (the dataclass's
    own TypeError names neither)."""
    with pytest.raises(ValueError, match=r"^invalid adapter config \(lora_alpha=\[1\]\): ") as err:
        PeftConfig.from_dict({"peft_type": "LORA", "r": 8, "lora_alpha": [1]})
    assert "r=8" not in str(err.value)  # only the culprit
