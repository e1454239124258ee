"""Every code block of README.md runs as written, and its figures come from a named source.

Each fenced block is classified (`_kind`); a block of no known kind fails `test_every_block_has_a_test`, so a new
README block needs a test here. What each kind gets:

* `setup`: `bash scripts/setup.sh && <command>` — the set-up half and the test command are exactly what `.ci/run`
  runs (set-up is not re-run here: it is what made this environment); the main command (the quickstart) is run
  by `test_main_command_quickstart`, from another directory, `.venv/bin/python` being this interpreter.
* `cli`: `.venv/bin/python -m qpass ...` lines, run one after the other in a fresh directory. A `demo-checkpoint`
  line is satisfied with the session's checkpoint of the same method, which tests/ckpt_build.py built with that
  very command (quantizing takes about a minute).
* `python`: run in a subprocess, in a fresh directory, as written (no preamble: the blocks are self-contained).
* `bench`: `benchmarks/*.py` lines: their arguments must parse (the full run takes 5-30 minutes; `--quick` is run
  by tests/test_benchmarks.py); `table.py` runs, and the README's result tables must be its output, character
  for character, for the results files they name.
* `text` (no language): not code — the architecture sketch, and the sample report, which must be labelled as an
  example run and have the rows the quickstart prints.
"""

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
VENV_PY = ".venv/bin/python"

# stderr lines of a qpass entry point that are not third-party noise: qpass's progress lines, progress bars
_OK_STDERR = [
    re.compile(r"^\d\d:\d\d:\d\d qpass: "),  # qpass.log.show_progress()
    re.compile(r"^train steps"),  # the quickstart's bar (tqdm)
    re.compile(r"^Loading weights:"),  # transformers' from_pretrained bar
    re.compile(r"qpass: "),  # a qpass warning (e.g. the CPU kernels could not be built) is information
]


def blocks():
    """(language, text, line number) of every fenced block."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", README, flags=re.S | re.M):
        out.append((m.group(1), m.group(2), README[:m.start()].count("\n") + 1))
    return out


def _kind(lang: str, text: str):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    if lang == "bash" and len(lines) == 1 and lines[0].startswith("bash scripts/setup.sh && "):
        return "setup"
    if lang == "bash" and all(l.startswith(f"{VENV_PY} -m qpass ") for l in lines):
        return "cli"
    if lang == "bash" and all(l.startswith(f"{VENV_PY} benchmarks/") for l in lines):
        return "bench"
    if lang == "python":
        return "python"
    if lang in ("", "text"):
        return "text"
    return None


def of_kind(kind):
    return [(text, line) for lang, text, line in blocks() if _kind(lang, text) == kind]


def third_party_noise(stderr: str) -> list:
    """The stderr lines of a qpass entry point that are neither qpass's own nor a progress bar."""
    noise = []
    for raw in stderr.splitlines():
        for line in raw.split("\r"):
            line = line.strip()
            if line and not any(p.search(line) for p in _OK_STDERR):
                noise.append(line)
    return noise


