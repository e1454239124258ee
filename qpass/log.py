"""qpass's progress messages, and the quiet start qpass's own entry points give a run.

Library use stays silent: the `qpass` logger has a NullHandler and no level, so its INFO lines go nowhere
unless the application configures logging (`logging.basicConfig(level=logging.INFO)`, or
`logging.getLogger("qpass").setLevel(logging.INFO)` plus a handler).

Entry points (`python -m qpass`, examples/, benchmarks/run.py) call, first thing:

    quiet_third_party()   # before torch / transformers / gptqmodel are imported
    show_progress()       # qpass's INFO lines on stderr: "12:03:04 qpass: compiling graph 0/0 …"

What takes seconds is logged as a `Step`: a line when it starts, a line when it ends with its wall time, and,
while it runs, the first line again with the seconds so far whenever qpass has printed nothing for `HEARTBEAT_S`
seconds (the kernel build,
inductor's first compile of a graph: tens of seconds on a small CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings

logger = logging.getLogger("qpass")
logger.addHandler(logging.NullHandler())

HEARTBEAT_S = 5.0  # a `<what>… N s` line after this many seconds without a qpass line, while a step runs
# (the promise is a line at least every 10 s; a process busy in C code may hold the GIL for a few seconds more)

_lock = threading.Lock()
_active: list = []  # the steps running now, innermost last
_last_line = [0.0]  # time.monotonic() of qpass's latest progress line
_ticker: list = []  # the heartbeat thread, once started


def show_progress(level: int = logging.INFO) -> None:
    """Print qpass's progress lines on stderr (`HH:MM:SS qpass: message`). For entry points; idempotent."""
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s qpass: %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False  # a root handler configured too would print every line twice


class _Stderr(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when a line is written (pytest swaps it per test)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def info(msg: str, *args) -> None:
    """A progress line (INFO on the `qpass` logger); resets the heartbeat."""
    _last_line[0] = time.monotonic()
    logger.info(msg, *args)


class Step:
    """Something that takes seconds: `start()` logs `<what>…`, `end()` logs `<done> in N s`; between the two,
    `<what>… N s` whenever qpass has been silent for HEARTBEAT_S seconds. Also a context manager.
    Costs nothing (no line, no thread) when the `qpass` logger is not enabled for INFO."""

    def __init__(self, what: str, done: str | None = None, *, silent: bool = False):
        self.what, self.done, self.silent = what, done or f"done: {what}", silent
        self.t0 = None

    def start(self) -> "Step":
        self.t0 = time.monotonic()
        if not self.silent and logger.isEnabledFor(logging.INFO):
            info("%s…", self.what)
            with _lock:
                _active.append(self)
            _start_ticker()
        return self

    def end(self, failed: bool = False) -> float:
        elapsed = time.monotonic() - self.t0 if self.t0 is not None else 0.0
        with _lock:
            if self in _active:
                _active.remove(self)
            else:
                return elapsed
        if failed:
            info("%s: failed after %.1f s", self.what, elapsed)
        else:
            info("%s in %.1f s", self.done, elapsed)
        return elapsed

    def cancel(self) -> None:
        """Stop the heartbeat without a closing line."""
        with _lock:
            if self in _active:
                _active.remove(self)

    def __enter__(self) -> "Step":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(failed=exc_type is not None)


def _start_ticker() -> None:
    with _lock:
        if _ticker:
            return
        thread = threading.Thread(target=_tick, name="qpass-progress", daemon=True)
        _ticker.append(thread)
    thread.start()


def _tick() -> None:
    while True:
        time.sleep(1.0)
        with _lock:
            step = _active[-1] if _active else None
        if step is not None and time.monotonic() - _last_line[0] >= HEARTBEAT_S:
            info("%s… %d s", step.what, time.monotonic() - step.t0)


# ---- quiet third-party start-up -------------------------------------------------------------------------

# (logger name, text in the message): log lines that tell a qpass user nothing, dropped by a logging filter
_DROPPED_LOG_LINES = (
    # torch 2.14, when torchao (imported by gptqmodel) registers its Enums as pytree constants
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),
    # torch.utils.cpp_extension on import, on a machine with a CUDA toolkit and no GPU: qpass builds CPU code only
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
    # gptqmodel, choosing a kernel for a checkpoint on a CPU without AVX512-BF16: it picks another one, and qpass
    # computes the base of every site it rewrites itself
    ("logbar", "The GPTQ CPU AVX512-BF16 kernel requires"),
    # transformers, when optimum's GPTQ loader walks every attribute of the model (loss_function among them)
    ("transformers.modeling_utils", "was set in the config but it is unrecognized"),
    # transformers, loading any act-order GPTQ checkpoint (its GPTQConfig defaults act_group_aware to True)
    ("transformers.utils.quantization_config", "`act_group_aware` has been auto-disabled"),
)
# loggers whose INFO lines tell a qpass user nothing: set to WARNING
_WARNING_ONLY = ("tokenicer",)  # gptqmodel's tokenizer helper: "Tokenicer: Auto fixed pad_token_id=..."
# warnings that tell a qpass user nothing: (message regex, category)
_IGNORED_WARNINGS = (
    # optimum's GPTQ loader reads every attribute of the model, a deprecated alias among them
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)


class _DropLines(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party() -> None:
    """Silence the start-up banners and log lines of torch, gptqmodel and AutoAWQ that carry no information
    for a qpass user, through each library's own switches (environment, logging levels and filters, warning
    filters); nothing is patched. For entry points: call it before torch, transformers or gptqmodel is
    imported. What is left, and why, is listed in the README ("Output")."""
    # gptqmodel's "Python GIL is enabled ..." warning at import (its own switch)
    os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name, text in _DROPPED_LOG_LINES:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) and f.text == text for f in log.filters):
            log.addFilter(_DropLines(text))
    for name in _WARNING_ONLY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message, category in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    _quiet_gptqmodel()


def _quiet_gptqmodel() -> None:
    """gptqmodel logs through LogBar's shared logger (`logging.getLogger("logbar")`, created at INFO when
    gptqmodel is imported): its banner, `ENV: Auto setting ...` and `Optimize: ... compilation triggered` lines
    are INFO (its WARN lines go to stdout, the one above through `logging`'s last-resort handler to stderr).
    Creating that logger first and setting it to WARNING keeps its warnings and errors. LogBar prints
    an empty line when it creates the logger: that one goes to a discarded buffer."""
    import importlib.util

    if importlib.util.find_spec("logbar") is None:
        return
    import io

    from logbar import LogBar

    with contextlib.redirect_stdout(io.StringIO()):
        shared = LogBar.shared()
    shared.setLevel(logging.WARNING)


def import_autoawq_quietly() -> None:
    """Import autoawq (if installed) without its farewell notice. `import awq` puts
    `warnings.simplefilter("default", DeprecationWarning)` in front of every filter (so no filter can hide the
    notice it then issues) and leaves it there for the whole process; imported here, under
    `warnings.catch_warnings`, the notice is dropped, other warnings are re-issued, and the filters are
    restored."""
    if "awq" in sys.modules:
        return
    import importlib.util

    if importlib.util.find_spec("awq") is None:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import awq  # noqa: F401
    for w in caught:
        if "AutoAWQ is officially deprecated" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
