"""QA-LoRA on gptqmodel TorchLinear: qpass against PEFT's GPTQLoraLinear + QALoraLinearVariant (the oracle).

PEFT adapters with non-zero tensors are saved to directories; qpass loads them; logits (eager, aot_eager,
inductor) and the update of one SGD step are compared. The adapter qpass saves back (loaded by PEFT):
tests/test_lora_parity.py::test_saved_adapter_loads_in_peft_and_back.
"""

import pytest
import torch

peft = pytest.importorskip("peft")

import qpass

from adapter_parity import check_logits_match_peft, save_peft_dirs, ALL, N_SITES, make_model, max_rel, randomize, sgd_updates
from conftest import input_ids

VARIANTS = {
    "G16": dict(qalora_group_size=16),
    "G32_rslora": dict(qalora_group_size=32, use_rslora=True),
    "G8_dropout": dict(qalora_group_size=8, lora_dropout=0.1),
    # PEFT's QA-LoRA never uses lora_B.bias (it stays at its zero init), so files carry a zero bias.
    "G16_lora_bias": dict(qalora_group_size=16, lora_bias=True),
}


def peft_model(variant, dtype=torch.float32):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL, use_qalora=True, **VARIANTS[variant])
    model = peft.get_peft_model(make_model(dtype), cfg)
    randomize(model, ("lora_",), std=0.2, skip=("lora_B.default.bias",))  # pooled inputs: a smaller effect than LoRA's
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_peft_dirs(tmp_path_factory, "qalora", VARIANTS, peft_model)


CASES = [(v, torch.float32, "eager") for v in VARIANTS] + [
    ("G16", torch.bfloat16, "eager"), ("G16", torch.float16, "eager"),
    ("G32_rslora", torch.float32, "inductor")]


@pytest.mark.parametrize("variant,dtype,mode", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_logits_match_peft(dirs, variant, dtype, mode):
    reference = peft.PeftModel.from_pretrained(make_model(dtype), str(dirs[variant]))
    model = check_logits_match_peft(reference, dirs[variant], dtype, mode)
    assert model.model.layers[0].self_attn.q_proj.qpass_adapters["default"].spec.name == "qalora"


def test_compiled_sgd_step_matches_peft(dirs):
    """aot_eager-compiled qpass, one SGD step, against PEFT: every lora_A/lora_B update (rel. error < 1e-3)."""
    ids, labels = input_ids(seed=1), input_ids(seed=2)
    path = str(dirs["G16_lora_bias"])
    ref = sgd_updates(peft.PeftModel.from_pretrained(make_model(), path, is_trainable=True), ids, labels)
    ours = sgd_updates(torch.compile(qpass.prepare(make_model(), path), backend=qpass.backend("aot_eager")), ids, labels)
    # deliberate difference: qpass trains lora_B.bias (as LoRA does); PEFT's QA-LoRA forward ignores it
    biases = [k for k in ours if k.endswith("lora_B.bias")]
    assert len(biases) == N_SITES and all(ours[k].norm() > 0 for k in biases)
    assert all(ref[k].norm() == 0 for k in biases)
    ours = {k: v for k, v in ours.items() if k not in biases}
    ref = {k: v for k, v in ref.items() if k not in biases}
    assert len(ref) == 2 * N_SITES
    err = max_rel(ours, ref)
    assert err < 1e-3, f"update rel. error {err:.3g}"


def test_dropout_training_step_matches_peft_in_eager(dirs):
    """With dropout, eager qpass draws its masks in PEFT's order (per site, on the cast input): same step."""
    ids, labels = input_ids(seed=1), input_ids(seed=2)
    ref_model = peft.PeftModel.from_pretrained(make_model(), str(dirs["G8_dropout"]), is_trainable=True)
    model = qpass.prepare(make_model(), str(dirs["G8_dropout"]))
    torch.manual_seed(3)
    ref = sgd_updates(ref_model, ids, labels, train=True)
    torch.manual_seed(3)
    ours = sgd_updates(model, ids, labels, train=True)
    assert max_rel(ours, ref) < 1e-4
    torch.manual_seed(4)
    other = sgd_updates(qpass.prepare(make_model(), str(dirs["G8_dropout"])), ids, labels, train=True)
    assert max_rel(other, ref) > 1e-3, "dropout must be active in training"


def test_group_size_must_divide_in_features():
    with pytest.raises(qpass.QpassError, match=r"model\.layers\.0\.self_attn\.q_proj: qalora_group_size=24 does not divide in_features=64; use e\.g\. qalora_group_size=32"):
        qpass.prepare(make_model(), qpass.LoraConfig(r=2, target_modules=["q_proj"], use_qalora=True, qalora_group_size=24))
    model = make_model()
    qpass.prepare(model, qpass.LoraConfig(r=2, target_modules=["q_proj"], use_qalora=True, qalora_group_size=32))
    assert model.model.layers[0].self_attn.q_proj.qpass_adapters["default"].get("lora_A.weight").shape == (2, 2)


def test_dora_with_qalora_is_not_implemented():
    model = make_model()
    with pytest.raises(NotImplementedError, match="q_proj: DoRA and QA-LoRA"):
        qpass.prepare(model, peft.LoraConfig(r=2, target_modules=["q_proj"], use_qalora=True, use_dora=True))
    assert getattr(model, "_qpass", None) is None, "a failed prepare leaves the model untouched"
