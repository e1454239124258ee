"""`python -m qpass inspect` on a real local checkpoint (quantized by gptqmodel), run as a subprocess."""

import json
import os
import subprocess
import sys

import pytest

peft = pytest.importorskip("peft")

from ckpt_build import session_checkpoints

pytestmark = pytest.mark.slow


def run(*args):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "qpass", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return session_checkpoints(tmp_path_factory)


def test_inspect_json_with_targets_and_compile(checkpoints):
    proc = run("inspect", str(checkpoints["awq"]), "--target-modules", "q_proj", "v_proj", "-r", "4", "--json",
               "--compile", "--inner", "aot_eager")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # stdout holds only the JSON (library logs go to stderr)
    sites = {r["module"]: r for r in report["sites"]}
    adapted = [r for r in sites.values() if r["adapter"]]
    assert sorted(r["module"].rsplit(".", 1)[-1] for r in adapted) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert all(r["rank"] == 4 and r["method"] == "awq" and r["status"] == "rewritten" for r in adapted)
    # the base computation qpass chose, per site, under the inner backend asked for: qpass's gemv on AWQ's own
    # packing where its C++ kernels build, else aten's int4 kernel or the plain-torch dequantize
    from qpass import kernels

    want = ("gemv-cpu",) if kernels.available() else ("torch-dequant", "int4pack-")
    assert all(r["base"].endswith("(aot_eager)") and r["base"].startswith(want)
               for r in adapted), [r["base"] for r in adapted]
    assert report["summary"]["sites_rewritten"] == 4 and report["summary"]["graph_breaks"] == 0


def test_inspect_with_adapter_dir_prints_every_site(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoints["gptq"]), device_map="cpu")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["o_proj"])).save_pretrained(str(tmp_path))
    proc = run("inspect", str(checkpoints["gptq"]), "--adapter", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [l for l in proc.stdout.splitlines() if "_proj" in l]
    assert len(rows) == 14, proc.stdout  # every quantized layer, adapted or not
    assert all("gptqmodel /" in l and "torch (eager)" in l for l in rows), proc.stdout  # short label, legend below
    assert "torch dequant (eager): not compiled yet" in proc.stdout  # the legend
    assert "torch.compile compiles on the model's first call" in proc.stdout
    adapted = [l for l in rows if "lora:default" in l]
    assert len(adapted) == 2 and all("o_proj" in l and " prepared " in f" {l} " for l in adapted)
    assert "sites:" in proc.stdout and "trainable parameters" in proc.stdout


def test_inspect_errors_are_clear(tmp_path, checkpoints, capsys):
    proc = run("inspect", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "not a model directory" in proc.stderr
    from qpass.__main__ import main  # in-process: the exit code and message of a QpassError

    assert main(["inspect", str(checkpoints["gptq"]), "--target-modules", "no_such_layer"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "no_such_layer" in err and "q_proj" in err  # names what exists
