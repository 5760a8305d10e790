"""IA³: cross-loading with ``peft`` both ways (equal logits) on every layer type PEFT's IA³ adapts, with and
without feed-forward modules; merge, unmerge and unload; mixed batches; the config's checks and defaults; the
command line. The contract suite and the interop matrix run IA³ through the registry (with the
``EXAMPLE_KWARGS`` below); this file checks what is IA³'s own.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_KINDS, logits, max_abs_diff, read_adapter
from torch import nn

import deltatune
from deltatune import IA3Config, get_peft_model

peft = pytest.importorskip("peft")

#: Test settings the contract suite and the interop matrix take for IA³ (tests/method_fixtures.py): PEFT needs
#: ``feedforward_modules`` named on a model of unknown type.
EXAMPLE_KWARGS: dict[str, Any] = {"feedforward_modules": []}
TOL = 1e-5

# (model kind, feed-forward targets): every layer type PEFT's IA³ adapts, with input and output scaling.
CASES = [
    ("mlp", []),
    ("mlp", ["fc2"]),
    ("vit", ["v_proj"]),
    ("conv", []),
    ("conv", ["conv2"]),
    ("grouped", ["conv1"]),
    ("grouped", []),
    ("conv3d", ["conv2"]),
    ("gpt2", []),
    ("gpt2", ["c_proj"]),
]
IDS = [f"{kind}-ff{'-'.join(ff) or 'none'}" for kind, ff in CASES]


def _targets(kind: str) -> list[str]:
    return {"mlp": ["fc1", "fc2"], "conv": ["conv1", "conv2", "conv3"]}.get(kind, MODEL_KINDS[kind].targets)


def _peft(kind: str, ff: list[str], **kw: Any) -> Any:
    torch.manual_seed(5)
    config = peft.IA3Config(
        target_modules=_targets(kind), feedforward_modules=ff, init_ia3_weights=False, **kw
    )
    return peft.get_peft_model(MODEL_KINDS[kind].build(0), config).eval()


def _ours(kind: str, ff: list[str], **kw: Any) -> Any:
    torch.manual_seed(5)
    config = IA3Config(target_modules=_targets(kind), feedforward_modules=ff, init_ia3_weights=False, **kw)
    return get_peft_model(MODEL_KINDS[kind].build(0), config).eval()


@pytest.mark.parametrize(("kind", "ff"), CASES, ids=IDS)
def test_peft_adapter_loads_into_deltatune_with_equal_logits(
    kind: str, ff: list[str], tmp_path: Path
) -> None:
    x = MODEL_KINDS[kind].inputs()
    theirs = _peft(kind, ff)
    theirs.save_pretrained(tmp_path)
    ours = deltatune.PeftModel.from_pretrained(MODEL_KINDS[kind].build(0), tmp_path).eval()
    assert max_abs_diff(logits(ours, x), logits(theirs, x)) < TOL
    assert max_abs_diff(logits(ours, x), logits(MODEL_KINDS[kind].build(0), x)) > 1e-3  # the adapter acts


@pytest.mark.parametrize(("kind", "ff"), CASES, ids=IDS)
def test_deltatune_adapter_loads_into_peft_with_the_same_files(
    kind: str, ff: list[str], tmp_path: Path
) -> None:
    x = MODEL_KINDS[kind].inputs()
    ours = _ours(kind, ff)
    ours.save_pretrained(tmp_path / "ours")
    _peft(kind, ff).save_pretrained(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(MODEL_KINDS[kind].build(0), str(tmp_path / "ours")).eval()
    assert max_abs_diff(logits(theirs, x), logits(ours, x)) < TOL
    our_config, our_tensors = read_adapter(tmp_path / "ours")
    peft_config, peft_tensors = read_adapter(tmp_path / "peft")
    assert set(our_config) == set(peft_config)
    for key in ("peft_type", "fan_in_fan_out", "init_ia3_weights", "inference_mode"):
        assert our_config[key] == peft_config[key], key
    for key in ("target_modules", "feedforward_modules"):
        assert sorted(our_config[key]) == sorted(peft_config[key]), key
    assert {k: v.shape for k, v in our_tensors.items()} == {k: v.shape for k, v in peft_tensors.items()}
    assert all(k.endswith(".ia3_l") for k in our_tensors)


@pytest.mark.parametrize(("kind", "ff"), [("mlp", ["fc2"]), ("grouped", ["conv1"]), ("gpt2", ["c_proj"])])
def test_merge_unmerge_and_unload_as_peft(kind: str, ff: list[str]) -> None:
    x = MODEL_KINDS[kind].inputs()
    ours, theirs = _ours(kind, ff), _peft(kind, ff)
    theirs.load_state_dict(ours.state_dict())
    before = logits(ours, x)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.merge_adapter()
    theirs.merge_adapter()
    assert max_abs_diff(logits(ours, x), before) < TOL
    for name, param in ours.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, dict(theirs.named_parameters())[name], atol=1e-6, rtol=1e-6)
    with pytest.warns(UserWarning, match=r"Unmerge result can be inaccurate for \(IA\)\^3"):
        ours.unmerge_adapter()
    for name, param in ours.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-5, rtol=1e-5)
    unloaded = ours.merge_and_unload()
    assert max_abs_diff(logits(unloaded, x), before) < TOL
    assert not any(type(m).__module__.startswith("deltatune") for m in unloaded.modules())


def test_feedforward_vectors_scale_the_input_and_others_the_output() -> None:
    model = _ours("mlp", ["fc2"])
    fc1, fc2 = model.base_model.model.fc1, model.base_model.model.fc2
    assert (fc1.is_feedforward, fc2.is_feedforward) == (False, True)
    assert fc1.ia3_l["default"].shape == (32, 1) and fc2.ia3_l["default"].shape == (1, 32)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(fc2(x), fc2.base_layer(x * fc2.ia3_l["default"].reshape(-1)))
        torch.testing.assert_close(
            fc1(x[:, :16]), fc1.base_layer(x[:, :16]) * fc1.ia3_l["default"].reshape(-1)
        )


def test_mixed_batch_runs_each_row_through_its_own_adapter() -> None:
    x = MODEL_KINDS["mlp"].inputs()
    model = _ours("mlp", ["fc2"])
    torch.manual_seed(9)
    model.add_adapter(
        "other", IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"], init_ia3_weights=False)
    )
    model.eval()
    rows = ["default", "other", "__base__", "other", "default"]
    mixed = logits_with(model, x, rows)
    for name in ("default", "other"):
        model.set_adapter(name)
        alone = logits(model, x)
        picked = [i for i, n in enumerate(rows) if n == name]
        assert max_abs_diff(mixed[picked], alone[picked]) < TOL
    with model.disable_adapter():
        base = logits(model, x)
    assert max_abs_diff(mixed[[2]], base[[2]]) < TOL


def logits_with(model: Any, x: torch.Tensor, rows: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(x, adapter_names=rows)


def test_at_init_the_model_is_the_base() -> None:
    x = MODEL_KINDS["conv"].inputs()
    config = IA3Config(target_modules=["conv1", "conv2"], feedforward_modules=["conv2"])
    model = get_peft_model(MODEL_KINDS["conv"].build(0), config)
    assert max_abs_diff(logits(model, x), logits(MODEL_KINDS["conv"].build(0), x)) == 0.0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.model.conv1.ia3_l.default",
        "base_model.model.conv2.ia3_l.default",
    }


def test_vit_defaults_fill_targets_and_feedforward_modules(tmp_path: Path) -> None:
    """No target_modules: the ViT gets BERT's layout (key, value, output.dense), matched through the
    transformers 4.x names and saved under this model's own, so that peft loads the file."""
    x = MODEL_KINDS["vit"].inputs()
    model = get_peft_model(MODEL_KINDS["vit"].build(0), IA3Config(init_ia3_weights=False)).eval()
    config = model.peft_config["default"]
    assert config.target_modules == {"key", "value", "output.dense"} and config.feedforward_modules == {
        "output.dense"
    }
    layers = {n: m for n, m in model.named_modules() if isinstance(m, deltatune.get_method("ia3").layer_cls)}
    short = {n: ".".join(n.split(".")[-2:]) for n in layers}
    assert sorted(set(short.values())) == [
        "attention.k_proj",
        "attention.o_proj",
        "attention.v_proj",
        "mlp.fc2",
    ]
    assert len(layers) == 4 * MODEL_KINDS["vit"].build(0).config.num_hidden_layers
    assert {short[n] for n, m in layers.items() if m.is_feedforward} == {"attention.o_proj", "mlp.fc2"}
    model.save_pretrained(tmp_path)
    saved, _ = read_adapter(tmp_path)
    assert set(saved["feedforward_modules"]) <= set(saved["target_modules"])
    theirs = peft.PeftModel.from_pretrained(MODEL_KINDS["vit"].build(0), str(tmp_path)).eval()
    assert max_abs_diff(logits(theirs, x), logits(model, x)) < TOL