def run_timed(cmd, cwd, timeout=1800):
    """Run `cmd`; returns (returncode, stdout, stderr, the longest time in s with no output on either stream)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    chunks = {1: [], 2: []}
    stamps = [time.monotonic()]

    def pump(stream, key):
        for chunk in iter(lambda: os.read(stream.fileno(), 4096), b""):
            stamps.append(time.monotonic())
            chunks[key].append(chunk)

    threads = [threading.Thread(target=pump, args=(proc.stdout, 1)), threading.Thread(target=pump, args=(proc.stderr, 2))]
    for t in threads:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        proc.kill()
        for t in threads:
            t.join()
    stamps = sorted(stamps)
    gap = max(b - a for a, b in zip(stamps, stamps[1:])) if len(stamps) > 1 else 0.0
    return rc, b"".join(chunks[1]).decode(), b"".join(chunks[2]).decode(), gap


def test_every_block_has_a_test():
    found = blocks()
    assert found, "no code blocks found in README.md"
    unknown = [(line, lang, text[:80]) for lang, text, line in found if _kind(lang, text) is None]
    assert not unknown, f"README blocks no test runs (add a kind to tests/test_readme.py): {unknown}"
    assert len(of_kind("setup")) == 2 and of_kind("python") and of_kind("cli")


def test_setup_commands_are_what_ci_runs():
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.startswith("bash scripts/setup.sh")]
    assert len(ci) == 1
    main, tests = [text.strip() for text, _ in of_kind("setup")]
    assert tests == ci[0]  # the test command is exactly CI's
    assert main == f"bash scripts/setup.sh && {VENV_PY} examples/quickstart.py"
    assert (ROOT / "scripts" / "setup.sh").is_file() and (ROOT / "examples" / "quickstart.py").is_file()


# the longest silence allowed in the quickstart's output; the promise is 10 s on an unloaded 2-core machine
# (qpass prints a "still ..." line after 5 s), and a loaded CI machine may stall the process a few seconds more
QUICKSTART_MAX_SILENCE_S = 20.0


@pytest.mark.slow
def test_main_command_quickstart(tmp_path):
    """The README's main command (after set-up): rc 0, progress on stderr with no long silence and no
    third-party lines, and on stdout the report whose rows the README shows."""
    rc, out, err, gap = run_timed([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path)
    assert rc == 0, err[-3000:]
    assert not third_party_noise(err), third_party_noise(err)
    assert re.search(r"qpass: torch\.compile: compiled graph \S+ in [\d.]+ s", err), err[-3000:]
    assert gap <= QUICKSTART_MAX_SILENCE_S, f"{gap:.1f} s without output"
    assert "trained 8 steps" in out and (tmp_path / "out" / "quickstart-adapter" / "adapter_config.json").is_file()
    # the sample report in the README: same rows (module .. status, params), as printed by this run
    sample = _rows(_report_sample())
    assert len(sample) == 7 and sample == _rows(out), (sample, out)
    assert re.search(r"sites: 7 rewritten with adapters", out)


def _report_sample() -> str:
    samples = [text for text, _ in of_kind("text") if "sites:" in text and "trainable parameters" in text]
    assert len(samples) == 1
    return samples[0]


def _rows(report: str) -> list:
    """(module, library / class, bits, group, in→out, adapter, rank, policy, status, params) per site row: the
    columns that do not depend on the CPU (the `base` lowering does)."""
    rows = []
    for line in report.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 11 and re.match(r"^(\d+\.)?\w+\.\w+_proj$", cells[0]):
            rows.append(tuple(cells[:8] + cells[-2:]))
    return rows


def test_report_sample_is_labelled_as_an_example_run():
    line = README.index(_report_sample())
    before = README[max(0, line - 600):line]
    assert re.search(r"example run of `examples/quickstart\.py`", before), before
    assert re.search(r"\d{4}-\d\d-\d\d", before), "name the run: machine and date"


@pytest.mark.slow
def test_python_blocks_run_as_written(tmp_path):
    for i, (text, line) in enumerate(of_kind("python")):
        script = tmp_path / f"block_{line}.py"
        script.write_text(text)
        work = tmp_path / f"run_{i}"
        work.mkdir()
        proc = subprocess.run([sys.executable, str(script)], cwd=work, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"README block at line {line}:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from ckpt_build import session_checkpoints

    return session_checkpoints(tmp_path_factory, methods=("gptq",))


@pytest.mark.slow
def test_cli_blocks_run_as_written(tmp_path, checkpoints):
    for text, line in of_kind("cli"):
        work = tmp_path / f"cli_{line}"
        work.mkdir()
        for command in text.strip().splitlines():
            args = command.split()[3:]  # after `.venv/bin/python -m qpass`
            if args[0] == "demo-checkpoint":
                method = args[args.index("--method") + 1] if "--method" in args else "gptq"
                assert method == "gptq", "only the gptq checkpoint is built for this test"
                shutil.copytree(checkpoints[method], work / args[1])  # built by this very command (ckpt_build.py)
                continue
            proc = subprocess.run([sys.executable, "-m", "qpass", *args], cwd=work, capture_output=True, text=True,
                                  timeout=900)
            assert proc.returncode == 0, f"README line {line}: {command}\n{proc.stderr[-3000:]}"
            assert not third_party_noise(proc.stderr), third_party_noise(proc.stderr)
            if args[0] == "inspect":
                rows = [l for l in proc.stdout.splitlines() if "gptqmodel /" in l]
                assert len(rows) == 14, proc.stdout
                assert re.search(r"qpass: loaded \S+ in [\d.]+ s", proc.stderr), proc.stderr


def test_benchmark_commands_parse(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run as harness
        import table
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(harness, "run", lambda args: args)  # parse only: the full run takes 5-30 minutes
    for text, line in of_kind("bench"):
        for command in text.strip().splitlines():
            words = command.split("#")[0].split()
            script, args = words[1], words[2:]
            if script == "benchmarks/run.py":
                parsed = harness.main(args)
                assert parsed.out, command
            elif script == "benchmarks/table.py":
                assert not args
            else:
                pytest.fail(f"README line {line}: no check for {script}")
    assert table  # imported: the tables below are its output


def test_benchmark_tables_are_table_py_output(capsys):
    """Each results table in the README is `benchmarks/table.py`'s output for a results file the README names
    (benchmarks/results/...json), not typed in."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import table
    finally:
        sys.path.pop(0)
    headers = [m for m in re.finditer(r"^`benchmarks/run\.py[^`]*` — torch .*$", README, flags=re.M)]
    assert headers, "no results table found"
    outputs = {}
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):
        try:
            table.main(str(path))
        except (KeyError, TypeError, ValueError):
            capsys.readouterr()
            continue
        outputs[path] = capsys.readouterr().out.strip()
    for m in headers:
        chunk = README[m.start():]
        end = chunk.find("\n\n", chunk.find("| target |"))
        chunk = chunk[:end if end > 0 else None].strip()
        assert any(chunk == out for out in outputs.values()), f"README table at {m.group(0)[:80]} is no results file's"
