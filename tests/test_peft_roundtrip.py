"""PEFT round trips never fail silently, through the real PEFT on real gptqmodel layers.

qpass -> PEFT: for every adapter kind and every form of `target_modules` (a list, a regex, "all-linear"),
`qpass.save_adapter` writes targets PEFT matches to exactly the adapted layers, and
`peft.PeftModel.from_pretrained` on a fresh base gives qpass's logits.
PEFT -> qpass: `qpass.from_peft` takes a PeftModel's adapters over (PEFT's logits, every adapter), and
`qpass.prepare` / `qpass.compile` / `qpass.report` refuse a PeftModel, naming PEFT and `qpass.from_peft`.
"""

import json

import pytest
import torch

peft = pytest.importorskip("peft")

import qpass
from qpass.adapter_io import peft_selects, peft_targets

from adapter_parity import ALL, N_SITES, assert_close, gptq_model_peft_dispatches, make_model, max_err, randomize
from conftest import LOGIT_TOL, input_ids

SOME = ["q_proj", "v_proj", "down_proj"]
TARGETS = {
    "list": (SOME, SOME),  # (given, written)
    "regex": (r".*\.(q_proj|v_proj|down_proj)", r".*\.(q_proj|v_proj|down_proj)"),
    "all-linear": ("all-linear", sorted(ALL)),
}
# kind -> (qpass config, tensors to randomise, std, PEFT's base, min logit effect in tolerances)
KINDS = {
    "lora": (lambda t: qpass.LoraConfig(r=4, lora_alpha=16, target_modules=t, init_lora_weights=False),
             ("lora_",), 0.1, make_model, 10),
    "qalora": (lambda t: qpass.LoraConfig(r=4, lora_alpha=16, target_modules=t, use_qalora=True, qalora_group_size=16),
               ("lora_",), 0.1, make_model, 10),
    # PEFT picks its GPTQ AdaLoRA layer only on a model carrying a GPTQConfig (same packed weights)
    "adalora": (lambda t: qpass.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=16, target_modules=t),
                ("lora_A", "lora_B", "lora_E"), 0.25, gptq_model_peft_dispatches, 10),
    # a rotation preserves norms: its effect on the logits is bounded (see test_oft)
    "oft": (lambda t: qpass.OFTConfig(oft_block_size=16, r=0, target_modules=t), ("oft_R",), 0.15, make_model, 5),
}


def _written(path):
    return json.loads((path / "adapter_config.json").read_text())


def _peft_logits(path, ids, base=make_model):
    reference = peft.PeftModel.from_pretrained(base(), str(path)).eval()
    with torch.no_grad():
        return reference(ids).logits, reference


