"""The rewrite report: one row per candidate site (rewritten, or skipped and why) and a summary.

Rows are created at prepare time and updated by the backend each time a graph is compiled, so the
report is right even when inductor's caches skip its own passes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from torch import nn


COLUMNS = ("module", "library / class", "bits", "group", "in→out", "adapter", "rank", "dtype policy", "base", "status", "params")


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
        }

    def to_dict(self) -> dict:
        return {"sites": [asdict(r) for r in self.rows], "summary": self.summary()}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        from tabulate import tabulate

        table = tabulate([r.cells() for r in self.rows], headers=COLUMNS, tablefmt="simple")
        s = self.summary()
        lines = [
            table,
            "",
            f"sites: {s['sites_rewritten']} rewritten with adapters, {s['sites_prepared'] - s['sites_rewritten']} prepared "
            f"but not yet compiled, {s['sites_base_only']} base only (traceable, no adapter), {s['sites_skipped']} skipped",
            f"trainable parameters: {s['trainable_params']:,} ({s['trainable_percent']:.3f}% of the model's weights)",
            f"compile: backend {s['backend'] or '-'}, {s['graphs']} graph(s), {s['graph_breaks']} graph break(s), "
            f"{s['recompiles']} recompile(s), {s['compile_seconds']:.2f} s in the qpass backend",
        ]
        for reason in s["graph_break_reasons"][:5]:
            lines.append(f"  graph break: {reason}")
        return "\n".join(lines)

    __repr__ = __str__
