"""merge: adapters folded into the quantized weights by requantisation; per-site errors; refusal over a threshold."""

import pytest
import torch

import qpass
from qpass.errors import QpassError

from conftest import input_ids, make_model, randomize_adapters

CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True)


def _prepared(bits, std=0.1):
    model = qpass.prepare(make_model(bits=bits), qpass.LoraConfig(**CFG))
    randomize_adapters(model, std=std)
    return model


def test_merge_8bit_matches_the_unmerged_model():
    ids = input_ids()
    model = _prepared(bits=8)
    with torch.no_grad():
        before = model(ids).logits
        base_only = make_model(bits=8)(ids).logits
    merged = qpass.merge(model)
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is TorchLinear and "forward" not in layer.__dict__ and not hasattr(merged, "_qpass")
    assert not any("qpass_adapters" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        after = merged(ids).logits
    adapter_effect = (before - base_only).abs().max().item()
    merge_error = (after - before).abs().max().item()
    assert adapter_effect > 0.05
    assert merge_error < 0.1 * adapter_effect, (merge_error, adapter_effect)
    report = merged.qpass_merge_report
    assert len(report) == 6 and all(r.rel_error < 0.01 for r in report)
    assert "max |ΔW|" in str(report)


def test_merge_keeps_untouched_weights_exact():
    """Where the adapter changes nothing, re-rounding on the existing grid gives back the same codes."""
    model = qpass.prepare(make_model(), qpass.LoraConfig(**CFG))  # lora_B = 0 at init: adapters are identity
    qweight = model.model.layers[1].mlp.down_proj.qweight.clone()
    merged = qpass.merge(model)
    assert torch.equal(merged.model.layers[1].mlp.down_proj.qweight, qweight)
    assert all(r.max_abs_error == 0 for r in merged.qpass_merge_report)


def test_merge_4bit_reports_error_and_refuses_over_threshold():
    model = _prepared(bits=4, std=0.02)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QpassError, match=r"merging would change 6 site\(s\) by more than max_rel_error=1e-06 or lose more "
                                         r"than max_adapter_loss=0\.5 of the adapter: model\.layers\.0\.self_attn\.q_proj"):
        qpass.merge(model, max_rel_error=1e-6)
    assert hasattr(model, "_qpass")  # refused: still prepared, nothing repacked
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    ids = input_ids()
    with torch.no_grad():
        before = model(ids).logits
    merged = qpass.merge(model, max_rel_error=0.5, max_adapter_loss=1.0)
    rows = merged.qpass_merge_report
    assert all(0 < r.rel_error < 0.5 and r.max_abs_error > 0 for r in rows)
    with torch.no_grad():
        after = merged(ids).logits
    assert (after - before).abs().max() < 1.0  # 4-bit requantisation noise, not a broken model


def test_merge_refuses_an_adapter_finer_than_the_quantization_step():
    """At 4 bits a tiny adapter would round away entirely: refused by default, naming the sites."""
    model = _prepared(bits=4, std=0.001)
    with pytest.raises(QpassError, match=r"model\.layers\.0\.self_attn\.q_proj \(error [0-9.e-]+ of the weight, \d+% of the adapter lost\)"):
        qpass.merge(model)
    assert hasattr(model, "_qpass")


def test_merged_model_compiles_and_trains_again():
    model = qpass.merge(_prepared(bits=8))
    again = qpass.prepare(model, qpass.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    compiled = torch.compile(again, backend=qpass.backend("aot_eager"))
    compiled(input_ids=input_ids(), labels=input_ids(seed=1)).loss.backward()
    assert all(p.grad is not None for p in again.parameters() if p.requires_grad)


@pytest.mark.slow
def test_merged_checkpoint_saves_and_reloads_with_transformers(tmp_path_factory):
    """A gptqmodel-quantized checkpoint, loaded by transformers, LoRA merged, saved, reloaded by from_pretrained."""
    from transformers import AutoModelForCausalLM

    from ckpt_build import session_checkpoints

    path = session_checkpoints(tmp_path_factory, methods=("gptq",))["gptq"]
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
    qpass.prepare(model, qpass.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, std=0.05)
    ids = torch.randint(4, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    merged = qpass.merge(model, max_rel_error=0.5)
    out = tmp_path_factory.mktemp("merged")
    qpass.save_quantized(merged, out)
    with torch.no_grad():
        after = merged(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    with torch.no_grad():
        again = reloaded(ids).logits
    assert torch.equal(again, after)  # the checkpoint holds exactly the merged weights
    assert (after - before).abs().max() < 0.5 * before.abs().max()  # 4-bit requantisation noise only
