"""Faults at the file boundary end in a clear error or a correct result, never a half-written folder.

- Saving (`qpass.save_adapter`, `qpass.save_quantized`) is all or nothing: a full disk or a Ctrl-C in the
  middle of writing leaves an existing adapter / checkpoint byte for byte as it was and no temporary folder.
- Messages name the field the user must change (`layers_to_transform`, `layers_pattern`, `exclude_modules`,
  the adapter file's tensors against its config).
- NaN/inf adapter weights read from a file are announced (a warning naming the tensors, and the report).

Real gptqmodel layers throughout (one-layer tiny Llamas where the layer count does not matter), eager only.
"""

import errno
import json
import os
import warnings

import pytest
import torch

import qpass
from qpass.errors import AdapterLoadError, QpassError, QpassWarning

from conftest import input_ids, make_model, randomize_adapters

peft = pytest.importorskip("peft")

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
EXACT = 1e-6  # fp32, same weights, same eager path: the logits agree to rounding (they are in fact equal)


def small():
    return make_model()


def prepared(r=4, seed=0, targets=("q_proj", "v_proj")):
    model = qpass.prepare(small(), qpass.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets))).eval()
    randomize_adapters(model, seed=seed)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def leftovers(parent):
    return [n for n in os.listdir(parent) if ".qpass-" in n]


def failing_save_file(exc):
    """safetensors' save_file as a full disk (or a Ctrl-C) meets it: part of the file written, then the error."""

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise exc

    return save_file


FAILURES = {
    "disk-full": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OSError),
    "ctrl-c": (KeyboardInterrupt(), KeyboardInterrupt),
}


# ---- atomic save_adapter ------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_save_adapter_leaves_the_old_adapter_intact(tmp_path, monkeypatch, failure):
    import safetensors.torch

    ids = input_ids()
    old_model = prepared(r=4, seed=0)
    target = tmp_path / "adapter"
    qpass.save_adapter(old_model, target)
    (target / "README.md").write_text("my notes\n")  # a file of the user's own
    before = files(target)
    ref = logits(old_model, ids)

    new_model = prepared(r=2, seed=1)  # another rank: a mixed folder (new config, old weights) would not load
    exc, kind = FAILURES[failure]
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file(exc))
    with pytest.raises(kind) as raised:
        qpass.save_adapter(new_model, target)
    if kind is OSError:
        assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()

    assert files(target) == before, "config, weights and the user's file byte-identical"
    assert leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["adapter"]
    again = qpass.prepare(small(), str(target)).eval()
    assert (logits(again, ids) - ref).abs().max().item() <= EXACT

    # and once the disk has room again, the save replaces the adapter whole and keeps the user's file
    qpass.save_adapter(new_model, target)
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 2
    assert (target / "README.md").read_text() == "my notes\n" and leftovers(tmp_path) == []
    assert (logits(qpass.prepare(small(), str(target)).eval(), ids) - logits(new_model, ids)).abs().max().item() <= EXACT


def test_failed_save_adapter_to_a_new_path_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    model = prepared()
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        qpass.save_adapter(model, tmp_path / "new")
    assert os.listdir(tmp_path) == []


def test_save_adapter_replaces_an_earlier_adapter_whole(tmp_path):
    """An adapter's own files from an earlier save (here a legacy adapter_model.bin) do not survive next to the
    new ones; other files and folders do."""
    ids = input_ids()
    target = tmp_path / "a"
    (target / "notes").mkdir(parents=True)
    (target / "notes" / "run.txt").write_text("lr=1e-4\n")
    (target / "adapter_model.bin").write_bytes(b"stale weights")
    (target / "adapter_config.json").write_text("{}")
    model = prepared()
    qpass.save_adapter(model, target)
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors", "notes"]
    assert (target / "notes" / "run.txt").read_text() == "lr=1e-4\n" and leftovers(tmp_path) == []
    assert (logits(qpass.prepare(small(), str(target)).eval(), ids) - logits(model, ids)).abs().max().item() <= EXACT


def test_save_adapter_onto_a_file_names_the_path(tmp_path):
    model = prepared()
    file = tmp_path / "adapter.safetensors"
    file.write_bytes(b"not a folder")
    with pytest.raises(QpassError, match=rf"cannot save the adapter to '{file}': it is an existing file, not a folder; "
                                         r"qpass writes a folder \(adapter_config\.json and adapter_model\.safetensors\) "
                                         r"there\. Pass the path of a new or existing folder, or move the file away"):
        qpass.save_adapter(model, file)
    with pytest.raises(QpassError, match=rf"it is under '{file}', which is an existing file, not a folder"):
        qpass.save_adapter(model, file / "sub")
    assert file.read_bytes() == b"not a folder" and os.listdir(tmp_path) == ["adapter.safetensors"]


