"""Name-only matching helpers of :mod:`deltatune.matching`: ``check_target_module_exists`` (does a config
target the module of this name?) and ``find_minimal_target_modules`` (condense a list of full names)."""

from __future__ import annotations

import pytest
from torch import nn

from deltatune import IA3Config, LoraConfig, get_peft_model
from deltatune.matching import check_target_module_exists, find_minimal_target_modules


@pytest.mark.parametrize(
    ("key", "targets", "layers", "pattern", "expected"),
    [
        ("foo", ["foo"], None, None, True),
        ("a.foo", ["foo"], None, None, True),
        ("a.xfoo", ["foo"], None, None, False),  # a list entry is a whole name or a ".entry" suffix
        ("foo", ["bar"], None, None, False),
        ("foobar", ".*oba.*", None, None, True),  # a string is a regex full match
        ("foobar", "oba", None, None, False),
        ("m.layers.1.q", ["q"], [1], "layers", True),
        ("m.layers.1.q", ["q"], [0, 2], "layers", False),
        ("m.layers.01.q", ["q"], 1, None, True),  # first numbered segment, as an int
        ("q", ["q"], [0], None, False),  # no layer index in the name
    ],
)
def test_check_target_module_exists(
    key: str, targets: list[str] | str, layers: list[int] | int | None, pattern: str | None, expected: bool
) -> None:
    config = LoraConfig(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    assert bool(check_target_module_exists(config, key)) is expected


def test_check_target_module_exists_returns_the_regex_match() -> None:
    found = check_target_module_exists(LoraConfig(target_modules=r".*\.(q|v)"), "layer.0.q")
    assert found is not None and not isinstance(found, bool) and found.group(1) == "q"
    assert check_target_module_exists(LoraConfig(target_modules=r".*\.(q|v)"), "layer.0.k") is None
    assert check_target_module_exists(LoraConfig(target_modules=["q"]), "layer.0.q") is True


def test_check_target_module_exists_honours_exclusions_and_modules_to_save() -> None:
    config = LoraConfig(target_modules=["q", "head"], exclude_modules=["0.q"], modules_to_save=["head"])
    assert check_target_module_exists(config, "layer.1.q") is True
    assert check_target_module_exists(config, "layer.0.q") is False
    assert check_target_module_exists(config, "head") is False
    assert (
        check_target_module_exists(IA3Config(target_modules=["q"], exclude_modules=".*1.*"), "l.1.q") is False
    )


def test_check_target_module_exists_cannot_tell_all_linear_from_a_name() -> None:
    assert check_target_module_exists(LoraConfig(target_modules="all-linear"), "layer.0.q") is False


def test_check_target_module_exists_names_a_bad_regex() -> None:
    with pytest.raises(ValueError, match=r"target_modules.*not a valid regular expression"):
        check_target_module_exists(LoraConfig(target_modules="(unclosed"), "q")


@pytest.mark.parametrize(
    ("targets", "others", "expected"),
    [
        (["bar"], [], {"bar"}),
        (["x.bar.baz"], ["foo.bar"], {"baz"}),
        (["1.foo", "2.foo"], ["3.foo"], {"1.foo", "2.foo"}),  # "foo" alone would also pick 3.foo
        (["a.b.c", "d.e.f"], ["a.b.x", "x.e.f"], {"c", "d.e.f"}),
        (
            [f"layers.{i}.attn.q_proj" for i in range(30)],
            [f"layers.{i}.attn.k_proj" for i in range(30)],
            {"q_proj"},
        ),
        # "proj" ends no other name as a whole component ("time_proj" is another component)
        (["a.proj", "b.time_emb_proj"], ["time_proj", "a"], {"proj", "time_emb_proj"}),
        (["0.q"], ["x.0.q"], {"0.q"}),  # no ending tells them apart: kept whole
    ],
)
def test_find_minimal_target_modules(targets: list[str], others: list[str], expected: set[str]) -> None:
    assert find_minimal_target_modules(targets, others) == expected
    assert find_minimal_target_modules(set(targets), set(others)) == expected


def test_find_minimal_target_modules_selects_exactly_the_targets() -> None:
    names = [f"blocks.{i}.{leaf}" for i in range(12) for leaf in ("attn.q", "attn.k", "mlp.fc1", "mlp.fc2")]
    targets = [
        n for n in names if n.endswith("attn.q") or (n.endswith("mlp.fc2") and not n.startswith("blocks.5."))
    ]
    others = [n for n in names if n not in targets]
    entries = find_minimal_target_modules(targets, others)
    config = LoraConfig(target_modules=sorted(entries))
    assert [n for n in names if check_target_module_exists(config, n)] == targets
    assert "q" in entries and len(entries) == 12  # "q", then one "<i>.mlp.fc2" per block but the fifth


@pytest.mark.parametrize(
    ("targets", "others", "message"),
    [
        ("foo", ["bar"], "target_modules should be a list or set of strings"),
        ([], ["bar"], "target_modules should be a list or set of strings"),
        (["", "foo"], ["bar"], "target_modules should not contain an empty string"),
        (["foo.bar", "spam"], ["foo.bar"], r"contain common elements \(foo.bar\)"),
    ],
)
def test_find_minimal_target_modules_refuses_bad_input(
    targets: object, others: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        find_minimal_target_modules(targets, others)  # type: ignore[arg-type]


def test_get_submodules_is_peft_s_get_submodules() -> None:
    from peft.utils.other import _get_submodules

    from deltatune.utils import get_submodules

    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU())
    for key in ("0", "0.0", "1"):
        ours, theirs = get_submodules(model, key), _get_submodules(model, key)
        assert ours[2] == theirs[2] and ours[0] is theirs[0] and ours[1] is theirs[1]
    parent, target, name = get_submodules(model, "0.0")
    setattr(parent, name, nn.Identity())
    assert isinstance(model[0][0], nn.Identity) and isinstance(target, nn.Linear)
    with pytest.raises(AttributeError):
        get_submodules(model, "0.7")


def test_adapter_layers_answer_to_peft_s_layer_names() -> None:
    from deltatune import get_peft_model
    from deltatune.layers import AdapterLayer

    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0"]))
    (layer,) = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert layer.adapter_layer_names == layer.adapter_param_names and "lora_A" in layer.adapter_layer_names
    assert layer._all_available_adapter_names() == ["default", "other"]
    model.delete_adapter("other")
    assert layer._all_available_adapter_names() == ["default"]
    assert list(layer.lora_dropout) == ["default"]  # nothing of the deleted adapter is left behind
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        assert "other" not in getattr(layer, attr)


def test_auxiliary_wrappers_name_their_adapters_as_peft_s() -> None:
    from deltatune.modules_to_save import AdapterLayerHolder, ModulesToSaveWrapper

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lin0, self.lin1 = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    config = LoraConfig(
        target_modules=["lin0"], modules_to_save=["lin1"], trainable_token_indices={"emb": [1]}
    )
    model = get_peft_model(Net(), config)
    model.add_adapter("other", config)
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper | AdapterLayerHolder)]
    assert len(wrappers) == 2 and all(w._adapters == {"default", "other"} for w in wrappers)
    model.delete_adapter("other")
    assert all(w._adapters == {"default"} and w.active_adapters == ["default"] for w in wrappers)
