"""examples/custom_pattern.py: a user-written spec outside the package compiles, trains, and shows in the report."""

import runpy
from pathlib import Path

import torch

import qpass

from conftest import LAYERS

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_pattern.py"


def test_custom_pattern_example_runs(capsys):
    example = runpy.run_path(str(EXAMPLE), run_name="custom_pattern_example")
    compiled, loss = example["main"]("aot_eager")
    printed = capsys.readouterr().out
    assert printed.count("input-scale:default") == 3 * LAYERS  # gate/up/down per layer, one report row each
    assert "rewritten" in printed
    summary = qpass.report(compiled).summary()
    assert summary["sites_rewritten"] == 3 * LAYERS
    model = compiled  # qpass.compile compiles in place and returns the model
    scales = [p for n, p in model.named_parameters() if n.endswith("ia3_l")]
    assert len(scales) == 3 * LAYERS and all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales)
    # the adapter does what it says: the same site with l = 1.5 equals the base on 1.5 x
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        ours = layer(x)
        with qpass.disable_adapters(model):
            base = layer(1.5 * x)
    torch.testing.assert_close(ours, base, rtol=1e-4, atol=1e-5)
    assert qpass.spec.registered()["input-scale"].config.__name__ == "InputScaleConfig"