def test_save_adapter_to_the_working_directory_is_refused(tmp_path, monkeypatch):
    model = prepared()
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QpassError, match=r"cannot save the adapter to '\.': it is the working directory or holds it.* "
                                         r"Save to a subfolder, e\.g\. '\./adapter'"):
        qpass.save_adapter(model, ".")
    assert os.listdir(tmp_path) == ["keep.txt"] and os.getcwd() == str(tmp_path)


# ---- atomic save_quantized -----------------------------------------------------------------------------


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_save_quantized_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch, failure):
    import transformers.modeling_utils

    target = tmp_path / "ckpt"
    qpass.save_quantized(small(), target)
    (target / "tokenizer.json").write_text("{}")
    before = files(target)
    assert "model.safetensors" in before

    exc, kind = FAILURES[failure]
    other = make_model(seed=1)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failing_save_file(exc))
    with pytest.raises(kind):
        qpass.save_quantized(other, target)
    monkeypatch.undo()
    assert files(target) == before and leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["ckpt"]

    # a stale shard of an earlier (sharded) save is not carried into the new checkpoint; the tokenizer is
    (target / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    qpass.save_quantized(other, target)
    after = files(target)
    assert "model-00002-of-00002.safetensors" not in after and after["tokenizer.json"] == b"{}"
    assert after["model.safetensors"] != before["model.safetensors"] and leftovers(tmp_path) == []


def test_save_quantized_onto_a_file_names_the_path(tmp_path):
    file = tmp_path / "ckpt"
    file.write_text("x")
    with pytest.raises(QpassError, match=r"cannot save the checkpoint to '.*ckpt': it is an existing file, not a folder"):
        qpass.save_quantized(small(), file)
    assert file.read_text() == "x"


# ---- messages that name the field ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_layers():
    return make_model(num_hidden_layers=2)


def _refused(model, cfg, pattern):
    with pytest.raises(QpassError, match=pattern) as raised:
        qpass.prepare(model, cfg)
    assert getattr(model, "_qpass", None) is None
    assert "matches no quantized layer" not in str(raised.value), "target_modules is not the field at fault"
    return str(raised.value)


def test_layers_to_transform_out_of_range_names_the_field_and_the_layers(two_layers):
    _refused(two_layers, qpass.LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]),
             r"layers_to_transform=\[5\] selects none of the 2 quantized layers target_modules=\['q_proj'\] matches: "
             r"their layer indices \(the number after 'layers\.' in the path, e\.g\. 'model\.layers\.0\.self_attn\.q_proj'\) "
             r"are \[0, 1\]; set layers_to_transform to some of \[0, 1\], or unset it")
    _refused(two_layers, qpass.LoraConfig(target_modules=["q_proj"], layers_to_transform=3, layers_pattern="layers"),
             r"layers_to_transform=3 with layers_pattern='layers' selects none .* are \[0, 1\]")


def test_layers_pattern_not_in_the_paths_names_it(two_layers):
    _refused(two_layers, qpass.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"),
             r"layers_pattern='blocks' is in none of the paths target_modules=\['q_proj'\] matches .*set layers_pattern "
             r"to the name before the layer index \(here 'layers': layers \[0, 1\]\), or unset it")


def test_exclude_modules_excluding_everything_names_it(two_layers):
    _refused(two_layers, qpass.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]),
             r"exclude_modules=\['q_proj'\] excludes every quantized layer target_modules=\['q_proj'\] matches \(2, ")


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft")
    pm = peft.get_peft_model(small(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    pm.save_pretrained(str(path))
    return path


def _edit_weights(src, dst, fn, config=None):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    data = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**data, **(config or {})}))
    save_file(fn(load_file(str(src / "adapter_model.safetensors"))), str(dst / "adapter_model.safetensors"))
    return str(dst)


