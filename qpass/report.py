"""The rewrite report: one row per candidate site (rewritten, or skipped and why) and a summary.

Rows are created at prepare time and updated by qpass.compile_hook each time a graph is compiled, so the
report is right even when inductor's caches skip its own passes.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from . import lowering
from .state import SLOTS_ATTR


COLUMNS = ("module", "library / class", "bits", "group", "in→out", "adapter", "rank", "dtype policy", "base", "status", "params")
WIDTH = 160  # the printed report fits a terminal this wide
FIRST_CALL = ("nothing compiled yet: torch.compile compiles on the model's first call (forward, generate or "
              "training step); base and status are filled in then")


@dataclass
class Row:
    module: str
    library: str
    cls_name: str
    bits: Optional[int] = None
    group_size: Optional[int] = None
    in_features: Optional[int] = None
    out_features: Optional[int] = None
    adapter: Optional[str] = None
    rank: Optional[int] = None
    dtype_policy: Optional[str] = None
    base: Optional[str] = None
    status: str = ""
    added_params: int = 0
    method: Optional[str] = None

    @classmethod
    def for_site(cls, path, info):
        """A recognised quantized layer: it becomes a site (base only until an adapter targets it)."""
        return cls(path, info.library, info.cls_name, info.bits, info.group_size, info.in_features, info.out_features,
                   status="prepared (base only: not in target_modules)", method=info.method,
                   base="torch dequant (eager)" if getattr(info, "eager_base", "library") == "torch" else "library kernel (eager)")

    def add_adapter(self, adapter_name, slot) -> None:
        spec = slot.spec
        label = f"{spec.name}:{adapter_name}"
        self.adapter = label if not self.adapter else f"{self.adapter}, {label}"
        rank = spec.rank(slot.cfg)
        self.rank = rank if self.rank is None else f"{self.rank}, {rank}"
        policy = slot.cfg.dtype_policy or spec.dtype_policy
        self.dtype_policy = policy if not self.dtype_policy or self.dtype_policy == policy else f"{self.dtype_policy}, {policy}"
        self.added_params += sum(p.numel() for p in slot.parameters())
        self.status = "prepared"

    @classmethod
    def unsupported(cls, path, library, cls_name, status):
        return cls(path, library, cls_name, status=status)

    def cells(self) -> list:
        shape = f"{self.in_features}→{self.out_features}" if self.in_features else ""
        group = "" if self.group_size is None else ("none" if self.group_size in (-1, 0) else self.group_size)
        return [self.module, f"{self.library} / {self.cls_name}", self.bits or "", group, shape, self.adapter or "",
                self.rank or "", self.dtype_policy or "", self.base or "", self.status, self.added_params or ""]


@dataclass
class CompileStats:
    graphs: int = 0
    recompiles: int = 0
    graph_breaks: int = 0
    graph_break_reasons: list = field(default_factory=list)
    compile_seconds: float = 0.0
    backend: Optional[str] = None


class Report:
    def __init__(self, rows: list, model: nn.Module):
        self.rows = rows
        self.stats = CompileStats()
        self._model_ref = model

    # ---- summary numbers -------------------------------------------------------------------------
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self._model_ref.parameters() if p.requires_grad)

    def total_weights(self) -> int:
        """All parameters, with each quantized layer counted at its logical in×out (+bias) size."""
        params = sum(p.numel() for p in self._model_ref.parameters())
        quantized = sum((r.in_features or 0) * (r.out_features or 0) for r in self.rows if r.bits)
        return params + quantized

    def pending_first_call(self) -> bool:
        """No graph of this model compiled yet while some sites wait for one: torch.compile compiles on the
        first call, and the rows' base and status are filled in then."""
        return self.stats.graphs == 0 and any(r.status.startswith("prepared") for r in self.rows)

    def nonfinite_weights(self) -> list:
        """The model's adapter parameters (`<layer>.qpass_adapters.<adapter>.<tensor>`, as named_parameters names
        them) that hold NaN or inf now: read so from a file (qpass.adapter_io.check_finite warned as it read
        them) or diverged in training. Looked up each time the report is read, so it is never stale."""
        bad = []
        with torch.no_grad():
            for name, p in self._model_ref.named_parameters():
                if SLOTS_ATTR in name.split(".") and p.is_floating_point() and not p.is_meta \
                        and not bool(torch.isfinite(p).all()):
                    bad.append(name)
        return bad

    def summary(self) -> dict:
        rewritten = sum(r.status.startswith("rewritten") and r.adapter is not None for r in self.rows)
        prepared = sum(r.adapter is not None for r in self.rows)
        base_only = sum(r.adapter is None and not r.status.startswith("skipped") for r in self.rows)
        skipped = sum(r.status.startswith("skipped") for r in self.rows)
        trainable = self.trainable_params()
        total = self.total_weights()
        return {
            "sites_rewritten": rewritten,
            "sites_prepared": prepared,
            "sites_base_only": base_only,
            "sites_skipped": skipped,
            "trainable_params": trainable,
            "trainable_percent": 100.0 * trainable / total if total else 0.0,
            "graphs": self.stats.graphs,
            "graph_breaks": self.stats.graph_breaks,
            "graph_break_reasons": list(self.stats.graph_break_reasons),
            "recompiles": self.stats.recompiles,
            "compile_seconds": round(self.stats.compile_seconds, 3),
            "backend": self.stats.backend,
            "pending_first_call": self.pending_first_call(),
            "nonfinite_adapter_weights": self.nonfinite_weights(),
        }

    def to_dict(self) -> dict:
        return {"sites": [asdict(r) for r in self.rows], "summary": self.summary()}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return self.format()

    def format(self, width: int = WIDTH) -> str:
        """The printed report: the table (every line at most `width` characters: long lowering descriptions and
        notes move to a legend under it, and if that is not enough the module paths lose their common prefix,
        then the widest text columns wrap), the legend, and the summary."""
        s = self.summary()
        pending = s["pending_first_call"]
        legend = _Legend()
        inner = self.stats.backend
        cells = [_display_cells(r, legend, pending, inner) for r in self.rows]
        out = []
        prefix = _common_prefix([r.module for r in self.rows])
        if prefix and _natural_width(COLUMNS, cells) > width:  # the module paths' common prefix said once
            for row in cells:
                row[0] = row[0][len(prefix):]
            out.append(f"(module paths relative to {prefix})")
        out += _table(COLUMNS, cells, width)
        if legend.entries:
            out.append("")
            out.append(f"legend (base: as compiled by {inner}):" if legend.dropped_inner else "legend:")
            key_width = min(max(len(k) for k, _ in legend.entries), 28)
            for key, text in legend.entries:
                out.extend(_wrap_line(f"  {key:<{key_width}}  {text}", width, indent=" " * (key_width + 4)))
        out.append("")
        rows_prepared = s["sites_prepared"] - s["sites_rewritten"]
        prepared = (f"{rows_prepared} prepared (compiled on the first call)" if pending
                    else f"{rows_prepared} prepared but not yet compiled")
        summary = [
            f"sites: {s['sites_rewritten']} rewritten with adapters, {prepared}, {s['sites_base_only']} base only "
            f"(traceable, no adapter), {s['sites_skipped']} skipped",
            f"trainable parameters: {s['trainable_params']:,} ({s['trainable_percent']:.3f}% of the model's weights)",
        ]
        bad = s["nonfinite_adapter_weights"]
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            summary.append(f"non-finite adapter weights: {len(bad)} tensor(s) hold NaN or inf, the layers they adapt output "
                           f"NaN/inf: {', '.join(bad[:5])}{more}")
        if pending:
            summary.append(f"compile: {FIRST_CALL}")
        else:
            summary.append(f"compile: backend {s['backend'] or '-'}, {s['graphs']} graph(s), {s['graph_breaks']} "
                           f"graph break(s), {s['recompiles']} recompile(s), {s['compile_seconds']:.2f} s compiling")
        for line in summary:
            out.extend(_wrap_line(line, width, indent="  "))
        for reason in s["graph_break_reasons"][:5]:
            out.extend(_wrap_line(f"  graph break: {reason}", width, indent="    "))
        return "\n".join(out)

    __repr__ = __str__


