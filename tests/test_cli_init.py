"""The CLI's initialisers and LoRA+ (issue 17, item 7): ``--init_lora_weights`` with the values the library
accepts, ``--use_rslora``, ``--loraplus_lr_ratio``/``--loraplus_lr_embedding`` with PEFT's parameter groups
(:mod:`deltatune.optimizers`), their one-line refusals, the init reaching ``adapter_config.json``, the record
and the card, ``compare`` over initialisers, and the glue of the initialisers computed from data."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import save_tiny_vit_dir
from torch import nn

import deltatune
from deltatune.cli import main
from deltatune.cli.init_options import accepted_values, coming_values
from deltatune.cli.run_args import parse_run, run_spec
from deltatune.cli.run_options import build_help_parser
from deltatune.optimizers import create_loraplus_optimizer, loraplus_parameter_groups
from deltatune.tasks import data_init

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer as peft_loraplus  # noqa: E402

INIT = "init_lora_weights"
FAST = [
    "--max_steps", "2",
    "--per_device_train_batch_size", "4",
    "--logging_steps", "1",
    "--use_cpu",
    "--disable_tqdm", "true",
    "--seed", "0",
    "--validation_split", "0.25",
    "--r", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny ViT directory and an image folder of two classes (6 images each)."""
    root = tmp_path_factory.mktemp("cli_init")
    save_tiny_vit_dir(root / "model")
    rng = np.random.default_rng(0)
    for kind, shift in (("bright", 150), ("dark", 0)):
        (root / "data" / kind).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8) + shift
            Image.fromarray(pixels.astype(np.uint8)).save(root / "data" / kind / f"{i}.png")
    return {"root": str(root), "model": str(root / "model"), "data": str(root / "data")}


def _cli(assets: dict[str, str], command: str, out: str, *extra: str) -> int:
    argv = [command, "--model", assets["model"], "--dataset", assets["data"], "--output_dir", out]
    return main([*argv, *FAST, *extra])


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["train", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---- parsing and help ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "value"),
    [
        ("pissa", "pissa"),
        ("eva", "eva"),
        ("true", True),
        ("False", False),
        ("olora", "olora"),
    ],
)
def test_init_flag_values_parse(given: str, value: Any) -> None:
    parsed = parse_run("train", ["--init_lora_weights", given, "--use_rslora"])
    assert getattr(parsed.options, INIT) == value
    spec = run_spec(parsed, "lora")
    assert spec.adapter_kwargs[INIT] == value and spec.adapter_kwargs["use_rslora"] is True
    assert spec.optimizer == {}