def test_extra_tensor_on_a_targeted_layer_is_not_blamed_on_the_base_model(peft_dir, tmp_path):
    def add_bias(w):
        w[f"base_model.model.{Q}.lora_A.bias"] = torch.zeros(4)
        return w

    model = small()
    path = _edit_weights(peft_dir, tmp_path / "a", add_bias)
    with pytest.raises(AdapterLoadError) as raised:
        qpass.prepare(model, path)
    msg = str(raised.value)
    assert f"layer {Q} is targeted, but the tensor 'lora_A.bias' there is not one a 'lora' adapter with this config has: " \
           "that layer's tensors are ['lora_A.weight', 'lora_B.weight']" in msg
    assert "saved with other options than its config says (e.g. lora_bias=True) or by another adapter kind" in msg
    assert "belong to no targeted layer" not in msg and "another base model" not in msg
    assert getattr(model, "_qpass", None) is None


def test_lora_bias_tensors_under_a_config_without_lora_bias(tmp_path):
    """PEFT saved with lora_bias=True; the config says false (edited by hand, or written by an older tool)."""
    saved = tmp_path / "saved"
    pm = peft.get_peft_model(small(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    pm.save_pretrained(str(saved))
    path = _edit_weights(saved, tmp_path / "b", lambda w: w, config={"lora_bias": False})
    with pytest.raises(AdapterLoadError, match=rf"layer {Q} is targeted, but the tensor 'lora_B\.bias' there .* it was "
                                              r"saved with lora_bias=True \(a bias on lora_B\) while its config says "
                                              r"lora_bias=false\. Fix adapter_config\.json"):
        qpass.prepare(small(), path)
    qpass.prepare(small(), str(saved))  # the folder as PEFT wrote it loads


# ---- non-finite adapter weights ------------------------------------------------------------------------


def _poison(w):
    w[f"base_model.model.{Q}.lora_A.weight"][0, 0] = float("nan")
    w[f"base_model.model.{V}.lora_B.weight"][1, 0] = float("inf")
    return w


def test_nan_weights_from_a_folder_warn_and_show_in_the_report(peft_dir, tmp_path):
    path = _edit_weights(peft_dir, tmp_path / "nan", _poison)
    with pytest.warns(QpassWarning, match=r"nan: 2 adapter tensor\(s\) hold NaN or inf values: "
                                          rf"\['{Q}\.lora_A\.weight', '{V}\.lora_B\.weight'\]; every layer they adapt"):
        model = qpass.prepare(small(), path)
    names = [f"{Q}.qpass_adapters.default.lora_A.weight", f"{V}.qpass_adapters.default.lora_B.weight"]
    report = qpass.report(model)
    assert report.summary()["nonfinite_adapter_weights"] == names
    assert report.to_dict()["summary"]["nonfinite_adapter_weights"] == names
    assert "non-finite adapter weights: 2 tensor(s) hold NaN or inf, the layers they adapt output NaN/inf: " \
           + ", ".join(names) in str(report).replace("\n  ", " ")

    # load_adapter and hotswap_adapter read through the same check
    with pytest.warns(QpassWarning, match=r"2 adapter tensor\(s\) hold NaN or inf"):
        qpass.load_adapter(model, path, "second")
    assert len(report.summary()["nonfinite_adapter_weights"]) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite adapter: no warning
        qpass.hotswap_adapter(model, str(peft_dir), "default")
        qpass.hotswap_adapter(model, str(peft_dir), "second")
    assert report.summary()["nonfinite_adapter_weights"] == [] and "non-finite" not in str(report)
    with pytest.warns(QpassWarning, match=r"2 adapter tensor\(s\) hold NaN or inf"):
        qpass.hotswap_adapter(model, path, "second")
    assert report.summary()["nonfinite_adapter_weights"] == [n.replace("default", "second") for n in names]


def test_many_nonfinite_tensors_are_counted(peft_dir, tmp_path):
    def all_nan(w):
        return {k: torch.full_like(v, float("nan")) for k, v in w.items()}

    path = _edit_weights(peft_dir, tmp_path / "all", all_nan)
    with pytest.warns(QpassWarning, match=r"4 adapter tensor\(s\) hold NaN or inf values: \[.*\] and 1 more;"):
        qpass.prepare(small(), path)


def test_nan_weights_handed_over_by_peft_warn(peft_dir):
    pm = peft.PeftModel.from_pretrained(small(), str(peft_dir))
    with torch.no_grad():
        pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.warns(QpassWarning, match=rf"1 adapter tensor\(s\) hold NaN or inf values: \['{Q}\.lora_B\.weight'\]"):
        model = qpass.from_peft(pm)
    assert qpass.report(model).summary()["nonfinite_adapter_weights"] == [f"{Q}.qpass_adapters.default.lora_B.weight"]
