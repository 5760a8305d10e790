"""LoRA's data-driven initialisers, EVA (``initialize_lora_eva_weights``, ``get_eva_state_dict``) and CorDA
(``preprocess_corda``): the same tensors, ranks and configs as ``peft`` on the same model and data, saved
adapters loading in both libraries, the files CorDA caches read by either library, and the refusals.

EVA's streaming SVD runs ``torch.svd_lowrank`` on tiny matrices many times; with several threads on a busy
machine each call waits for the others, so this module runs torch on one thread (both libraries alike).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_KINDS, logits, make_mlp, max_abs_diff
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune import CordaConfig, EvaConfig, LoraConfig, get_peft_model

peft = pytest.importorskip("peft")
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda  # noqa: E402

TOL = 1e-6
#: Plain tensors in, no language-model masks.
PLAIN = {
    "forward_fn": lambda model, x: model(x),
    "prepare_model_inputs_fn": None,
    "prepare_layer_inputs_fn": None,
    "show_progress_bar": False,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _mlp_batches(rows: int = 64, n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(rows, 16, generator=gen) for _ in range(n)]


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def _lm_batches() -> list[dict[str, torch.Tensor]]:
    """Token batches with padding (attention mask) and ignored labels (-100)."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(3):
        ids = torch.randint(0, 64, (4, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        labels = ids.clone()
        labels[1, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _eva_config(lib: Any, targets: list[str], **eva: Any) -> Any:
    options = lib.EvaConfig(**{"tau": 0.9, **eva})
    return lib.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva", eva_config=options
    )


def _eva_pair(
    build: Any, targets: list[str], batches: list[Any], kwargs: dict[str, Any], **eva: Any
) -> list[tuple[dict[str, torch.Tensor], nn.Module]]:
    """[(EVA state dict, initialised model)] for deltatune and peft, same base, data and seeds."""
    out = []
    for lib in (deltatune, peft):
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(build(), _eva_config(lib, targets, **eva))
        state = lib.get_eva_state_dict(model, batches, **kwargs)
        lib.initialize_lora_eva_weights(model, eva_state_dict={k: v.clone() for k, v in state.items()})
        out.append((state, model))
    return out


def _assert_same_states(ours: nn.Module, theirs: nn.Module) -> None:
    mine, other = ours.state_dict(), theirs.state_dict()
    assert sorted(mine) == sorted(other)
    for key, value in mine.items():
        assert max_abs_diff(value, other[key]) <= TOL, key


def _assert_same_eva_config(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = ours.peft_config["default"], theirs.peft_config["default"]
    assert (a.rank_pattern, a.alpha_pattern) == (b.rank_pattern, b.alpha_pattern)
    assert sorted(a.target_modules) == sorted(b.target_modules)


# ---- EVA ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_eva() -> list[tuple[dict[str, torch.Tensor], nn.Module]]:
    """q/k/v share their input (one SVD), and ranks move between layers."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    return _eva_pair(_llama, targets, _lm_batches(), {"show_progress_bar": False})


def test_eva_on_a_language_model_matches_peft(llama_eva: Any) -> None:
    (ours, ours_model), (theirs, theirs_model) = llama_eva
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert value.shape == theirs[key].shape and max_abs_diff(value, theirs[key]) <= TOL, key
    by_leaf = {key.rsplit(".", 1)[-1]: value for key, value in ours.items()}
    ranks = {leaf: value.shape[0] for leaf, value in by_leaf.items()}
    for shared in ("k_proj", "v_proj"):  # one SVD for the three; q_proj holds it and gets the most components
        assert ranks["q_proj"] >= ranks[shared]
        assert torch.equal(by_leaf[shared], by_leaf["q_proj"][: ranks[shared]])
    assert sum(ranks.values()) == 4 * 5 and set(ranks.values()) != {4}  # the budget, redistributed
    _assert_same_states(ours_model, theirs_model)
    _assert_same_eva_config(ours_model, theirs_model)
    x = _lm_batches()[0]["input_ids"]
    with ours_model.disable_adapter():  # B = 0: the output is the base model's
        expected = logits(ours_model, x)
    assert max_abs_diff(logits(ours_model, x), expected) == 0


@pytest.mark.parametrize("whiten", [False, True])
def test_eva_on_plain_inputs_matches_peft(whiten: bool) -> None:
    (ours, ours_model), (theirs, theirs_model) = _eva_pair(
        make_mlp, ["fc1", "fc2"], _mlp_batches(), PLAIN, whiten=whiten
    )
    for key, value in ours.items():
        assert max_abs_diff(value, theirs[key]) <= TOL, key
    _assert_same_states(ours_model, theirs_model)
    _assert_same_eva_config(ours_model, theirs_model)


def test_eva_whitens_layers_sharing_an_input_once() -> None:
    """Deliberate difference: q/k/v share one SVD, and each is whitened once (rows of norm S^-1/2); peft 0.21
    whitens the shared components in place once per layer, so all three end at S^-3/2."""
    (ours, _), (theirs, _) = _eva_pair(
        _llama, ["q_proj", "k_proj", "v_proj"], _lm_batches(), {"show_progress_bar": False}, whiten=True
    )
    for key, value in ours.items():
        norms = value.norm(dim=1)
        assert max_abs_diff(theirs[key].norm(dim=1), norms**3) <= 1e-4 * float(norms.max() ** 3), key


def test_eva_state_dict_of_a_plain_model(tmp_path: Path) -> None:
    """On a model not yet wrapped, with the config: keys are the module names; deltatune also loads them into
    the wrapped model (peft 0.21 matches only prefixed keys and falls back to the default init)."""
    states = [
        lib.get_eva_state_dict(
            make_mlp(), _mlp_batches(), peft_config=_eva_config(lib, ["fc1", "fc2"]), **PLAIN
        )
        for lib in (deltatune, peft)
    ]
    assert states[0].keys() == states[1].keys() == {"fc1", "fc2"}
    for key, value in states[0].items():
        assert max_abs_diff(value, states[1][key]) <= TOL
    model = get_peft_model(make_mlp(), _eva_config(deltatune, ["fc1", "fc2"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deltatune.initialize_lora_eva_weights(model, eva_state_dict=states[0])
    layer = model.base_model.model.fc1
    assert torch.equal(layer.lora_A["default"].weight, states[0]["fc1"].float())


def test_eva_given_state_dict_removes_rank_zero_layers_and_rescales_alpha_like_peft(tmp_path: Path) -> None:
    state = {"base_model.model.fc1": torch.zeros(0, 16), "base_model.model.fc2": torch.randn(6, 32)}
    models = []
    for lib in (deltatune, peft):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(make_mlp(), _eva_config(lib, ["fc1", "fc2"]))
        lib.initialize_lora_eva_weights(model, eva_state_dict=dict(state))
        models.append(model)
    ours, theirs = models
    assert type(ours.base_model.model.fc1) is nn.Linear
    config = ours.peft_config["default"]
    assert (config.target_modules, config.rank_pattern, config.alpha_pattern) == (
        ["fc2"],
        {"fc2": 6},
        {"fc2": 12},
    )
    _assert_same_states(ours, theirs)
    _assert_same_eva_config(ours, theirs)
    x = torch.randn(3, 16)
    ours.save_pretrained(tmp_path)
    for loader in (deltatune, peft):
        loaded = loader.PeftModel.from_pretrained(make_mlp(), tmp_path)
        assert max_abs_diff(logits(loaded, x), logits(ours, x)) <= TOL


def test_eva_without_data_is_peft_placeholder() -> None:
    """get_peft_model alone: A as created (same draws as peft), B = 0; the warnings peft gives."""
    models = []
    for lib in (deltatune, peft):
        with pytest.warns(UserWarning, match="`eva_config` is not specified. Using default EVA config"):
            config = lib.LoraConfig(r=4, target_modules=["fc1", "fc2"], init_lora_weights="eva")
        torch.manual_seed(2)
        with pytest.warns(
            UserWarning, match="lora with eva initialization used with low_cpu_mem_usage=False"
        ):
            models.append(lib.get_peft_model(make_mlp(), config))
    _assert_same_states(*models)
    assert not models[0].base_model.model.fc1.lora_B["default"].weight.any()


def test_eva_with_low_cpu_mem_usage_materialises_the_adapter() -> None:
    config = _eva_config(deltatune, ["fc1", "fc2"])
    model = get_peft_model(make_mlp(), config, low_cpu_mem_usage=True)
    assert model.base_model.model.fc1.lora_A["default"].weight.is_meta
    deltatune.initialize_lora_eva_weights(model, _mlp_batches(), **PLAIN)
    assert not any(p.is_meta for p in model.parameters())
    reference = get_peft_model(make_mlp(), _eva_config(deltatune, ["fc1", "fc2"]))
    deltatune.initialize_lora_eva_weights(reference, _mlp_batches(), **PLAIN)
    for name in ("fc1", "fc2"):
        a = model.base_model.model.get_submodule(name).lora_A["default"].weight
        assert torch.equal(a, reference.base_model.model.get_submodule(name).lora_A["default"].weight)
        assert a.requires_grad


@pytest.mark.parametrize("saver", ["deltatune", "peft"])
def test_eva_adapters_cross_load(saver: str, llama_eva: Any, tmp_path: Path) -> None:
    model = llama_eva[0 if saver == "deltatune" else 1][1]
    x = _lm_batches()[1]["input_ids"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["tau"] == 0.9
    for loader in (deltatune, peft):
        loaded = loader.PeftModel.from_pretrained(_llama(), tmp_path)
        assert max_abs_diff(logits(loaded, x), expected) <= 1e-5, loader.__name__


def test_eva_per_layer_input_functions_and_whitening_once() -> None:
    seen: list[str] = []

    def rows(layer_input: Any, model_input: Any, name: str) -> torch.Tensor:
        seen.append(name)
        return layer_input[0]

    config = _eva_config(deltatune, ["fc1", "fc2"], whiten=True)
    model = get_peft_model(make_mlp(), config)
    kwargs = {**PLAIN, "prepare_layer_inputs_fn": {"base_model.model.fc1": rows}}
    state = deltatune.get_eva_state_dict(model, _mlp_batches(), **kwargs)
    assert set(seen) == {"base_model.model.fc1"}
    plain = deltatune.get_eva_state_dict(model, _mlp_batches(), **{**PLAIN, "prepare_layer_inputs_fn": None})
    assert max_abs_diff(state["base_model.model.fc1"], plain["base_model.model.fc1"]) == 0
    with pytest.raises(ValueError, match="were not found in the model: \\['nope'\\]"):
        deltatune.get_eva_state_dict(
            model, _mlp_batches(), **{**PLAIN, "prepare_layer_inputs_fn": {"nope": rows}}
        )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: EvaConfig(rho=0.5), "`rho` must be >= 1.0"),
        (lambda: EvaConfig(tau=1.1), "`tau` must be between 0.0 and 1.0"),
        (lambda: LoraConfig(init_lora_weights="eva", eva_config=3), "`EvaConfig` must be a `EvaConfig`"),
        (lambda: deltatune.initialize_lora_eva_weights(make_mlp(), []), "model must be a PeftModel"),
        (
            lambda: deltatune.initialize_lora_eva_weights(
                get_peft_model(make_mlp(), LoraConfig(target_modules=["fc1"]))
            ),
            "can only be used with `init_lora_weights='eva'`",
        ),
        (
            lambda: deltatune.initialize_lora_eva_weights(
                get_peft_model(make_mlp(), _eva_config(deltatune, ["fc1"]))
            ),
            "dataloader is required",
        ),
        (lambda: deltatune.get_eva_state_dict(make_mlp(), []), "peft_config is required"),
        (  # peft 0.21 cycles the data forever here
            lambda: deltatune.get_eva_state_dict(
                make_mlp(), _mlp_batches(rows=4), peft_config=_eva_config(deltatune, ["fc1"]), **PLAIN
            ),
            "no batch gave fc1 at least 8 rows",
        ),
        (
            lambda: deltatune.get_eva_state_dict(
                make_mlp(),
                _mlp_batches(),
                peft_config=_eva_config(deltatune, ["fc1"]),
                **{**PLAIN, "forward_fn": lambda model, x: None},
            ),
            "forward_fn never ran the targeted layers \\['fc1'\\]",
        ),
        (
            lambda: deltatune.get_eva_state_dict(make_mlp(), [], peft_config=_eva_config(deltatune, ["fc1"])),
            "dataloader is empty",
        ),
    ],
)
def test_eva_refusals(call: Any, message: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, TypeError), match=message):
            call()


def test_eva_and_corda_configs_round_trip_through_peft(tmp_path: Path) -> None:
    config = LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=1.5, whiten=True))
    config.save_pretrained(tmp_path / "eva")
    loaded = peft.PeftConfig.from_pretrained(tmp_path / "eva")
    assert (loaded.eva_config.rho, loaded.eva_config.whiten) == (1.5, True)
    assert deltatune.PeftConfig.from_pretrained(tmp_path / "eva").eva_config == config.eva_config
    corda = LoraConfig(
        init_lora_weights="corda", corda_config={"corda_method": "kpm", "cache_file": tmp_path / "c"}
    )
    assert corda.corda_config == CordaConfig(corda_method="kpm", cache_file=tmp_path / "c")
    corda.save_pretrained(tmp_path / "corda")
    assert peft.PeftConfig.from_pretrained(tmp_path / "corda").corda_config.cache_file == str(tmp_path / "c")
    with pytest.warns(UserWarning, match="`corda_config` specified but will be ignored"):
        LoraConfig(corda_config=CordaConfig())
    with pytest.raises(ValueError, match="corda_method='svd' is not valid; choose 'ipm' or 'kpm'"):
        CordaConfig(corda_method="svd")


# ---- CorDA ----------------------------------------------------------------------------------------
def _corda_model(lib: Any, kind: str, method: str, **options: Any) -> nn.Module:
    """A ``kind`` model preprocessed and wrapped by ``lib`` (3-D inputs in batches of one, which peft's hook
    needs; deltatune takes any batch)."""
    model_kind = MODEL_KINDS[kind]
    model = model_kind.build(0)
    cls = CordaConfig if lib is deltatune else PeftCordaConfig
    config = lib.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=model_kind.targets,
        init_lora_weights="corda",
        corda_config=cls(corda_method=method, **options),
        fan_in_fan_out=kind == "gpt2",
    )
    batches = [model_kind.inputs(seed) for seed in range(6)]
    batches = [x[:1] if x.ndim > 2 else x for x in batches]
    preprocess = deltatune.preprocess_corda if lib is deltatune else peft_preprocess_corda
    preprocess(model, config, run_model=lambda: [model(x) for x in batches])
    return lib.get_peft_model(model, config)


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(method: str, kind: str) -> None:
    ours, theirs = (_corda_model(lib, kind, method) for lib in (deltatune, peft))
    _assert_same_states(ours, theirs)
    x = MODEL_KINDS[kind].inputs()
    base = MODEL_KINDS[kind].build(0)
    assert max_abs_diff(logits(ours, x), logits(base, x)) <= 1e-5  # W_res + s·B A = W
    layer = ours.base_model.model.get_submodule(MODEL_KINDS[kind].targets[0])
    assert not hasattr(layer.base_layer, "eigens") and not hasattr(layer.base_layer, "covariance_matrix")


def test_corda_files_are_shared_with_peft(tmp_path: Path) -> None:
    """Either library's cache and covariance files feed the other's preprocessing (loaded weights_only)."""
    files = {"cache_file": str(tmp_path / "a" / "cache.pt"), "covariance_file": str(tmp_path / "cov.pt")}
    reference = _corda_model(deltatune, "mlp", "ipm", **files)
    for lib, cls, preprocess in (
        (deltatune, CordaConfig, deltatune.preprocess_corda),
        (peft, PeftCordaConfig, peft_preprocess_corda),
    ):
        for name in ("cache_file", "covariance_file"):
            model = make_mlp()
            config = lib.LoraConfig(
                r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights="corda",
                corda_config=cls(corda_method="ipm", **{name: files[name]}),
            )  # fmt: skip
            preprocess(model, config)  # no run_model: the file is enough
            _assert_same_states(lib.get_peft_model(model, config), reference)


def test_corda_temporary_fields_and_hooked_model() -> None:
    model, hooked = make_mlp(), make_mlp()
    config = LoraConfig(
        r=4,
        target_modules=["fc1"],
        init_lora_weights="corda",
        corda_config=CordaConfig(prune_temporary_fields=False),
    )
    x = torch.rand(32, 16)
    deltatune.preprocess_corda(model, config, run_model=lambda: [hooked(x), hooked(x)], hooked_model=hooked)
    layer = model.fc1
    assert (layer.sample_count, layer.corda_method, layer.rank) == (2, "ipm", 4)
    expected = (x / x.max()).T @ (x / x.max())
    assert max_abs_diff(layer.covariance_matrix, expected) <= 1e-4
    assert not hooked.fc1._forward_hooks


@pytest.mark.parametrize("saver", ["deltatune", "peft"])
def test_corda_adapters_cross_load(saver: str, tmp_path: Path) -> None:
    """Saved as is: loads on a base preprocessed from the same cache; converted to plain LoRA
    (``path_initial_model_for_weight_conversion``): loads on the plain base."""
    cache = str(tmp_path / "cache.pt")
    lib = deltatune if saver == "deltatune" else peft
    model = _corda_model(lib, "mlp", "ipm", cache_file=cache)
    config = model.peft_config["default"]
    config.init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    config.init_lora_weights = "corda"
    with torch.no_grad():
        model.base_model.model.fc1.lora_B["default"].weight.mul_(2.0)
    x = MODEL_KINDS["mlp"].inputs()
    expected = logits(model, x)
    model.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    for loader, cls, preprocess in (
        (deltatune, CordaConfig, deltatune.preprocess_corda),
        (peft, PeftCordaConfig, peft_preprocess_corda),
    ):
        base = make_mlp()
        options = cls(corda_method="ipm", cache_file=cache)
        preprocess(
            base,
            loader.LoraConfig(
                r=4, target_modules=["fc1", "fc2"], init_lora_weights="corda", corda_config=options
            ),
        )
        loaded = loader.PeftModel.from_pretrained(base, tmp_path / "out")
        assert max_abs_diff(logits(loaded, x), expected) <= 1e-5, loader.__name__
        converted = loader.PeftModel.from_pretrained(make_mlp(), tmp_path / "plain")
        assert max_abs_diff(logits(converted, x), expected) <= 1e-5, loader.__name__


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: get_peft_model(make_mlp(), LoraConfig(target_modules=["fc1"], init_lora_weights="corda")),
            "`eigens` attribute not found for layer, please run `preprocess_corda` first",
        ),
        (
            lambda: deltatune.preprocess_corda(
                make_mlp(), LoraConfig(target_modules=["fc1"], init_lora_weights="corda")
            ),
            "run_model must be specified",
        ),
        (
            lambda: deltatune.preprocess_corda(
                make_mlp(),
                LoraConfig(target_modules=["fc1"], corda_config=CordaConfig(corda_method=None)),
                run_model=lambda: None,
            ),
            "corda_method is required",
        ),
        (
            lambda: deltatune.preprocess_corda(
                make_mlp(),
                LoraConfig(target_modules=["fc1"], init_lora_weights="corda"),
                run_model=lambda: None,
            ),
            "never ran the targeted layers \\['fc1'\\]",
        ),
    ],
)
def test_corda_refusals(call: Any, message: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=message):
            call()


def test_corda_next_to_another_adapter_warns() -> None:
    model = _corda_model(deltatune, "mlp", "ipm")
    with pytest.warns(UserWarning, match="CorDA changes the base weights"):
        model.add_adapter("other", LoraConfig(r=2, target_modules=["fc1"]))