def test_the_choices_are_what_the_library_accepts() -> None:
    lora = accepted_values("lora", INIT)
    assert {"gaussian", "true", "false", "pissa", "olora", "orthogonal", "loftq", "eva"} <= set(lora)
    assert accepted_values("dora", INIT) == lora
    assert set(accepted_values("adalora", INIT)) == {"gaussian", "true", "false"}
    assert accepted_values("loha", INIT) == ()
    assert coming_values(INIT) == ()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("corda", "CorDA rewrites the base weights from the training data"),
        ("pissa_niter_4", "randomized SVD"),
    ],
)
def test_inits_whose_adapter_would_not_reload_are_refused_with_the_reason(
    value: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run's adapter must reload to the run's numbers: CorDA's residual base needs the data, pissa_niter_N's a
    random SVD, so the command line refuses them (the library takes both)."""
    line = _error(capsys, "--init_lora_weights", value)
    assert f"'{value}' is not offered on the command line: " in line and reason in line
    assert "path_initial_model_for_weight_conversion" in line and "choose from gaussian" in line


def test_help_lists_the_choices_and_what_is_coming(capsys: pytest.CaptureFixture[str]) -> None:
    text = build_help_parser("train").format_help()
    assert "--init_lora_weights {gaussian,true,false,pissa,olora,orthogonal,loftq,eva}" in text
    assert "--loraplus_lr_ratio X" in text and "[lora, adalora, dora]" in " ".join(text.split())
    if coming_values(INIT):
        assert f"Coming (computed from training data): {', '.join(coming_values(INIT))}." in " ".join(
            text.split()
        )
    adalora = build_help_parser("train", "adalora").format_help()
    assert "--use_rslora" not in adalora  # AdaLoRA ignores it


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--init_lora_weights", "pisa"], "invalid choice: 'pisa'; choose from gaussian, true, false, pissa"),
        (["--init_lora_weights", "pissa_niter_x"], "invalid choice: 'pissa_niter_x'"),
        (
            ["--method", "adalora", "--init_lora_weights", "pissa"],
            "--init_lora_weights pissa is not available for adalora: it takes gaussian, true, false; pissa "
            "applies to lora, dora",
        ),
        (["--method", "adalora", "--use_rslora"], "--use_rslora does not apply to adalora: AdaLoRA scales"),
        (
            ["--method", "loha", "--init_lora_weights", "pissa"],
            "--init_lora_weights is an option of lora, adalora, dora",
        ),
        (
            ["--method", "ia3", "--loraplus_lr_ratio", "16"],
            "--loraplus_lr_ratio applies to lora, adalora, dora, not to ia3",
        ),
        (["--loraplus_lr_embedding", "1e-4"], "--loraplus_lr_embedding needs --loraplus_lr_ratio"),
        (["--loraplus_lr_ratio", "0"], "--loraplus_lr_ratio must be positive"),
    ],
)
def test_refusals_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    assert expected in _error(capsys, *argv)


@pytest.mark.parametrize("init", ["eva", "pissa"])
def test_an_initialised_run_evaluates_to_its_own_numbers(
    init: str, assets: dict[str, str], tmp_path: Path
) -> None:
    """One truth: the adapter of a run initialised from data (EVA) or from the base weights (PiSSA, whose
    residual base a reload recomputes) gives ``evaluate`` the run's own accuracy and confusion matrix."""
    out = tmp_path / "run"
    assert _cli(assets, "train", str(out), "--init_lora_weights", init) == 0
    assert json.loads((out / "adapter_config.json").read_text())[INIT] == init
    ran = json.loads((out / "eval_results.json").read_text())
    assert main(["evaluate", "--adapter", str(out), "--output_dir", str(tmp_path / "ev")]) == 0
    evaluated = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert evaluated["eval_accuracy"] == ran["eval_accuracy"]
    assert evaluated["confusion_matrix"] == ran["confusion_matrix"]


# ---- LoRA+'s parameter groups ----------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.lin(self.emb(x))))


def _groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[list[str], float, float]]:
    names = {id(p): n.removesuffix(".weight") if "magnitude" in n else n for n, p in model.named_parameters()}
    return [
        (sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
        for g in optimizer.param_groups
    ]


@pytest.mark.parametrize(
    "kwargs", [{}, {"use_dora": True}, {"bias": "all"}, {"lora_bias": True, "target_modules": ["lin"]}]
)
def test_loraplus_groups_equal_peft(kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    net = _Net()
    options = {"r": 4, "target_modules": ["emb", "lin"], "modules_to_save": ["head", "ln"], **kwargs}
    ours = deltatune.get_peft_model(copy.deepcopy(net), deltatune.LoraConfig(**options))
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(**options))
    settings = {
        "lr": 1e-3,
        "loraplus_lr_ratio": 16,
        "loraplus_weight_decay": 0.1,
        "loraplus_lr_embedding": 1e-5,
    }
    a = _groups(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **settings))
    b = _groups(theirs, peft_loraplus(theirs, torch.optim.AdamW, **settings))
    assert a == b
    assert [g[1] for g in a] == [1e-3, 1e-5, 16e-3, 16e-3] and a[0][0] and a[2][0]


def test_loraplus_groups_of_adalora_equal_peft() -> None:
    torch.manual_seed(0)
    net = _Net()
    options = {"init_r": 4, "target_r": 2, "target_modules": ["lin"], "total_step": 10}
    ours = deltatune.get_peft_model(copy.deepcopy(net), deltatune.AdaLoraConfig(**options))
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.AdaLoraConfig(**options))
    a = _groups(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4))
    b = _groups(theirs, peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4))
    assert a == b


def test_the_trainer_builds_the_loraplus_optimizer(tmp_path: Path) -> None:
    from deltatune.train import DeltaTrainer, TrainingArguments

    torch.manual_seed(0)
    model = deltatune.get_peft_model(_Net(), deltatune.LoraConfig(r=4, target_modules=["lin"]))
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=2e-3, weight_decay=0.05, use_cpu=True, report_to="none"
    )
    trainer = DeltaTrainer(model, args, loraplus_lr_ratio=8.0)
    optimizer = trainer.create_optimizer()
    expected = loraplus_parameter_groups(model, 2e-3, 8.0, loraplus_weight_decay=0.05)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == [
        (g["lr"], g["weight_decay"], len(g["params"])) for g in expected
    ]
    plain = DeltaTrainer(model, args).create_optimizer()
    assert {g["lr"] for g in plain.param_groups} == {2e-3}


