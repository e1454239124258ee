"""Reliability over time and threads: 400 compiled training steps (no recompile, flat memory, loss down),
and one compiled model serving 4 threads at once with the same outputs as sequential calls."""

import threading

import psutil
import pytest
import torch

import qpass

from conftest import input_ids, make_model, randomize_adapters


# 400 steps: memory that grows per step shows well before then (resident memory compared at steps 100 and 399)
STEPS = 400


@pytest.mark.slow
def test_400_training_steps_no_recompile_flat_memory():
    torch.manual_seed(0)
    model = make_model()
    compiled = qpass.compile(model, qpass.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.05))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = input_ids(batch=4, seq=16, seed=5)
    labels = ids  # memorise a fixed batch (the model shifts labels itself)
    proc = psutil.Process()
    losses, rss = [], {}
    for step in range(STEPS):
        loss = compiled(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step in (100, STEPS - 1):
            rss[step] = proc.memory_info().rss
    stats = qpass.report(compiled).stats
    assert stats.recompiles == 0 and stats.graphs == 1, (stats.recompiles, stats.graphs)
    growth = rss[STEPS - 1] / rss[100] - 1
    assert growth < 0.05, f"resident memory grew {growth:.1%} between step 100 and {STEPS}"
    first, middle, last = (sum(losses[a:a + 20]) / 20 for a in (0, STEPS // 2 - 10, STEPS - 20))
    assert last < middle < first and last < 0.9 * first, (first, middle, last)


def test_four_threads_match_sequential():
    model = qpass.prepare(make_model(), qpass.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    compiled = torch.compile(model, backend=qpass.backend("inductor"))
    inputs = [input_ids(seed=s) for s in range(8)]
    with torch.no_grad():
        compiled(inputs[0])  # compile once before serving
        sequential = [compiled(x).logits for x in inputs]
    results = [None] * len(inputs)
    errors = []
    start = threading.Barrier(4)

    def worker(k):
        try:
            start.wait()
            with torch.no_grad():
                for i in range(k, len(inputs), 4):
                    results[i] = compiled(inputs[i]).logits
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, sequential):
        assert torch.equal(got, want)
    assert qpass.report(compiled).stats.recompiles == 0
