"""AdaLoRA on gptqmodel layers: qpass against PEFT's SVDQuantLinear and RankAllocator (the oracle).

Logits (eager, inductor), a whole AdaLoRA training run with rank allocation (compiled with aot_eager, no
recompile while lora_E is masked and the budget shrinks) step by step against PEFT's, the orthogonality
regulariser, and adapter directories with a rank pattern both ways (PEFT -> qpass, qpass -> PEFT).
"""

import json

import pytest
import torch

peft = pytest.importorskip("peft")

import qpass

from adapter_parity import (check_logits_match_peft, save_peft_dirs, ALL, N_SITES, assert_close, gptq_model_peft_dispatches, make_model, randomize,
                            trainable)
from conftest import input_ids

OPTIONS = {
    "alpha16": dict(lora_alpha=16),
    "alpha0": dict(lora_alpha=0),  # PEFT: scaling = r when lora_alpha is 0
    "dropout": dict(lora_alpha=8, lora_dropout=0.1),
}
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6, deltaT=2)


def peft_model(option, dtype=torch.float32, **extra):
    cfg = peft.AdaLoraConfig(target_modules=ALL, orth_reg_weight=0.1, task_type="CAUSAL_LM", **SCHEDULE, **OPTIONS[option], **extra)
    model = peft.get_peft_model(gptq_model_peft_dispatches(dtype), cfg)
    assert type(model.base_model.model.model.layers[0].mlp.down_proj).__name__ == "SVDQuantLinear"
    randomize(model, ("lora_A", "lora_B", "lora_E"), std=0.25)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_peft_dirs(tmp_path_factory, "adalora", OPTIONS, peft_model)


CASES = [(o, torch.float32, "eager") for o in OPTIONS] + [("alpha16", torch.bfloat16, "eager"), ("alpha16", torch.float32, "inductor")]


