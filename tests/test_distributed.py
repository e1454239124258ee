"""Data-parallel training with qpass under torch.compile: 2 processes, gloo, CPU.

After 3 SGD steps the adapter weights of DDP (and FSDP2 `fully_shard`) training equal single-process
training on the same global batch."""

import os
import subprocess
import sys

import pytest
import torch

from ddp_train import LAYERS

HERE = os.path.dirname(__file__)
TOL = 1e-5  # fp32; measured difference ~7e-8 (gradient all-reduce order)


def _run(tmp_path, name, *args):
    out = tmp_path / f"{name}.pt"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "ddp_train.py"), str(out), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), "single", "--world", "1")


@pytest.mark.slow
@pytest.mark.parametrize("mode, port", [("ddp", "29611"), ("fsdp2", "29622")])
def test_data_parallel_equals_single_process(tmp_path, single, mode, port):
    result = _run(tmp_path, mode, "--world", "2", "--mode", mode, "--port", port)
    assert result["state"].keys() == single["state"].keys() and len(single["state"]) == 2 * 7 * LAYERS  # A and B per site
    moved = max((v - single["state"][k]).abs().max().item() for k, v in result["state"].items())
    assert moved <= TOL, f"{mode}: adapters differ from single-process training by {moved:.3g}"
    # and training moved them (the comparison is not between untouched initial values)
    assert any(v.abs().sum() > 0 for k, v in single["state"].items() if "lora_B" in k)