# ---- end to end ---------------------------------------------------------------------------------------
def test_the_init_and_loraplus_reach_the_saved_files(assets: dict[str, str], tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    extra = ["--init_lora_weights", "olora", "--use_rslora", "--loraplus_lr_ratio", "4"]
    assert _cli(assets, "train", out, *extra) == 0
    config = json.loads(Path(out, "adapter_config.json").read_text())
    assert config[INIT] == "olora" and config["use_rslora"] is True  # one truth: what the run used
    record = json.loads(Path(out, "deltatune_run.json").read_text())
    assert record["adapter_kwargs"][INIT] == "olora"
    assert record["optimizer"] == {"loraplus_lr_ratio": 4.0}
    card = Path(out, "README.md").read_text()
    assert '"init_lora_weights": "olora"' in card and "| optimiser | loraplus\\_lr\\_ratio 4 |" in card


def test_compare_runs_each_initialiser(assets: dict[str, str], tmp_path: Path) -> None:
    out = str(tmp_path / "compare")
    extra = ["--methods", "lora", "--init_lora_weights", "gaussian", "olora", "--baselines"]
    assert _cli(assets, "compare", out, *extra) == 0
    rows = json.loads(Path(out, "compare.json").read_text())
    assert [r["name"] for r in rows] == ["lora init=gaussian", "lora init=olora"]
    saved = {
        name: json.loads(Path(out, name, "adapter_config.json").read_text())[INIT]
        for name in ("lora_init=gaussian", "lora_init=olora")
    }
    assert saved == {"lora_init=gaussian": "gaussian", "lora_init=olora": "olora"}
    assert "| lora init=olora |" in Path(out, "compare.md").read_text()


def test_compare_plans_variants_per_method() -> None:
    parsed = parse_run(
        "compare",
        [
            "--methods",
            "lora",
            "adalora",
            "loha",
            "--init_lora_weights",
            "true",
            "pissa",
            "--loraplus_lr_ratio",
            "1",
            "16",
        ],
    )
    from deltatune.cli.init_options import compare_variants

    labels = {
        m: [label for label, _, _ in compare_variants(m, parsed.options)] for m in ("lora", "adalora", "loha")
    }
    assert labels["lora"] == [
        "init=true loraplus=1",
        "init=true loraplus=16",
        "init=pissa loraplus=1",
        "init=pissa loraplus=16",
    ]
    assert labels["adalora"] == ["init=true loraplus=1", "init=true loraplus=16"]  # AdaLoRA has no PiSSA
    assert labels["loha"] == [""]  # neither applies: one plain run


# ---- initialisers computed from data: the glue, with stand-ins for the library's functions -------------------
class _DataInitConfig(deltatune.LoraConfig):
    FLAG_CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {INIT: ("true", "later", "sooner")}
    DATA_INITS: ClassVar[dict[str, tuple[str, str]]] = {
        "later": ("after", "fake_after"),
        "sooner": ("before", "fake_before"),
    }

    def _check_init(self) -> None:  # a stand-in: accepts the two values
        pass


@pytest.mark.parametrize("value", ["later", "sooner"])
def test_data_initialisers_run_the_library_function_on_batches(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        deltatune, "fake_after", lambda model, **kw: calls.append(("after", kw["dataloader"])), raising=False
    )
    monkeypatch.setattr(
        deltatune,
        "fake_before",
        lambda model, config, run_model: calls.append(("before", run_model())),
        raising=False,
    )
    real = data_init.get_peft_model  # the layers know no stand-in value: they build the default init
    monkeypatch.setattr(
        data_init,
        "get_peft_model",
        lambda base, config: real(base, dataclasses.replace(config, **{INIT: True})),
    )
    config = _DataInitConfig(r=2, target_modules=["lin"], **{INIT: value})
    batches = [{"x": torch.tensor([1, 2])}]
    model = data_init.attach_configured(_Net(), config, lambda: batches)
    assert isinstance(model, deltatune.PeftModel)
    assert calls == [("after", batches)] if value == "later" else calls == [("before", None)]


def test_a_missing_library_function_is_one_error() -> None:
    config = _DataInitConfig(r=2, target_modules=["lin"], **{INIT: "later"})
    with pytest.raises(
        ValueError, match=r"needs deltatune\.fake_after, which this version of the library lacks"
    ):
        data_init.attach_configured(_Net(), config, lambda: [])


def test_sample_batches_collates_without_labels() -> None:
    rows = [{"pixel_values": torch.zeros(3), "labels": torch.tensor(i % 2)} for i in range(10)]
    batches = data_init.sample_batches(
        rows, lambda items: {k: torch.stack([r[k] for r in items]) for k in items[0]}, 4
    )
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 4, 2] and all(
        "labels" not in b for b in batches
    )