@pytest.mark.parametrize("form", list(TARGETS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_saved_adapter_loads_in_peft(tmp_path, kind, form):
    make_cfg, keys, std, peft_base, min_effect = KINDS[kind]
    given, written = TARGETS[form]
    cfg = make_cfg(given)
    ids = input_ids()
    model = qpass.prepare(make_model(), cfg).eval()
    randomize(model, keys, std=std)
    expected = {r.module for r in qpass.report(model).rows if r.adapter}
    assert len(expected) == (N_SITES if form == "all-linear" else N_SITES // 7 * len(SOME))
    with torch.no_grad():
        ours = model(ids).logits
        assert max_err(ours, make_model()(ids).logits) > min_effect * LOGIT_TOL[torch.float32], "the adapter must change the logits"
    qpass.save_adapter(model, tmp_path)
    assert _written(tmp_path)["target_modules"] == written
    assert model._qpass.configs["default"].target_modules == given, "the config in memory is unchanged"
    theirs, reference = _peft_logits(tmp_path, ids, peft_base)
    adapted = {n.replace("base_model.model.", "", 1) for n, m in reference.named_modules()
               if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}
    assert adapted == expected, "PEFT adapts exactly the layers qpass adapted"
    assert_close(theirs, ours)


def two_layers():
    """Layer-indexed targets need a layer 1."""
    return make_model(num_hidden_layers=2)


def _names():
    return [n for n, _ in two_layers().named_modules()]


def test_written_targets_fall_back_to_short_names_or_full_paths(tmp_path):
    """A regex with layers_to_transform (PEFT refuses the pair): short names with the layers when they select
    the same layers under PEFT's rule, else the full paths (a list entry equal to the name ignores the layers)."""
    ids = input_ids()
    cases = [
        (dict(target_modules=r".*\.q_proj", layers_to_transform=[1]), ["q_proj"],
         {"model.layers.1.self_attn.q_proj"}),
        (dict(target_modules=r"model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.down_proj", layers_to_transform=[0, 1]),
         ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"],
         {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}),
    ]
    for i, (fields, written, adapted) in enumerate(cases):
        model = qpass.prepare(two_layers(), qpass.LoraConfig(r=4, init_lora_weights=False, **fields)).eval()
        assert {r.module for r in qpass.report(model).rows if r.adapter} == adapted
        with torch.no_grad():
            ours = model(ids).logits
        qpass.save_adapter(model, tmp_path / str(i))
        data = _written(tmp_path / str(i))
        assert data["target_modules"] == written and data["layers_to_transform"] == fields["layers_to_transform"]
        theirs, reference = _peft_logits(tmp_path / str(i), ids, base=two_layers)
        assert len([m for m in reference.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]) == len(adapted)
        assert_close(theirs, ours)


def test_peft_rule_and_target_choice():
    """`peft_selects` is PEFT's own `check_target_module_exists`; `peft_targets` prefers the user's value."""
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [n for n in _names() if n]
    configs = [
        peft.LoraConfig(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]),
        peft.LoraConfig(target_modules=r".*layers\.1.*proj"),
        peft.LoraConfig(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
        peft.LoraConfig(target_modules=["q_proj", "model.layers.0.mlp.up_proj"], layers_to_transform=1, layers_pattern="layers"),
        peft.LoraConfig(target_modules=ALL, exclude_modules=["model.layers.0.self_attn.q_proj"]),
        peft.LoraConfig(target_modules=ALL, exclude_modules=r".*mlp.*"),
    ]
    for config in configs:
        data = config.to_dict()
        for name in names:
            assert peft_selects(data, name) == bool(check_target_module_exists(config, name)), (config.target_modules, name)
    sites = [n for n in names if n.endswith(tuple(ALL))]
    cfg = qpass.LoraConfig(target_modules=["v_proj", "q_proj"])
    assert peft_targets(cfg, names, [n for n in sites if n.endswith(("q_proj", "v_proj"))]) == {}
    assert peft_targets(qpass.LoraConfig(target_modules="all-linear"), names, sites) == {"target_modules": sorted(ALL)}
    # a layer qpass left out (e.g. one it cannot serve): the short names would select it too
    some = [n for n in sites if n.endswith("q_proj")][:1]
    assert peft_targets(cfg, names, some) == {"target_modules": some}


# ---- PEFT -> qpass: from_peft ------------------------------------------------------------------------


def _tuner_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]


def _peft_lora(base=None):
    model = peft.get_peft_model(base or make_model(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True))
    randomize(model, ("lora_",))
    return model.eval()


def test_from_peft_lora_takes_every_adapter_over():
    ids = input_ids()
    pm = _peft_lora()
    with torch.no_grad():
        ref = pm(ids).logits
        pm.set_adapter("other")
        ref_other = pm(ids).logits
        pm.set_adapter("default")
    assert max_err(ref, ref_other) > 10 * LOGIT_TOL[torch.float32]
    grads = {name: any(p.requires_grad for n, p in pm.named_parameters() if f".{name}." in n) for name in ("default", "other")}

    model = qpass.from_peft(pm)
    assert type(model).__name__ == "LlamaForCausalLM" and not _tuner_layers(model)
    assert qpass.active_adapters(model) == ("default",)
    assert sorted(model._qpass.configs) == ["default", "other"]
    rows = [r for r in qpass.report(model).rows if r.adapter]
    assert len(rows) == N_SITES
    for name, trains in grads.items():
        params = [p for n, p in model.named_parameters() if f"qpass_adapters.{name}." in n]
        assert params and all(p.requires_grad == trains for p in params), name
    with torch.no_grad():
        assert_close(model(ids).logits, ref)
        qpass.set_adapter(model, "other")
        assert_close(model(ids).logits, ref_other)


@pytest.mark.parametrize("kind", ["qalora", "adalora", "oft"])
def test_from_peft_other_kinds(kind):
    ids = input_ids()
    if kind == "qalora":
        pm = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL, use_qalora=True,
                                                               qalora_group_size=16))
        randomize(pm, ("lora_",))
    elif kind == "adalora":
        pm = peft.get_peft_model(gptq_model_peft_dispatches(), peft.AdaLoraConfig(
            target_modules=SOME, init_r=4, target_r=2, total_step=10, lora_alpha=16, task_type="CAUSAL_LM"))
        randomize(pm, ("lora_A", "lora_B", "lora_E"), std=0.25)
    else:
        pm = peft.get_peft_model(make_model(), peft.OFTConfig(target_modules=ALL, oft_block_size=16, r=0))
        randomize(pm, ("oft_R",), std=0.15)
    pm.eval()
    with torch.no_grad():
        ref = pm(ids).logits
        assert max_err(ref, make_model()(ids).logits) > 5 * LOGIT_TOL[torch.float32]
    model = qpass.from_peft(pm)
    assert not _tuner_layers(model)
    slot = model.model.layers[0].self_attn.q_proj.qpass_adapters["default"]
    assert slot.spec.name == kind
    with torch.no_grad():
        assert_close(model(ids).logits, ref)


