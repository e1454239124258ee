"""The printed report tells the truth at every moment and fits a 160-column terminal: before the first call it
says that torch.compile compiles then; after it, each row shows a short label for its base, explained once in
the legend under the table; to_dict() keeps the full text."""

import re

import torch
from torch import nn

import qpass
from qpass import lowering
from qpass.report import Report, Row
from conftest import input_ids, make_model as tiny_llama


def make_model(*args, **llama):
    """Two decoder layers: the report shortens paths to what follows their common prefix, model.layers."""
    return tiny_llama(*args, **{"num_hidden_layers": 2, **llama})


WIDTH = 160
DEQ = "dequant-cpu (C++ unpack + GEMM, no copy)"
GEMV = "gemv-cpu (library layout, no copy)"
FALLBACK = ("int4 kernel fallback: needs 4-bit GPTQ/AWQ packing, group in (32, 64, 128, 256); "
            "this layer is 3-bit, group 32, TorchLinear")
NOT_INT4PACK = "not int4pack: act-order GPTQ in the library layout cannot be held in the int4pack layout"
SKIP_REASON = ("TorchFusedLinear's CPU repack (run by its first eval forward) zeroed the asymmetric zero points, "
               "so the weights are lost; prepare the model before running it, or load it with BACKEND.TORCH")
UNKNOWN = "some future lowering with a long description of itself"
SUMMARY_KEYS = {"sites_rewritten", "sites_prepared", "sites_base_only", "sites_skipped", "trainable_params",
                "trainable_percent", "graphs", "graph_breaks", "graph_break_reasons", "recompiles",
                "compile_seconds", "backend"}


def _fits(text):
    too_long = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not too_long, "\n".join(too_long)


def _parts(text):
    """(table lines without header and dashes, legend lines, the whole text) of a printed report."""
    lines = text.splitlines()
    dashes = next(i for i, l in enumerate(lines) if l.startswith("---"))
    end = lines.index("", dashes)
    table = lines[dashes + 1:end]
    legend = []
    if end + 1 < len(lines) and lines[end + 1].startswith("legend"):
        legend = lines[end + 1:lines.index("", end + 1)]
    return table, legend, lines


def _norm(text):
    return " ".join(text.split())


def _legend_has(legend, key, description):
    """The legend lists `key` once, followed by `description` (possibly wrapped onto further lines)."""
    starts = [l for l in legend if l.startswith(f"  {key} ")]
    assert len(starts) == 1, (key, legend)
    assert f"{key} {_norm(description)}" in _norm("\n".join(legend)), (key, description, legend)


def _line_of(table, module):
    found = [l for l in table if l.startswith(module + " ")]
    assert len(found) == 1, (module, table)
    return found[0]


def test_report_before_and_after_the_first_call():
    cfg = qpass.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    compiled = qpass.compile(make_model(), cfg, inner="aot_eager")
    report = qpass.report(compiled)
    adapted = [r for r in report.rows if r.adapter]
    base_only = [r for r in report.rows if not r.adapter]
    assert len(adapted) == 12 and len(base_only) == 2  # down_proj × 2 layers

    before = str(report)
    _fits(before)
    assert report.summary()["pending_first_call"] is True
    assert report.stats.graphs == 0 and all(r.status.startswith("prepared") for r in report.rows)
    assert "torch.compile compiles on the model's first call (forward, generate or training step)" in before
    assert "prepared (compiled on the first call)" in before  # the summary line
    table, legend, lines = _parts(before)
    assert len(table) == len(report.rows)  # one line per row: nothing wrapped
    prefix = re.fullmatch(r"\(module paths relative to (\S+)\)", lines[0])
    shown = {r.module: r.module[len(prefix.group(1)):] if prefix else r.module for r in report.rows}
    assert len(set(shown.values())) == len(shown)
    for row in adapted:
        assert "prepared (compiled on first call)" in _line_of(table, shown[row.module])
    for row in base_only:
        assert "base only (compiled on first call)" in _line_of(table, shown[row.module])
    _legend_has(legend, "library (eager)", "library kernel (eager): not compiled yet")
    _legend_has(legend, "base only", "base only: not in target_modules")

    with torch.no_grad():
        compiled(input_ids())
    after = str(report)
    _fits(after)
    summary = report.summary()
    assert summary["pending_first_call"] is False and summary["sites_rewritten"] == 12
    assert SUMMARY_KEYS <= set(summary)
    assert "aot_eager" in summary["backend"] and summary["graphs"] == 1
    assert "first call" not in after and f"compile: backend {summary['backend']}, 1 graph(s)" in after
    assert all(r.status == "rewritten" for r in adapted)
    assert all(r.status == "rewritten (base only: not in target_modules)" for r in base_only)
    table, legend, _ = _parts(after)
    assert len(table) == len(report.rows)
    assert all(re.search(r"  rewritten(, base only)?(  |$)", l) for l in table), table

    # to_dict keeps the full base text; the table shows short labels, explained once each in the legend
    sites = report.to_dict()["sites"]
    assert [s["base"] for s in sites] == [r.base for r in report.rows]
    assert all(s["base"].endswith("aot_eager)") for s in sites)
    table_text = "\n".join(table)
    assert "aot_eager" not in table_text and legend[0] == f"legend (base: as compiled by {summary['backend']}):"
    used = [n for n in lowering.LOWERINGS if any(lowering.label(n) in s["base"] for s in sites)]
    assert used, [s["base"] for s in sites]
    for name in used:
        assert name in table_text
        if lowering.label(name) != name:
            assert lowering.label(name) not in table_text
            _legend_has(legend, name, lowering.label(name))
    fused = {m for s in sites for m in re.findall(r", fused ([\w+]+)", s["base"])}
    for siblings in fused:
        short = "+fused(" + ",".join(n.removesuffix("_proj") for n in siblings.split("+")) + ")"
        assert short in table_text and f"fused {siblings}" not in table_text
        _legend_has(legend, short, f"fused {siblings}")