def test_regex_feedforward_modules_match_the_whole_name() -> None:
    config = IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=r".*fc2")
    assert config.module_options(["fc2"]) == {"is_feedforward": True}
    assert config.module_options(["fc1"]) == {"is_feedforward": False}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"target_modules": ["fc1"], "feedforward_modules": ["fc2"]},
            "`feedforward_modules` should be a subset of `target_modules`",
        ),
        (
            {"target_modules": ["fc1"], "init_ia3_weights": "yes"},
            "init_ia3_weights='yes' must be true or false",
        ),
        (
            {"target_modules": ["fc1"], "feedforward_modules": [3]},
            "feedforward_modules must be a string or a list of strings, got [3]",
        ),
    ],
)
def test_bad_configs_are_refused_naming_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        IA3Config(**kwargs)
    assert str(err.value) == message


def test_a_conv1d_is_refused_as_peft_does() -> None:
    with pytest.raises(ValueError, match="ia3 cannot adapt conv1 \\(Conv1d\\)"):
        get_peft_model(MODEL_KINDS["conv1d"].build(0), IA3Config(target_modules=["conv1"]))


def test_config_round_trips_and_is_a_peft_config(tmp_path: Path) -> None:
    config = IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "IA3" and "r" not in data and "layers_to_transform" not in data
    loaded = deltatune.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, IA3Config) and loaded.feedforward_modules == {"fc2"}
    assert isinstance(peft.PeftConfig.from_pretrained(str(tmp_path)), peft.IA3Config)


