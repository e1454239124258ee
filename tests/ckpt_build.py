"""Real checkpoints for the tests: a tiny Llama quantized by gptqmodel itself (GPTQ or AWQ), offline.

    python tests/ckpt_build.py gptq|awq OUT_DIR      # the same as: python -m qpass demo-checkpoint OUT_DIR --method ...

The checkpoint is `qpass.testing.write_demo_checkpoint`'s. `session_checkpoints` builds them through the README's
command (`python -m qpass demo-checkpoint`), each in a process of its own: gptqmodel's quantizer sets
process-global state (thread pools, inductor options) that must not leak into the tests.
"""

import os
import sys


def session_checkpoints(tmp_path_factory, methods=("gptq", "awq")) -> dict:
    """method -> checkpoint dir, built once per pytest run and shared by every test module that asks; under
    pytest-xdist by every worker too (the workers' common temporary folder, one builder at a time)."""
    from pathlib import Path

    from filelock import FileLock

    base = Path(tmp_path_factory.getbasetemp())
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "qpass-checkpoints"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / ".lock")):
        _build_missing(root, methods)
    return {m: root / m for m in methods}


def _build_missing(root, methods) -> None:
    import subprocess

    todo = [m for m in methods if not (root / m / "config.json").is_file()]
    # gptqmodel 7.7 on a 2-core machine: `Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only
    # has 1` unless GPTQMODEL_CPU_WORKERS=2 (write_demo_checkpoint sets it too)
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", TOKENIZERS_PARALLELISM="false")
    procs = {m: subprocess.Popen([sys.executable, "-m", "qpass", "demo-checkpoint", str(root / m), "--method", m],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for m in todo}
    for m, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"quantizing the {m} checkpoint with gptqmodel failed:\n{err[-3000:]}")


if __name__ == "__main__":
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from qpass.testing import write_demo_checkpoint

    write_demo_checkpoint(sys.argv[2], sys.argv[1])
