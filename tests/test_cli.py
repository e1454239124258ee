"""`python -m qpass inspect` on a real local checkpoint (quantized by gptqmodel), run as a subprocess."""

import json
import os
import subprocess
import sys
import time

import pytest

peft = pytest.importorskip("peft")

from ckpt_build import session_checkpoints

pytestmark = pytest.mark.slow


def test_help_answers_before_torch_is_imported():
    """`python -m qpass --help` parses arguments before importing torch (docs/design.md: Output)."""
    code = ("import sys, time\nt = time.perf_counter()\nfrom qpass.__main__ import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    imported, seconds = proc.stdout.split()[-2:]
    assert imported == "False" and "demo-checkpoint" in proc.stdout and "inspect" in proc.stdout, proc.stdout
    walls = []
    for _ in range(3):  # the whole command, interpreter start included; best of 3 on a shared machine
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qpass", "--help"], capture_output=True, check=True, timeout=120)
        walls.append(time.perf_counter() - start)
    assert min(walls) < 2.0, walls


def test_import_qpass_is_lazy_and_installs_the_hook_with_the_api():
    code = """
import sys
import qpass
assert "torch" not in sys.modules
assert set(qpass.__all__) <= set(dir(qpass))
qpass.LoraConfig, qpass.QpassError  # plain Python
assert "torch" not in sys.modules
prepare = qpass.prepare  # the first name that needs torch: the compile hook is installed with it
import torch._inductor.config as config
from qpass.compile_hook import QpassPreGradPass
passes = config.pre_grad_custom_pass
passes = passes if isinstance(passes, (list, tuple)) else [passes]
assert any(isinstance(p, QpassPreGradPass) for p in passes), passes
import qpass.prepare, qpass.backend, qpass.merge, qpass.report  # the submodules named like functions
assert callable(qpass.prepare) and qpass.prepare is prepare and callable(qpass.report) and callable(qpass.merge)
assert qpass.backend.__module__ == "qpass.backend" and callable(qpass.backend)
assert qpass.lowering.__name__ == "qpass.lowering"  # submodules stay reachable as attributes
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def run(*args):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "qpass", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return session_checkpoints(tmp_path_factory)


def test_demo_checkpoint_has_a_quantization_config(checkpoints):
    """`python -m qpass demo-checkpoint DIR --method M` (what built these) writes what from_pretrained reads."""
    for method, path in checkpoints.items():
        qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
        assert qcfg["quant_method"] == method and qcfg["bits"] == 4 and qcfg["group_size"] == 32, qcfg
        assert (path / "tokenizer.json").is_file() and (path / "model.safetensors").is_file()


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
    # stderr: qpass's progress lines, no third-party banner or INFO/WARN lines
    from test_readme import third_party_noise

    assert "qpass: loading " in proc.stderr and "qpass: loaded " in proc.stderr, proc.stderr
    assert not third_party_noise(proc.stderr), third_party_noise(proc.stderr)


def test_inspect_errors_are_clear(tmp_path, checkpoints, capsys):
    proc = run("inspect", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "not a model directory" in proc.stderr
    from qpass.__main__ import main  # in-process: the exit code and message of a QpassError
    from qpass.log import logger

    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        assert main(["inspect", str(checkpoints["gptq"]), "--target-modules", "no_such_layer"]) == 1
    finally:  # main() shows progress lines, as an entry point does: not for the rest of this test session
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    err = capsys.readouterr().err
    assert "error:" in err and "no_such_layer" in err and "q_proj" in err  # names what exists
