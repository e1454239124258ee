"""Bad input: a clear error naming the field or module and saying what to do; the model left exactly as it was."""

import json

import pytest
import torch

import qpass
from qpass.errors import AdapterLoadError, QpassError

from conftest import make_model as tiny_llama

peft = pytest.importorskip("peft")


def make_model(*args, **llama):
    """Two decoder layers: messages name modules of layer 1 and refuse a layer beyond it."""
    return tiny_llama(*args, **{"num_hidden_layers": 2, **llama})


def snapshot(model):
    """Module tree, state_dict values, requires_grad flags and instance attributes."""
    return {
        "tree": [(n, type(m).__name__, sorted(k for k in m.__dict__ if not k.startswith("_") or k in ("_qpass", "_qpass_site"))) for n, m in model.named_modules()],
        "forward_patched": [n for n, m in model.named_modules() if "forward" in m.__dict__],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "buffers": {n: b.is_inference() for n, b in model.named_buffers()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "qpass": hasattr(model, "_qpass"),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["tree"] == before["tree"]
    assert after["forward_patched"] == before["forward_patched"]
    assert after["grad"] == before["grad"]
    assert after["qpass"] == before["qpass"]
    assert after["buffers"] == before["buffers"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def expect_error(model, adapter, exc, pattern, **kw):
    before = snapshot(model)
    with pytest.raises(exc, match=pattern):
        qpass.prepare(model, adapter, **kw)
    assert_unchanged(model, before)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    m = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    m.save_pretrained(str(path))
    return path


# ---- config fields ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"r": 0}, r"`r` must be a positive integer"),
        ({"r": -3}, r"`r` must be a positive integer"),
        ({"r": 2.5}, r"`r` must be a positive integer"),
        ({"lora_alpha": 0}, r"`lora_alpha` must be a positive number"),
        ({"lora_alpha": -1.0}, r"`lora_alpha` must be a positive number"),
        ({"lora_dropout": 1.0}, r"`lora_dropout` must be a probability in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"`lora_dropout` must be a probability"),
        ({"target_modules": 3}, r"`target_modules` must be a list of module names, a regex string or 'all-linear'"),
        ({"target_modules": "q_proj("}, r"`target_modules` is not a valid regular expression"),
        ({"init_lora_weights": "pissa"}, r"`init_lora_weights='pissa'` is not supported"),
        ({"bias": "all"}, r"`bias='all'` is not supported"),
        ({"dtype_policy": "fp8"}, r"`dtype_policy` must be one of"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]"),
    ],
)
def test_bad_config_fields(kwargs, pattern):
    with pytest.raises(QpassError, match=pattern):
        qpass.LoraConfig(**kwargs)


def test_wrong_adapter_type(model):
    expect_error(model, 42, QpassError, r"adapter must be a qpass config .* got int")
    expect_error(model, {"r": 4}, QpassError, r"adapter must be a qpass config .* got dict")


def test_wrong_model_type():
    with pytest.raises(QpassError, match=r"model must be a torch.nn.Module"):
        qpass.prepare("not a model", qpass.LoraConfig(target_modules=["q_proj"]))


def test_bad_adapter_name(model):
    expect_error(model, qpass.LoraConfig(target_modules=["q_proj"]), QpassError, r"adapter_name must be a Python identifier",
                 adapter_name="my adapter")


# ---- targeting ---------------------------------------------------------------------------------------

def test_target_modules_matching_nothing_lists_quantized_layers(model):
    expect_error(model, qpass.LoraConfig(target_modules=["qkv"]), QpassError,
                 r"matches no quantized layer\. Quantized layers: \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]")


def test_target_modules_matching_only_plain_layers(model):
    expect_error(model, qpass.LoraConfig(target_modules=["lm_head"]), QpassError,
                 r"matched only non-quantized layers: \['lm_head'\]")


def test_model_without_quantized_layers():
    from qpass.testing import build_llama

    dense = build_llama()
    expect_error(dense, qpass.LoraConfig(target_modules="all-linear"), QpassError, r"no quantized linear layer qpass recognises")


def test_dora_names_the_site(model):
    expect_error(model, qpass.LoraConfig(target_modules=["v_proj"], use_dora=True), ValueError,
                 r"model\.layers\.0\.self_attn\.v_proj: DoRA is not supported on quantized layers")


# ---- adapter directories -----------------------------------------------------------------------------

def test_missing_directory(model, tmp_path):
    expect_error(model, str(tmp_path / "nope"), AdapterLoadError, r"adapter directory .*nope' does not exist")


def test_directory_without_config(model, tmp_path):
    expect_error(model, str(tmp_path), AdapterLoadError, r"has no adapter_config\.json")


def test_corrupt_config_json(model, tmp_path, good_dir):
    (tmp_path / "adapter_config.json").write_text("{not json")
    expect_error(model, str(tmp_path), AdapterLoadError, r"adapter_config\.json is not valid JSON")


def test_truncated_safetensors(model, tmp_path, good_dir):
    (tmp_path / "adapter_config.json").write_text((good_dir / "adapter_config.json").read_text())
    data = (good_dir / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(model, str(tmp_path), AdapterLoadError, r"adapter_model\.safetensors is corrupt or truncated")


def test_missing_weights_file(model, tmp_path, good_dir):
    (tmp_path / "adapter_config.json").write_text((good_dir / "adapter_config.json").read_text())
    expect_error(model, str(tmp_path), AdapterLoadError, r"has neither adapter_model\.safetensors nor adapter_model\.bin")


def _rewrite_weights(src, dst, fn):
    from safetensors.torch import load_file, save_file

    dst.mkdir(exist_ok=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    save_file(fn(load_file(str(src / "adapter_model.safetensors"))), str(dst / "adapter_model.safetensors"))


def test_keys_for_modules_that_do_not_exist(model, tmp_path, good_dir):
    def add_ghost(w):
        w["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
        return w

    _rewrite_weights(good_dir, tmp_path / "a", add_ghost)
    expect_error(model, str(tmp_path / "a"), AdapterLoadError, r"belong to no targeted layer .*layers\.7\.self_attn\.q_proj")


def test_tensor_of_wrong_shape(model, tmp_path, good_dir):
    def bad_shape(w):
        k = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
        w[k] = torch.zeros(w[k].shape[0], 5)
        return w

    _rewrite_weights(good_dir, tmp_path / "b", bad_shape)
    expect_error(model, str(tmp_path / "b"), AdapterLoadError, r"layers\.1\.self_attn\.v_proj\.lora_B\.weight has shape \(32, 5\), this model needs \(32, 4\)")


def test_missing_tensor(model, tmp_path, good_dir):
    def drop(w):
        del w["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        return w

    _rewrite_weights(good_dir, tmp_path / "c", drop)
    expect_error(model, str(tmp_path / "c"), AdapterLoadError, r"missing tensor\(s\) \['model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight'\]")


def test_adapter_for_another_base(model, tmp_path):
    other = make_model(hidden_size=128, intermediate_size=256)
    peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    expect_error(model, str(tmp_path), AdapterLoadError, r"q_proj\.lora_A\.weight has shape \(4, 128\), this model needs \(4, 64\)")


def test_unsupported_peft_type(model, tmp_path, good_dir):
    data = json.loads((good_dir / "adapter_config.json").read_text())
    data["peft_type"] = "PROMPT_TUNING"
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    expect_error(model, str(tmp_path), QpassError, r"peft_type 'PROMPT_TUNING' is not supported by qpass")


# ---- state of the model ------------------------------------------------------------------------------

def test_failure_while_installing_is_rolled_back(monkeypatch):
    import importlib

    prep = importlib.import_module("qpass.prepare")

    model = make_model()
    before = snapshot(model)

    def boom(*a, **k):
        raise RuntimeError("injected failure while installing")

    monkeypatch.setattr(prep, "install", boom)
    with pytest.raises(RuntimeError, match="injected"):
        qpass.prepare(model, qpass.LoraConfig(target_modules="all-linear"))
    assert_unchanged(model, before)
    monkeypatch.undo()
    qpass.prepare(model, qpass.LoraConfig(target_modules="all-linear"))  # and it still prepares afterwards


def test_prepare_twice_and_compile_compiled():
    model = qpass.prepare(make_model(), qpass.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(QpassError, match=r"already prepared by qpass; use qpass\.load_adapter"):
        qpass.prepare(model, qpass.LoraConfig(target_modules=["q_proj"]))
    compiled = torch.compile(make_model(), backend="eager")
    with pytest.raises(QpassError, match=r"already wrapped by torch\.compile; .*\(model\._orig_mod\)"):
        qpass.compile(compiled, qpass.LoraConfig(target_modules=["q_proj"]))


def test_wrong_input_width_names_the_site():
    model = qpass.prepare(make_model(), qpass.LoraConfig(target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(QpassError, match=r"model\.layers\.0\.self_attn\.q_proj: input has 63 features, the layer expects 64"):
        layer(torch.randn(2, 63))


def test_input_the_sites_cannot_serve():
    model = qpass.prepare(make_model(), qpass.LoraConfig(target_modules=["q_proj"]))
    layer = model.model.layers[1].self_attn.q_proj
    with pytest.raises(QpassError, match=r"layers\.1\.self_attn\.q_proj: input dtype torch\.int64 cannot be served"):
        layer(torch.ones(2, 64, dtype=torch.long))
    with pytest.raises(QpassError, match=r"layers\.1\.self_attn\.q_proj: input is on meta but the layer's weights are on cpu"):
        layer(torch.empty(2, 64, device="meta"))
    compiled = torch.compile(torch.nn.Sequential(layer), backend=qpass.backend("eager"))
    with pytest.raises(QpassError, match=r"input dtype torch\.int32 cannot be served"):
        compiled(torch.ones(1, 3, 64, dtype=torch.int32))


def test_max_rank_must_be_positive():
    expect_error(make_model(), qpass.LoraConfig(target_modules=["q_proj"]), QpassError, r"max_rank must be a positive integer",
                 max_rank=0)


def test_report_before_prepare():
    with pytest.raises(QpassError, match=r"is not prepared by qpass; call qpass\.prepare"):
        qpass.report(make_model())


def test_bit_width_the_fast_kernel_cannot_serve_falls_back_and_says_so():
    """A bf16 decode step would take the int4 kernel; an 8-bit layer falls back to dequant + matmul, and the
    report's base column says why."""
    model = qpass.prepare(make_model(torch.bfloat16, bits=8), qpass.LoraConfig(r=2, target_modules=["q_proj"]))
    compiled = torch.compile(model, backend=qpass.backend("aot_eager"))
    with torch.no_grad():
        compiled(torch.randint(0, 256, (1, 1)))
    row = qpass.report(compiled).rows[0]
    assert row.status == "rewritten"
    assert row.base.startswith("torch-dequant (int4 kernel fallback: needs 4-bit GPTQ/AWQ packing")
    assert "this layer is 8-bit" in row.base
