"""All-or-nothing changes and atomic swaps (the cases are in tests/rollback_cases.py), run in a child pytest.

Why a child process: after rollback_cases' interrupted hot-swaps (a KeyboardInterrupt raised by a
`sys.settrace` tracer at lines spread over qpass's code), a later *compiled training* test in the same pytest
process produced outputs without a grad_fn (tests/test_compile.py::test_gradient_reaches_the_input_through_the_
quantized_base after test_hotswap_adapter). The model under test compares equal field by field after every
interrupt, and neither eager forwards nor a compiled training step in a plain script reproduce it, so the
process-global state involved is not found yet (README: Limits). The child keeps it from reaching other tests.
"""

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.slow
def test_rollback_cases_in_their_own_process():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "rollback_cases.py")],
                          cwd=HERE.parent, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