def _row(module, base, status="rewritten", adapter="lora:a", **kw):
    return Row(module, "gptqmodel", "TorchLinear", bits=4, group_size=128, in_features=64, out_features=128,
               adapter=adapter, rank=16 if adapter else None, dtype_policy="adapter" if adapter else None,
               base=base, status=status, added_params=768 if adapter else 0, **kw)


def test_base_texts_become_short_labels_with_a_legend():
    """Every form of Row.base the backend and prepare write, and text of unknown form."""
    rows = [
        _row("0.q_proj", f"{DEQ}, fused q_proj+k_proj+v_proj; {DEQ} (inductor)"),
        _row("0.k_proj", f"{DEQ} (inductor)", status="rewritten (base only: not in target_modules)",
             adapter=None),
        _row("0.gate_proj", f"{GEMV}, fused gate_proj+up_proj (qpass+inductor)"),
        _row("0.down_proj", "int4pack layout (resident): int4pack-cpu bf16 (inductor)"),
        _row("1.o_proj", f"torch-dequant ({FALLBACK}) (inductor)"),
        _row("1.up_proj", f"{UNKNOWN} (eager)"),
        _row("1.down_proj", f"library layout ({NOT_INT4PACK})", status="prepared"),
        _row("1.gate_proj", "int4pack layout (resident), torch dequant (eager)", status="prepared"),
        Row.unsupported("lm_head", "torch", "Linear", f"skipped: {SKIP_REASON}"),
    ]
    expected = {  # module: (base cell, status cell)
        "0.q_proj": ("dequant-cpu+fused(q,k,v); dequant-cpu", "rewritten"),
        "0.k_proj": ("dequant-cpu", "rewritten, base only"),
        "0.gate_proj": ("gemv-cpu+fused(gate,up)", "rewritten"),
        "0.down_proj": ("resident: int4pack-cpu", "rewritten"),
        "1.o_proj": ("torch-dequant[1]", "rewritten"),
        "1.up_proj": (UNKNOWN[:23] + "… (eager)", "rewritten"),  # not the report's backend
        "1.down_proj": ("library layout[2]", "prepared (not compiled yet)"),
        "1.gate_proj": ("resident: torch (eager)", "prepared (not compiled yet)"),
        "lm_head": ("", "skipped[3]"),
    }
    report = Report(rows, nn.Linear(8, 8))
    report.stats.graphs, report.stats.backend = 2, "qpass+inductor"
    break_reason = "Unsupported: " + " ".join(f"word{i}" for i in range(40))  # longer than a line with its indent
    report.stats.graph_break_reasons.append(break_reason)
    _fits(str(report))  # wrapped where it must be
    text = report.format(width=250)  # one line per row, for reading the cells
    table, legend, lines = _parts(text)
    assert len(table) == len(rows)
    for module, (base, status) in expected.items():
        line = _line_of(table, module)
        cells = rf"  {re.escape(base)}  +{re.escape(status)}" if base else rf"  {re.escape(status)}"
        assert re.search(cells + "(  |$)", line), line
    table_text = "\n".join(table)
    for long in (DEQ, GEMV, FALLBACK, NOT_INT4PACK, SKIP_REASON, UNKNOWN, "int4pack-cpu bf16", "(inductor)"):
        assert long not in table_text
    assert legend[0] == "legend (base: as compiled by qpass+inductor):"
    _legend_has(legend, "dequant-cpu", DEQ)
    _legend_has(legend, "+fused(q,k,v)", "fused q_proj+k_proj+v_proj")
    _legend_has(legend, "gemv-cpu", GEMV)
    _legend_has(legend, "+fused(gate,up)", "fused gate_proj+up_proj")
    _legend_has(legend, "resident", "int4pack layout (resident)")
    _legend_has(legend, "int4pack-cpu", "int4pack-cpu bf16")
    _legend_has(legend, "torch-dequant", "torch-dequant: plain-torch")
    _legend_has(legend, "[1]", FALLBACK)
    _legend_has(legend, UNKNOWN[:23] + "…", UNKNOWN)
    _legend_has(legend, "[2]", NOT_INT4PACK)
    _legend_has(legend, "[3]", SKIP_REASON)
    _legend_has(legend, "base only", "base only: not in target_modules")
    _legend_has(legend, "torch (eager)", "torch dequant (eager): not compiled yet")
    assert _norm(break_reason) in _norm(str(report)) and "word39" not in max(str(report).splitlines(), key=len)
    assert "prepared but not yet compiled" in text and "first call" not in text
    assert [s["base"] for s in report.to_dict()["sites"]] == [r.base for r in rows]
    assert report.to_dict()["sites"][-1]["status"] == f"skipped: {SKIP_REASON}"