# ---- the printed form -------------------------------------------------------------------------------------
# Row.base and Row.status keep their full text (to_dict); the table shows short labels and the legend under it
# says, once per label, what each stands for. Row.base is written by qpass.prepare (eager forms, below) and
# by qpass.compile_hook on each compile: "[int4pack layout (resident): ]<lowering>[; <lowering>...]
# (<compiler>)", each lowering being qpass.lowering.label(name) followed by ", fused a+b+c" (siblings in one call) or by
# " (<why it fell back>)". Text of any other form is kept when short, else cut with its full text in the legend.

_RESIDENT = "int4pack layout (resident)"
_EAGER = {  # the base before any graph is compiled (qpass.prepare): short label, what it means
    "library kernel (eager)": ("library (eager)", "not compiled yet; the library's own kernel computes the base"),
    "torch dequant (eager)": ("torch (eager)", "not compiled yet; qpass's plain-torch dequantize + matmul computes "
                                               "the base (the library's kernel cannot serve here)"),
}
_GLOSS = {
    "resident": f"{_RESIDENT}: the 4-bit weights are held once, in the CPU int4 kernel's layout "
                '(base_layout="int4pack")',
    "torch-dequant": "torch-dequant: plain-torch unpack + dequantize + matmul in the activation dtype",
    "auto": "auto: no lowering recorded for the site in this graph",
}
_SHORT_MAX = 24  # longest base entry shown as is
_STATUS_MAX = 34  # longest status shown as is
_RIGHT = {2, 3, 6, 10}  # bits, group, rank, params
_WRAPPABLE = (0, 1, 5, 8, 9)  # module, library / class, adapter, base, status: wrapped if the table is too wide
_MIN_WRAP = 12


