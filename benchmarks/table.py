"""Print benchmarks/results/latest.json as the Markdown tables the README shows (so they are never typed in).

    .venv/bin/python benchmarks/table.py [results.json]
"""

import json
import sys
from pathlib import Path


def fmt(value, spec=".1f"):
    return "—" if value is None else format(value, spec)


def main(path=None) -> None:
    data = json.loads(Path(path or Path(__file__).parent / "results" / "latest.json").read_text())
    env = data["environment"]
    ms = data.get("min_sample_ms")
    sample = f", each the mean of back-to-back calls lasting about {ms:.0f} ms (at most 50)" if ms else ""
    print(f"`{data['command']}` — torch {env['torch']}, {env['threads']} thread(s), load average "
          f"{env['loadavg_before'][0]:.1f} before / {env['loadavg_after'][0]:.1f} after; median of {data['repeats']} "
          f"interleaved repeats{sample}; decode: {data['decode_method']}\n")
    print("| configuration | decode ms | prefill ms | train step ms | graph breaks (decode/prefill/train) |")
    print("|---|---|---|---|---|")
    for name, r in data["results"].items():
        cells = [fmt(r.get(w, {}).get("median_ms")) for w in ("decode", "prefill", "train")]
        breaks = "/".join(str(r[w]["graph_breaks"]) if w in r else "—" for w in ("decode", "prefill", "train"))
        print(f"| {name} | {' | '.join(cells)} | {breaks} |")
    print("\n| target | qpass ms | baseline ms | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for t in data["targets"]:
        print(f"| {t['target']} | {fmt(t.get('qpass_ms'), '.2f')} | {fmt(t.get('baseline_ms'), '.2f')} | "
              f"{fmt(t.get('ratio'), '.2f')} | {t.get('goal')} | {'yes' if t.get('met') else '**no**'} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
