"""``torch.compile`` on the CPU over every registered method: training and evaluation give what eager mode
gives, with and without dropout, and no graph break inside the adapter layers (inductor's C++ for LoRA and
DoRA, dynamo and AOT autograd for every method).

Compiling is slow on two cores, so each method is compiled once per mode on the small MLP; the ViT case
compiles one method end to end.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import MODEL_KINDS, make_config

import deltatune
from deltatune import get_peft_model

pytestmark = pytest.mark.slow


def _dropout_kwargs(method: str, p: float) -> dict[str, Any]:
    field = deltatune.get_method(method).config_cls.DROPOUT_FIELD
    return {field: p} if field else {}


def _model(method: str, kind: str = "mlp", p: float = 0.0, nonzero: bool = True) -> Any:
    spec = MODEL_KINDS[kind]
    config = make_config(method, spec.targets, spec.modules_to_save, nonzero, **_dropout_kwargs(method, p))
    return get_peft_model(spec.build(0), config)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference over the tensor's scale (AdaLoRA's N(0, 1) init makes large values)."""
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)


def _out(y: Any) -> torch.Tensor:
    return y.logits if hasattr(y, "logits") else y


#: Methods compiled with inductor's generated C++ here (LoRA, and DoRA with its fused ops); the others with
#: dynamo and AOT autograd exactly as inductor traces them, but eager kernels (the C++ build of every method
#: would take two minutes of the suite on two cores; what an adapter can break is the traced graph).
INDUCTOR_METHODS = ("lora", "dora")


@pytest.mark.parametrize("method", deltatune.available_methods())
def test_compiled_training_and_eval_match_eager(method: str) -> None:
    torch._dynamo.reset()
    eager, compiled_model = _model(method), _model(method)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(
        compiled_model, backend="inductor" if method in INDUCTOR_METHODS else "aot_eager"
    )
    x = MODEL_KINDS["mlp"].inputs()
    for train in (True, False):
        eager.train(train)
        compiled_model.train(train)
        torch.set_grad_enabled(train)
        try:
            want, got = _out(eager(x)), _out(compiled(x))
            assert _relative(got, want) < 1e-5
            if train:
                want.square().mean().backward()
                got.square().mean().backward()
                for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
                    if p.requires_grad:
                        assert q.grad is not None and p.grad is not None, name
                        assert _relative(q.grad, p.grad) < 1e-5, name
        finally:
            torch.set_grad_enabled(True)


@pytest.mark.parametrize("method", deltatune.available_methods())
def test_compiled_training_with_dropout_runs(method: str) -> None:
    """Dropout masks differ between eager and inductor (different RNG streams), so: it compiles, trains,
    and the loss goes down on a fixed batch. LoRA compiles with inductor (its RNG in generated code); the
    other methods with dynamo and AOT autograd as inductor runs them, without its C++ build."""
    torch._dynamo.reset()
    model = _model(method, p=0.2, nonzero=False)  # PEFT's init: a small, trainable start
    compiled = torch.compile(model, backend="inductor" if method == "lora" else "aot_eager")
    x = MODEL_KINDS["mlp"].inputs()
    target = torch.randn(x.shape[0], 4, generator=torch.Generator().manual_seed(5))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    model.train()
    losses = []
    for _ in range(8):
        loss = (compiled(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_adapter_layers_compile_without_graph_breaks() -> None:
    """One graph for a ViT with LoRA (dropout on) in training: no break inside the adapter code."""
    torch._dynamo.reset()
    model = _model("lora", "vit", p=0.1).train()
    explanation = torch._dynamo.explain(model)(MODEL_KINDS["vit"].inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("method", deltatune.available_methods())
def test_every_method_traces_as_one_graph(method: str) -> None:
    """Every method, in training (dropout on) and in evaluation without grad: one graph, no break (DoRA's cached
    ‖W‖² once broke it, by asking torch whether inference mode was on)."""
    x = MODEL_KINDS["mlp"].inputs()
    model = _model(method, p=0.1)
    for train, grad in ((True, True), (False, False)):
        torch._dynamo.reset()
        model.train(train)
        with torch.set_grad_enabled(grad):
            explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, (train, grad, explanation.break_reasons)


def test_cli_trains_with_torch_compile(tmp_path: Any) -> None:
    """``deltatune train --torch_compile``: the Trainer compiles the model, the adapter saves as usual and
    loads back to the outputs the compiled run evaluated."""
    from tiny import save_tiny_vit_dir, write_image_folder

    from deltatune.cli import main

    torch._dynamo.reset()
    model_dir = save_tiny_vit_dir(tmp_path / "vit")
    data = write_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    argv = ["train", "--model", model_dir, "--dataset", data, "--output_dir", str(out), "--torch_compile"]
    # dynamo and AOT autograd as inductor runs them, without its C++ build (the tests above compile with
    # inductor); this test is about the command line's compiled run and what it saves
    argv += ["--torch_compile_backend", "aot_eager"]
    argv += ["--max_steps", "3", "--per_device_train_batch_size", "4", "--use_cpu", "--disable_tqdm", "true"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false"]
    assert main(argv) == 0
    from deltatune.tasks.inference import load_trained

    saved = load_trained(str(out)).model
    keys = [k for k, _ in saved.named_parameters() if "_orig_mod" in k]
    assert not keys, "a compiled wrapper leaked into the saved adapter"
    assert (out / "adapter_model.safetensors").is_file()