@pytest.mark.parametrize("option,dtype,mode", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_logits_match_peft(dirs, option, dtype, mode):
    reference = peft.PeftModel.from_pretrained(gptq_model_peft_dispatches(dtype), str(dirs[option]))
    model = check_logits_match_peft(reference, dirs[option], dtype, mode)
    slot = model.model.layers[0].self_attn.q_proj.qpass_adapters["default"]
    assert slot.spec.name == "adalora" and slot.ranknum.item() == 4


def _train(model, step_fn, steps, lr=0.2):
    """AdaLoRA's loop: loss.backward(); opt.step(); update_and_allocate(step); zero_grad(). Returns per-step logs."""
    params = list(trainable(model).values())
    opt = torch.optim.SGD(params, lr=lr)
    losses, patterns = [], []
    for step in range(1, steps + 1):
        ids, labels = input_ids(seed=10 + step), input_ids(seed=100 + step)
        loss = step_fn(ids, labels)
        loss.backward()
        opt.step()
        patterns.append(step_fn.allocate(step))
        opt.zero_grad()
        losses.append(loss.item())
    return losses, patterns


# the budget may prune a site to 0 ranks, and PEFT warns on saving such a (legitimately) empty lora_A / lora_B
@pytest.mark.filterwarnings("ignore:Adapter 'default'. .* LoRA tensor.s. have invalid shape")
def test_rank_allocation_training_matches_peft(dirs, tmp_path):
    path = str(dirs["alpha16"])
    # PEFT: its own loop (the regulariser is added inside forward; RankAllocator via update_and_allocate)
    ref = peft.PeftModel.from_pretrained(gptq_model_peft_dispatches(), path, is_trainable=True)
    ref_cfg = ref.peft_config["default"]

    def ref_step(ids, labels):
        return ref(input_ids=ids, labels=labels).loss

    def ref_allocate(step):
        ref.base_model.update_and_allocate(step)
        rp = ref_cfg.rank_pattern
        return None if rp is None else {k.replace(".default", ""): list(v) for k, v in rp.items()}

    ref_step.allocate = ref_allocate
    ref_losses, ref_patterns = _train(ref, ref_step, SCHEDULE["total_step"] + 1)

    # qpass: compiled once; the regulariser added to the loss; masking happens in place on lora_E
    model = qpass.prepare(make_model(), path)
    compiled = torch.compile(model, backend=qpass.backend("aot_eager"))
    stats = qpass.report(compiled).stats

    def our_step(ids, labels):
        return compiled(input_ids=ids, labels=labels).loss + qpass.orthogonal_regularization(model)

    def our_allocate(step):
        if step == 1:
            our_step.compiled = (stats.graphs, stats.recompiles)
        rp = qpass.update_and_allocate(model, step)
        return None if rp is None else {k: list(v) for k, v in rp.items()}

    our_step.allocate = our_allocate
    losses, patterns = _train(model, our_step, SCHEDULE["total_step"] + 1)

    assert stats.graphs >= 1 and (stats.graphs, stats.recompiles) == our_step.compiled, "masking/budget must not recompile"
    assert patterns == ref_patterns, "rank patterns differ from PEFT's"
    final = patterns[-1]
    kept = sum(sum(m) for m in final.values())
    assert len(final) == N_SITES and kept == SCHEDULE["target_r"] * N_SITES  # the final budget
    assert any(not all(m) for m in final.values())
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-4, (losses, ref_losses)
    theirs = trainable(ref)
    for k, p in trainable(model).items():
        assert torch.allclose(p, theirs[k], rtol=1e-3, atol=1e-5), k
        if k.endswith("lora_E"):
            mask = torch.tensor(final[k.rsplit(".", 1)[0] + ".lora_E"])
            assert torch.all(p[~mask] == 0)

    # saved with the rank pattern, pruned tensors dropped, as PEFT saves
    ids = input_ids(seed=5)
    model.eval(), ref.eval()
    with torch.no_grad():
        ours = model(ids).logits
        assert_close(ours, ref(ids).logits)
    qpass.save_adapter(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"] == final
    back = peft.PeftModel.from_pretrained(gptq_model_peft_dispatches(), str(tmp_path / "ours")).eval()
    layer = back.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].shape[0] == sum(final["model.layers.0.self_attn.q_proj.lora_E"])
    with torch.no_grad():
        assert_close(back(ids).logits, ours)
    # and PEFT's own save of the trained model loads into qpass at the reduced ranks
    ref.save_pretrained(str(tmp_path / "theirs"))
    again = qpass.prepare(make_model(), str(tmp_path / "theirs"))
    slot = again.model.layers[0].self_attn.q_proj.qpass_adapters["default"]
    assert slot.get("lora_A").shape[0] == sum(final["model.layers.0.self_attn.q_proj.lora_E"])
    with torch.no_grad():
        assert_close(again(ids).logits, ours)


def test_orthogonal_regularization_matches_peft(dirs):
    ids, labels = input_ids(seed=1), input_ids(seed=2)
    ref = peft.PeftModel.from_pretrained(gptq_model_peft_dispatches(), str(dirs["alpha16"]), is_trainable=True).eval()
    model = qpass.prepare(make_model(), str(dirs["alpha16"])).eval()
    with torch.no_grad():
        plain = model(input_ids=ids, labels=labels).loss
        reg = qpass.orthogonal_regularization(model)
        assert reg > 0.01
        assert abs((plain + reg).item() - ref(input_ids=ids, labels=labels).loss.item()) < 1e-5


def test_config_errors_and_peft_config_objects():
    with pytest.raises(qpass.QpassError, match="total_step"):
        qpass.AdaLoraConfig(target_modules=["q_proj"])
    with pytest.raises(qpass.QpassError, match="target_r"):
        qpass.AdaLoraConfig(init_r=2, target_r=4, total_step=10)
    model = qpass.prepare(make_model(), peft.AdaLoraConfig(init_r=6, target_r=2, total_step=10, target_modules=["v_proj"]))
    slot = model.model.layers[0].self_attn.v_proj.qpass_adapters["default"]
    assert slot.get("lora_A").shape == (6, 64) and slot.get("lora_E").shape == (6, 1) and slot.get("lora_B").shape == (32, 6)
    assert torch.all(slot.get("lora_E") == 0) and slot.scaling.item() == 8 and slot.ranknum.item() == 6
    rows = [r for r in qpass.report(model).rows if r.adapter]
    assert len(rows) == N_SITES // 7 and all(r.dtype_policy == "float32" and r.rank == 6 for r in rows)  # v_proj per layer
    with pytest.raises(qpass.QpassError, match="AdaLoRA"):
        qpass.update_and_allocate(qpass.prepare(make_model(), qpass.LoraConfig(target_modules=["q_proj"])), 1)
