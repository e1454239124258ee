"""The pass itself: one site per targeted layer, no graph break beyond a dense model's, training under
compile with zero recompiles across optimizer steps, and every way of plugging qpass into torch.compile."""

import torch

import qpass
from qpass.ops import is_site_node
from qpass.testing import build_llama

from conftest import LAYERS, input_ids, make_model, randomize_adapters

CFG = dict(r=4, lora_alpha=8, target_modules="all-linear")


def _breaks(model, ids):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(ids)


def test_no_graph_break_beyond_the_dense_model():
    ids = input_ids()
    dense = _breaks(build_llama(), ids)
    raw_gptq = _breaks(make_model(), ids)  # the library's own layers: what PEFT's GPTQ wrapper inherits
    prepared = _breaks(qpass.prepare(make_model(), qpass.LoraConfig(**CFG)), ids)
    assert raw_gptq.graph_break_count > dense.graph_break_count  # the problem qpass solves is real
    assert prepared.graph_break_count == dense.graph_break_count
    assert prepared.graph_count == dense.graph_count
    # exactly one op node per targeted layer
    nodes = [n for g in prepared.graphs for n in g.graph.nodes if is_site_node(n)]
    assert len(nodes) == 7 * LAYERS


def test_each_targeted_layer_is_one_rewritten_site():
    seen = {}

    def inner(gm, example_inputs):
        seen["targets"] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward

    model = qpass.prepare(make_model(), qpass.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    compiled = torch.compile(model, backend=qpass.backend(inner))
    with torch.no_grad():
        compiled(input_ids())
    # every quantized layer is a site (the 5 untargeted ones per layer base only, so they do not break the graph);
    # per layer q, o and down are one node each, and the untargeted siblings k+v and gate+up one C++ call each
    names = [getattr(t, "__name__", "") for t in seen["targets"]]
    assert sum(n.startswith("qpass_site_") for n in names) == 3 * LAYERS
    assert sorted(n for n in names if n.startswith("qpass_bases_")) == ["qpass_bases_gate_proj_up_proj"] * LAYERS + [
        "qpass_bases_k_proj_v_proj"] * LAYERS
    assert not any(t in (torch.ops.qpass.site, torch.ops.qpass.site.default) for t in seen["targets"])
    rows = qpass.report(compiled).rows
    assert sum(r.status == "rewritten" for r in rows) == 2 * LAYERS
    assert sum(r.status == "rewritten (base only: not in target_modules)" for r in rows) == 5 * LAYERS


def test_inner_eager_backend_agrees_with_eager():
    """The rewritten graph run by dynamo's "eager" backend. aot_eager: the same check in
    tests/test_lowering.py::test_fused_siblings_equal_unfused_fp32; inductor: test_registered_backend_name_and_qpass_compile."""
    model = qpass.prepare(make_model(), qpass.LoraConfig(**CFG))
    randomize_adapters(model)
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=qpass.backend("eager"))(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-4)


def test_registered_backend_name_and_qpass_compile():
    ids = input_ids()
    a = qpass.prepare(make_model(), qpass.LoraConfig(**CFG))
    randomize_adapters(a)
    with torch.no_grad():
        ref = a(ids).logits
        by_name = torch.compile(a, backend="qpass")(ids).logits
    torch.testing.assert_close(by_name, ref, rtol=0, atol=2e-4)
    b = qpass.compile(make_model(), qpass.LoraConfig(**CFG))
    randomize_adapters(b)
    with torch.no_grad():
        out = b(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-4)
    summary = qpass.report(b).summary()
    assert summary["sites_rewritten"] == 7 * LAYERS and summary["graph_breaks"] == 0 and summary["graphs"] == 1
    assert summary["backend"] == "qpass+inductor" and summary["compile_seconds"] > 0


def test_training_under_compile_zero_recompiles():
    torch.manual_seed(0)
    model = qpass.prepare(make_model(), qpass.LoraConfig(**CFG))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".qpass_adapters.default.lora_" in n for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "qpass_adapters" not in n)
    compiled = torch.compile(model, backend=qpass.backend("aot_eager"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = input_ids(seed=3), input_ids(seed=4)
    losses, outputs = [], []
    for step in range(4):
        out = compiled(input_ids=ids, labels=labels)
        out.loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
            # lora_B is zero at init, so lora_A gets no gradient on the very first step; every B must.
            assert not [n for n in missing if "lora_B" in n]
        else:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
            assert not missing, f"no gradient for {missing[:3]}"
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        outputs.append(out.logits.detach())
    assert all(not torch.equal(a, b) for a, b in zip(outputs, outputs[1:])), "each step must change the output"
    assert losses[-1] < losses[0]
    stats = qpass.report(compiled).stats
    assert stats.recompiles == 0 and stats.graph_breaks == 0


def test_gradient_reaches_the_input_through_the_quantized_base():
    model = qpass.prepare(make_model(), qpass.LoraConfig(r=2, lora_alpha=2, target_modules=["down_proj"]))
    compiled = torch.compile(model, backend=qpass.backend("aot_eager"))
    embeds = model.model.embed_tokens(input_ids()).detach().requires_grad_(True)
    compiled(inputs_embeds=embeds).logits.sum().backward()
    eager_embeds = embeds.detach().clone().requires_grad_(True)
    model(inputs_embeds=eager_embeds).logits.sum().backward()
    assert embeds.grad.abs().sum() > 0
    torch.testing.assert_close(embeds.grad, eager_embeds.grad, rtol=1e-4, atol=1e-5)


def test_report_ignores_graph_breaks_inside_the_library_of_other_models():
    """gptqmodel compiles its own dequantize and breaks there when its layers run eagerly (as under PEFT);
    those breaks belong to no qpass graph and must not show in this model's report."""
    other = make_model()  # plain gptqmodel layers, run eagerly in the same process
    model = qpass.prepare(make_model(), qpass.LoraConfig(**CFG))
    before = len(torch._dynamo.utils.graph_break_reasons)
    with torch.no_grad():
        other(input_ids())
        assert len(torch._dynamo.utils.graph_break_reasons) > before  # the library did break
        torch.compile(model, backend=qpass.backend("aot_eager"))(input_ids())
    summary = qpass.report(model).summary()
    assert summary["graph_breaks"] == 0 and summary["graph_break_reasons"] == []