class _Legend:
    """The labels used in the table and what each stands for, in order of first use; a label already standing
    for another text gets a number ("label[2]"); `note` gives footnote marks "[1]", "[2]", ..."""

    def __init__(self):
        self.entries: list = []
        self._text: dict = {}
        self._notes = 0
        self.dropped_inner = False  # some base cell left out its backend (named in the legend's title instead)

    def add(self, key: str, text: Optional[str]) -> str:
        if text is None or text == key:
            return key
        label, n = key, 1
        while label in self._text and self._text[label] != text:
            n += 1
            label = f"{key}[{n}]"
        if label not in self._text:
            self._text[label] = text
            self.entries.append((label, text))
        return label

    def note(self, text: str) -> str:
        for label, known in self._text.items():
            if known == text and label.startswith("["):
                return label
        while f"[{self._notes + 1}]" in self._text:
            self._notes += 1
        self._notes += 1
        return self.add(f"[{self._notes}]", text)


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _split_top(text: str, sep: str) -> list:
    """`text` split at each `sep` outside parentheses."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i = i + len(sep)
            continue
        i += 1
    return parts + [text[start:]]


def _known_lowerings() -> list:
    """(label, name) of qpass.lowering's lowerings, longest label first."""
    return sorted(((lowering.label(n), n) for n in lowering.LOWERINGS), key=lambda ln: -len(ln[0]))


def _sibling_names(names: list) -> list:
    """q_proj, k_proj, v_proj -> q, k, v: a common suffix from an underscore on is left out."""
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    cut = len(suffix) - suffix.find("_") if "_" in suffix else 0
    return [n[:-cut] for n in names] if len(names) > 1 and cut and all(len(n) > cut for n in names) else names


def _short_unknown(entry: str, legend: _Legend) -> str:
    if len(entry) <= _SHORT_MAX:
        return entry
    m = re.fullmatch(r"([^()]{1,%d}) \((.+)\)" % _SHORT_MAX, entry)
    if m and _balanced(m.group(2)):  # "head (long note)": the note goes to the legend
        return m.group(1) + legend.note(m.group(2))
    return legend.add(entry[: _SHORT_MAX - 1] + "…", entry)


def _short_entry(entry: str, legend: _Legend) -> str:
    """One lowering of a base text, e.g. "dequant-cpu (C++ unpack + GEMM, no copy), fused q_proj+k_proj+v_proj"
    -> "dequant-cpu+fused(q,k,v)"."""
    for full, name in _known_lowerings():
        if not (entry == full or entry.startswith((full + ", ", full + " ("))):
            continue
        short = legend.add(name, full if full != name else _GLOSS.get(name))
        rest = entry[len(full):]
        while rest:
            m = re.match(r", fused ([^\s,;()]+)", rest)
            if m:
                siblings = m.group(1)
                key = "+fused(" + ",".join(_sibling_names(siblings.split("+"))) + ")"
                text = f"fused {siblings}: these sibling sites (same input) computed in one kernel call"
                short += legend.add(key, text)
                rest = rest[m.end():]
            elif rest.startswith(" (") and rest.endswith(")") and _balanced(rest[2:-1]):
                short += legend.note(rest[2:-1])
                rest = ""
            else:
                return _short_unknown(entry, legend)
        return short
    return _short_unknown(entry, legend)


