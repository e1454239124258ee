"""Keeps the benchmark harness working: `benchmarks/run.py --quick` end to end (tiny sizes, one repeat, the
decode and training workloads of qpass and PEFT: the other configurations and prefill reuse the same code
paths). Asserts the JSON's structure, the PNG, zero graph breaks in the qpass graphs and
the base lowering column; never time."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_harness_writes_json_and_plot(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run as harness
    finally:
        sys.path.pop(0)
    harness.main(["--quick", "--repeats", "1", "--warmup", "1", "--configs", "peft_eager,qpass", "--workloads", "decode,train",
                  "--out", str(tmp_path), "--profile-rows", "5", "--min-sample-ms", "10"])
    data = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.png").stat().st_size > 0
    res = data["results"]
    assert set(res) == {"peft_eager", "qpass"}
    for wl in ("decode", "train"):
        assert res["qpass"][wl]["median_ms"] > 0 and res["qpass"][wl]["graph_breaks"] == 0
        assert res["peft_eager"][wl]["n"] == 1
        assert all(1 <= r[wl]["calls_per_sample"] <= 50 for r in res.values() if wl in r)  # back-to-back calls
    assert any(b.startswith("gemv-cpu") for b in res["qpass"]["base_lowering"])  # decode, on the library layout
    assert any("dequant-cpu" in b for b in res["qpass"]["base_lowering"])  # training: C++ unpack + GEMM
    assert res["qpass"]["repacked_bytes"] == 0  # no copy of the weights
    assert {t["target"] for t in data["targets"]} >= {"train step vs PEFT eager", "decode vs PEFT eager TorchLinear"}
    assert data["profile_decode"] and "recompiles" not in data  # the recompile check needs prefill