def test_from_peft_checks_before_changing_anything():
    """An adapter on a layer qpass does not serve (lm_head, a plain nn.Linear) is refused; PEFT's model is untouched."""
    pm = peft.get_peft_model(make_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False)).eval()
    layers = _tuner_layers(pm)
    with pytest.raises(qpass.QpassError, match=r"PEFT adapter 'default' adapts lm_head \(Linear"):
        qpass.from_peft(pm)
    assert _tuner_layers(pm) == layers and getattr(pm.base_model.model, "_qpass", None) is None
    with pytest.raises(qpass.QpassError, match="from_peft takes a peft.PeftModel; got LlamaForCausalLM; for a model without"):
        qpass.from_peft(make_model())
    with pytest.raises(qpass.QpassError, match="keeps PEFT's adapter names"):
        qpass.from_peft(pm, adapter_name="x")


def test_prepare_compile_report_refuse_a_peft_model():
    ids = input_ids()
    pm = _peft_lora()
    with torch.no_grad():
        ref = pm(ids).logits
    cfg = qpass.LoraConfig(r=2, target_modules=["q_proj"])
    for call in (lambda: qpass.prepare(pm, cfg), lambda: qpass.compile(pm, cfg)):
        with pytest.raises(qpass.QpassError, match=r"PeftModel is a PEFT model .*qpass\.from_peft\(peft_model\)"):
            call()
    with pytest.raises(qpass.QpassError, match=r"holds PEFT adapter layers \(model\.layers\.0\.self_attn\.q_proj: GPTQLoraLinear\).*qpass\.from_peft"):
        qpass.prepare(pm.base_model.model, cfg)
    with pytest.raises(qpass.QpassError, match=r"PeftModel is a PEFT model .*qpass\.from_peft\(peft_model\)"):
        qpass.report(pm)
    assert getattr(pm.base_model.model, "_qpass", None) is None
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, ref), "a refused prepare leaves the PEFT model as it was"


def test_from_peft_puts_peft_back_when_attaching_fails(monkeypatch):
    """A failure after PEFT's layers were swapped out (here: loading the second adapter is interrupted) leaves
    the PeftModel as it was: its layers, its config, its logits."""
    from qpass import lifecycle

    ids = input_ids()
    pm = _peft_lora()
    with torch.no_grad():
        ref = pm(ids).logits
    layers = _tuner_layers(pm.base_model.model)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle, "load_adapter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qpass.from_peft(pm)
    assert _tuner_layers(pm.base_model.model) == layers
    assert getattr(pm.base_model.model, "_qpass", None) is None and sorted(pm.peft_config) == ["default", "other"]
    with torch.no_grad():
        assert_close(pm(ids).logits, ref)