def test_a_label_standing_for_two_texts_is_told_apart():
    rows = [_row(f"m.{i}", f"{UNKNOWN} variant {i} (inductor)") for i in range(2)]
    report = Report(rows, nn.Linear(8, 8))
    report.stats.graphs, report.stats.backend = 1, "qpass+inductor"
    table, legend, _ = _parts(str(report))
    short = UNKNOWN[:23] + "…"
    assert f"  {short}  " in _line_of(table, "m.0") and f"  {short}[2]  " in _line_of(table, "m.1")
    _legend_has(legend, short, f"{UNKNOWN} variant 0")
    _legend_has(legend, f"{short}[2]", f"{UNKNOWN} variant 1")


def test_long_module_paths_lose_their_common_prefix():
    model = make_model()
    for name in ("experiment_wrapper_holding_the_model_under_study", "and_a_second_container_with_a_long_name"):
        holder = nn.Module()
        holder.add_module(name, model)
        model = holder
    model = qpass.prepare(model, qpass.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    report = qpass.report(model)
    assert max(len(r.module) for r in report.rows) > 100
    text = str(report)
    _fits(text)
    table, _, lines = _parts(text)
    prefix = "and_a_second_container_with_a_long_name.experiment_wrapper_holding_the_model_under_study.model.layers."
    assert lines[0] == f"(module paths relative to {prefix})"
    assert len(table) == len(report.rows) == 14
    for row in report.rows:
        line = _line_of(table, row.module[len(prefix):])
        assert ("prepared (compiled on first call)" if row.adapter else "base only (compiled on first call)") in line


def test_long_paths_without_a_common_prefix_wrap_and_stay_whole():
    paths = [f"encoder_stack_{i}_with_a_rather_long_attribute_name.blocks.{i}.attention_block_with_an_extra_long_name"
             f".query_projection_module" for i in range(3)] + ["lm_head"]
    rows = [_row(p, f"{DEQ} (inductor)", adapter="lora:an_adapter_with_a_long_name") for p in paths]
    report = Report(rows, nn.Linear(8, 8))
    report.stats.graphs, report.stats.backend = 1, "qpass+inductor"
    text = str(report)
    _fits(text)
    assert "module paths relative to" not in text
    lines = text.splitlines()
    dashes = next(i for i, l in enumerate(lines) if l.startswith("---"))
    width = len(lines[dashes].split("  ")[0])
    assert width < max(map(len, paths))  # the module column is wrapped...
    cells = iter(l[:width].rstrip() for l in lines[dashes + 1:lines.index("", dashes)])
    for path in paths:  # ... and reads, row after row, every path whole and in order
        shown = next(cells)
        while shown != path:
            assert path.startswith(shown), (path, shown)
            shown += next(cells)
    assert all(rest == "" for rest in cells)  # the last row's other columns may wrap; its module does not