def test_ia3_needs_no_alpha_or_dropout_flag() -> None:
    from deltatune.cli.flags import adapter_flags

    flags = adapter_flags()
    assert flags["feedforward_modules"].methods == ["ia3"] and flags["init_ia3_weights"].help
    assert "ia3" in flags["fan_in_fan_out"].methods
    assert IA3Config.ALPHA_FIELD is None and IA3Config.DROPOUT_FIELD is None


def test_layer_without_the_adapter_skips_it() -> None:
    model = _ours("mlp", [])
    model.add_adapter("fc1_only", IA3Config(target_modules=["fc1"], feedforward_modules=[]))
    fc2 = model.base_model.model.fc2
    assert fc2.adapter_names == ["default"] and not fc2.holds("fc1_only")
    assert isinstance(fc2.base_layer, nn.Linear)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_training_step_issues_no_more_ops_than_peft(bf16: bool) -> None:
    """The op count of one AdamW step on the tiny ViT (``benchmarks.ops``'s measurement, as in
    test_op_counts.py): IA³ on key/value and the MLP's fc2 (feed-forward), against peft's."""
    import copy

    from benchmarks.ops import count_ops
    from benchmarks.workloads import Settings, Variant, build_base, make_inputs, train_step

    settings = Settings(model="tiny", batch=1, image_size=32, bf16=bf16, threads=1)
    base = build_base(settings)
    pixels, labels = make_inputs(settings)
    counts = {}
    for name, lib in (("peft", peft), ("deltatune", deltatune)):
        config = lib.IA3Config(
            target_modules=["k_proj", "v_proj", "fc2"],
            feedforward_modules=["fc2"],
            modules_to_save=["classifier"],
        )
        model = lib.get_peft_model(copy.deepcopy(base), config).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        variant = Variant(f"{name}/ia3", name, "ia3", model, optimizer)
        for _ in range(2):
            train_step(variant, pixels, labels, settings)
        counts[name] = count_ops(lambda v=variant: train_step(v, pixels, labels, settings), "cpu")
    assert counts["deltatune"]["ops"] <= counts["peft"]["ops"], counts
    assert counts["deltatune"]["copies"] <= counts["peft"]["copies"], counts


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_folded_feedforward_node_trains_as_peft_s_input_scaling(with_bias: bool) -> None:
    """On the CPU a feed-forward Linear with enough rows folds l into W's columns (one autograd node): output,
    x's gradient and l's gradient equal peft's ``(x ⊙ l) Wᵀ + b`` on a training step; with an entry of l at 0
    (l's gradient would divide by it) or fewer rows than W has, the generic path runs, equal too."""
    from deltatune.methods._ia3_fused import ia3_feedforward_linear

    base = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 10, bias=with_bias))
    config = dict(target_modules=["2"], feedforward_modules=["2"], init_ia3_weights=False)
    torch.manual_seed(3)
    ours = get_peft_model(copy.deepcopy(base), IA3Config(**config)).train()  # type: ignore[arg-type]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**config)).train()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    peft.set_peft_model_state_dict(theirs, deltatune.get_peft_model_state_dict(ours))
    layer = ours.base_model.model[2]
    for rows, zero in ((40, False), (40, True), (4, False)):
        if zero:
            for model in (ours, theirs):
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "ia3_l" in n)[0, 5] = 0.0
        x = torch.randn(rows, 12)
        folded = ia3_feedforward_linear(
            torch.randn(rows, 24), layer.base_layer.weight, layer.base_layer.bias, layer.ia3_l["default"]
        )
        assert (folded is not None) == (rows >= 10 and not zero)
        if folded is not None:
            assert "IA3FeedForwardLinear" in type(folded.grad_fn.next_functions[0][0]).__name__
        results = []
        for model in (ours, theirs):
            inputs = x.clone().requires_grad_()
            out = model(inputs)
            out.square().sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad()
            results.append((out, inputs.grad, sorted(grads.items())))
        torch.testing.assert_close(results[0][0], results[1][0])
        torch.testing.assert_close(results[0][1], results[1][1])
        assert [n for n, _ in results[0][2]] == [n for n, _ in results[1][2]] and results[0][2]
        for (name, got), (_, want) in zip(results[0][2], results[1][2], strict=True):
            torch.testing.assert_close(got, want, msg=name)