def _short_base(text: Optional[str], legend: _Legend, backend: Optional[str]) -> str:
    """The table's label for a Row.base text (its parts explained in `legend`)."""
    if not text:
        return ""
    prefix = ""
    for sep in (": ", ", "):
        if text.startswith(_RESIDENT + sep):
            prefix = legend.add("resident", _GLOSS["resident"]) + ": "
            text = text[len(_RESIDENT) + len(sep):]
            break
    if text in _EAGER:
        short, gloss = _EAGER[text]
        return prefix + legend.add(short, f"{text}: {gloss}")
    suffix = ""
    m = re.fullmatch(r"(.+) \(([^\s()]+)\)", text)
    if m:  # "... (<backend>)": left out where it is the report's backend (named once, in the legend's title)
        text, inner = m.groups()
        if backend and backend in (inner, f"qpass+{inner}"):
            legend.dropped_inner = True
        else:
            suffix = f" ({inner})"
    return prefix + "; ".join(_short_entry(e, legend) for e in _split_top(text, "; ")) + suffix


def _short_status(status: str, legend: _Legend, pending: bool) -> str:
    when = " (compiled on first call)" if pending else " (not compiled yet)"
    m = re.fullmatch(r"(prepared|rewritten) \(base only: (.+)\)", status)
    if m:
        key = legend.add("base only", f"base only: {m.group(2)}: no adapter on this layer; its base is rewritten "
                                      "and compiled all the same")
        return f"{key}{when}" if m.group(1) == "prepared" else f"rewritten, {key}"
    if status == "prepared":
        return status + when
    if len(status) <= _STATUS_MAX:
        return status
    if status.startswith("skipped: "):
        return "skipped" + legend.note(status[len("skipped: "):])
    return legend.add(status[: _STATUS_MAX - 1] + "…", status)


def _display_cells(row: Row, legend: _Legend, pending: bool, backend: Optional[str]) -> list:
    cells = ["" if c is None else str(c) for c in row.cells()]
    cells[8] = _short_base(row.base, legend, backend)
    cells[9] = _short_status(row.status, legend, pending)
    return cells


def _common_prefix(paths: list) -> str:
    """The longest dotted prefix all module paths share ("model.layers."), or ""."""
    if len(paths) < 2:
        return ""
    prefix = os.path.commonprefix(paths)
    return prefix[: prefix.rfind(".") + 1]


def _wrap_cell(text: str, width: int) -> list:
    """`text` in lines of at most `width` characters, broken after . , ; + / or a space where it can be."""
    lines, line = [], ""
    for token in re.findall(r"[^.,;+/ ]*[.,;+/ ]|[^.,;+/ ]+$", text):
        while len(token) > width:  # a token longer than a line: cut
            if line:
                lines.append(line)
                line = ""
            lines.append(token[:width])
            token = token[width:]
        if len(line) + len(token.rstrip()) > width:
            lines.append(line)
            line = ""
        line += token
    return [l.rstrip() for l in lines + [line] if l.strip()] or [""]


def _natural_width(headers, rows) -> int:
    return sum(max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)) + 2 * (len(headers) - 1)


def _table(headers, rows: list, width: int) -> list:
    """A plain table (header, dashes, rows) at most `width` wide if wrapping the text columns allows it: the
    widest of them is narrowed first, the module column last."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    excess = _natural_width(headers, rows) - width
    for columns in (_WRAPPABLE[1:], _WRAPPABLE):
        while excess > 0:
            shrinkable = [i for i in columns if widths[i] > max(_MIN_WRAP, len(headers[i]))]
            if not shrinkable:
                break
            widest = max(shrinkable, key=lambda i: widths[i])
            widths[widest] -= 1
            excess -= 1
    wrapped = [[_wrap_cell(c, widths[i]) if len(c) > widths[i] else [c] for i, c in enumerate(r)] for r in rows]
    widths = [max([len(h)] + [len(l) for r in wrapped for l in r[i]]) for i, h in enumerate(headers)]

    def line(cells):
        padded = (c.rjust(w) if i in _RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    for r in wrapped:
        for k in range(max(len(c) for c in r)):
            out.append(line([c[k] if k < len(c) else "" for c in r]))
    return out


def _wrap_line(line: str, width: int, indent: str) -> list:
    if len(line) <= width:
        return [line]
    return textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False) or [line[:width]]
