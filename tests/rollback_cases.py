"""All-or-nothing: a KeyboardInterrupt at any line of qpass's code leaves the model exactly as it was (run by test_rollback.py).

Each operation is first run once to count the lines of qpass code it executes; it is then run again with a
KeyboardInterrupt raised at evenly spread lines among those (mid pool build, mid tensor copy, mid config
update, ...), on the same model: each interrupted run must have put everything back — module types,
attributes, hooks, parameter identity and storage, requires_grad, training flags, buffer and parameter
values, qpass's state and registries — and the model must still give the same outputs and accept the
operation afterwards.
"""

import os
import sys
import threading

import pytest
import torch

import qpass
from qpass import pool, site as site_mod

from conftest import input_ids, make_model, randomize_adapters

peft = pytest.importorskip("peft")

QPASS_DIR = os.path.dirname(qpass.__file__)
SKIP = {os.path.join(QPASS_DIR, "transaction.py")}  # the rollback itself is not what is interrupted
POINTS = 24  # interrupts per operation


class _Interrupt:
    """A tracer that counts lines executed in qpass's code and raises KeyboardInterrupt at line `at`.
    `committed`: the count when the last `transaction.changing` block ended (its generator resumed for the
    last time); a line after it runs once the change is complete, so an interrupt there is not a failure."""

    def __init__(self, at=None):
        self.at, self.count, self.committed = at, 0, 0

    def _local(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count == self.at:
                raise KeyboardInterrupt(f"injected at line {self.count}: {frame.f_code.co_filename}:{frame.f_lineno}")
        return self._local

    def __call__(self, frame, event, arg):
        filename = frame.f_code.co_filename
        if filename in SKIP:
            if frame.f_code.co_name == "changing":
                self.committed = self.count
            return None
        if filename.startswith(QPASS_DIR):
            return self._local
        return None

    def run(self, fn):
        sys.settrace(self)
        threading.settrace(self)
        try:
            return fn()
        finally:
            sys.settrace(None)
            threading.settrace(None)


def fingerprint(model):
    fp = {}
    for name, m in model.named_modules():
        fp[name] = (type(m), m.training, sorted(m.__dict__),
                    {k: tuple(v) for k, v in m.__dict__.items() if "hooks" in k and isinstance(v, dict)})
        for pname, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None:
                fp[f"{name}.{pname}"] = (id(t), t.requires_grad, t.dtype, tuple(t.shape), t.stride(), t.data_ptr(),
                                         t.detach().clone())
    state = model.__dict__.get("_qpass")
    if state is not None:
        fp["_qpass"] = (
            sorted(state.configs), state.pool.key, state.pool.retired, state.pool.stale, str(state.report.to_dict()),
            {p: (s.id, s.active, s.disabled, s.trace_key, s.pool, tuple(s.slots), s.info) for p, s in state.sites.items()},
            {f"{p}.{n}": (slot.trace_key, slot.cfg, slot.dropout_p, slot.pool_entry)
             for p, s in state.sites.items() for n, slot in s.slots.items()},
        )
        fp["registries"] = ({s.id for s in state.sites.values()} <= set(site_mod._SITES),
                            state.pool.key is None or state.pool.key in pool._POOLS)
    return fp


def assert_same(before, after):
    assert before.keys() == after.keys()
    for key, want in before.items():
        have = after[key]
        if isinstance(want, tuple) and want and isinstance(want[-1], torch.Tensor):
            assert have[:-1] == want[:-1], key
            assert torch.equal(have[-1], want[-1]), key
        else:
            assert have == want, key


def check_interrupted_anywhere(make, op, ids=None):
    """`op(model)` interrupted at POINTS lines spread over the qpass code it runs (counted on a twin from
    `make()`), on one model from `make()`: after each, exactly as before; afterwards the same outputs, and
    `op` still succeeds. Returns the model after that successful run."""
    op(make())  # first run: lazy imports and caches would be counted as lines
    counter = _Interrupt()
    twin = make()
    counter.run(lambda: op(twin))
    assert counter.committed > 20, "the operation ran no qpass code"
    model = make()
    ids = input_ids() if ids is None else ids
    before = fingerprint(model)
    prepared = "_qpass" in model.__dict__  # (a plain gptqmodel layer's first forward compiles: slow, and not ours)
    with torch.no_grad():
        want = model(ids).logits if prepared else None
    for at in sorted({1 + (counter.committed - 1) * i // (POINTS - 1) for i in range(POINTS)}):
        with pytest.raises(KeyboardInterrupt):
            _Interrupt(at).run(lambda: op(model))
        assert_same(before, fingerprint(model))
    if prepared:
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    op(model)  # not refused afterwards (e.g. "already loaded")
    return model


def _lora_dir(path, seed, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj")):
    model = peft.get_peft_model(make_model(), peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                               target_modules=list(targets)))
    randomize_adapters(model, seed=seed)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {s: _lora_dir(tmp_path_factory.mktemp(f"a{s}"), s, r=2 * s, dropout=0.1 * s) for s in (1, 2)}


def _prepared(dirs, **kw):
    return lambda: qpass.prepare(make_model(**kw), dirs[1])


def test_prepare(dirs):
    check_interrupted_anywhere(make_model, lambda m: qpass.prepare(m, dirs[1]))


def test_prepare_int4pack():
    cfg = qpass.LoraConfig(target_modules="all-linear")
    check_interrupted_anywhere(lambda: make_model(torch.bfloat16).to(torch.bfloat16),
                               lambda m: qpass.prepare(m, cfg, base_layout="int4pack"))


def test_load_adapter(dirs):
    check_interrupted_anywhere(_prepared(dirs), lambda m: qpass.load_adapter(m, dirs[2], "b", is_trainable=True))


def test_hotswap_adapter(dirs):
    make = lambda: qpass.prepare(make_model(), dirs[1], max_rank=8)
    model = check_interrupted_anywhere(make, lambda m: qpass.hotswap_adapter(m, dirs[2]))
    fresh = qpass.prepare(make_model(), dirs[2])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, fresh(input_ids()).logits, rtol=0, atol=2e-6)


def test_set_adapter(dirs):
    def make():
        model = qpass.prepare(make_model(), dirs[1])
        qpass.load_adapter(model, dirs[2], "b")
        return model

    check_interrupted_anywhere(make, lambda m: qpass.set_adapter(m, ["default", "b"]))


def test_unprepare_int4pack():
    cfg = qpass.LoraConfig(target_modules="all-linear", init_lora_weights=False)
    check_interrupted_anywhere(lambda: qpass.prepare(make_model(torch.bfloat16).to(torch.bfloat16), cfg, base_layout="int4pack"),
                               qpass.unprepare)


def test_merge(dirs):
    check_interrupted_anywhere(_prepared(dirs), lambda m: qpass.merge(m, max_rel_error=1.0, max_adapter_loss=1.0))


# ---- swaps and running forwards ----------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "qpass.compile"])
def test_forwards_running_during_hotswaps_see_one_adapter_or_the_other(tmp_path, compiled):
    """A forward in another thread sees adapter A or adapter B whole, never a mix (README: Limits, Threads)."""
    a, b = _lora_dir(tmp_path / "a", 1), _lora_dir(tmp_path / "b", 2)
    model = make_model()
    model = qpass.compile(model, a, inner="aot_eager") if compiled else qpass.prepare(model, a)
    ids = input_ids(batch=4, seq=32)
    with torch.no_grad():
        want = {"a": model(ids).logits.clone()}
        qpass.hotswap_adapter(model, b)
        want["b"] = model(ids).logits.clone()
    assert (want["a"] - want["b"]).abs().max() > 1e-2  # the two adapters are told apart
    seen, stop = [], threading.Event()

    def forwards():
        with torch.no_grad():
            while not stop.is_set():
                seen.append(model(ids).logits.clone())

    thread = threading.Thread(target=forwards)
    thread.start()
    try:
        for i in range(30):
            qpass.hotswap_adapter(model, a if i % 2 == 0 else b)
    finally:
        stop.set()
        thread.join()
    assert len(seen) >= 3
    mixed = [i for i, out in enumerate(seen) if not (torch.equal(out, want["a"]) or torch.equal(out, want["b"]))]
    assert not mixed, f"{len(mixed)} of {len(seen)} outputs match neither adapter"


def test_a_swap_from_inside_a_forward_is_refused(dirs):
    model = qpass.prepare(make_model(), dirs[1])
    qpass.load_adapter(model, dirs[2], "b")
    hook = model.model.layers[0].register_forward_pre_hook(lambda *_: qpass.set_adapter(model, "b"))
    with pytest.raises(qpass.QpassError, match="set_adapter was called from inside a forward of this model"):
        model(input_ids())
    hook.remove()
    assert qpass.active_adapters(model) == ("default",)
    with torch.no_grad():
        model(input_ids())  # the lock was released when the forward raised


def test_set_adapter_refuses_a_name_given_twice(dirs):
    model = qpass.prepare(make_model(), dirs[1])
    with pytest.raises(qpass.QpassError, match=r"'default' is named more than once in \['default', 'default'\]"):
        qpass.set_adapter(model, ["default", "default"])
    assert qpass.active_adapters(model) == ("default",)
