"""The benchmark's figure: throughput and latency percentiles, broker vs bare (and cold), plus
the refresh wave's progress. `python -m bench.plot [results.json] [results.png]` redraws it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
COLORS = {"bare": "#9e9e9e", "broker": "#1f77b4", "cold": "#ff7f0e"}
LABELS = {"bare": "bare FastAPI", "broker": "broker (cache on)", "cold": "broker (cache off)"}


def render(results: dict[str, Any], path: Path) -> None:
    reads = results.get("reads")
    wave = results.get("wave")
    panels = (2 if reads else 0) + (1 if wave else 0)
    if not panels:
        return
    fig = Figure(figsize=(5.2 * panels, 4.4), layout="constrained")
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    settings = results.get("settings", {})
    if reads:
        kinds = [k for k in ("bare", "broker", "cold") if k in reads]
        ax = axes.pop(0)
        for i, kind in enumerate(kinds):
            ax.bar(i, reads[kind]["rps"], color=COLORS[kind], width=0.6)
            rounds = [r["rps"] for r in reads[kind]["rounds"]]
            ax.plot([i] * len(rounds), rounds, "k.", markersize=5)
            ax.annotate(
                f"{reads[kind]['rps']:,.0f}",
                (i + 0.32, reads[kind]["rps"]),
                ha="left",
                va="center",
                fontsize=9,
            )
        ax.set_xticks(range(len(kinds)), [LABELS[k] for k in kinds], fontsize=9)
        ax.set_xlim(-0.5, len(kinds) - 0.1)  # room for the last bar's label
        ax.set_ylabel("requests / s (median; dots: rounds)")
        ax.set_title(
            f"Throughput, GET /sellers/{{id}}/token\n{settings.get('sellers', '?'):,} sellers, "
            f"{settings.get('connections', '?')} connections",
            fontsize=10,
        )

        ax = axes.pop(0)
        percentiles = ("p50_ms", "p95_ms", "p99_ms")
        width = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            xs = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(percentiles))]
            values = [reads[kind][p] for p in percentiles]
            ax.bar(xs, values, width=width, color=COLORS[kind], label=LABELS[kind])
        target = results.get("targets", {}).get("read_p99_ms")
        if target:
            ax.axhline(target, color="red", linestyle="--", linewidth=1, label="p99 target")
        ax.set_xticks(range(len(percentiles)), ["p50", "p95", "p99"])
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms (median of rounds; log scale)")
        ax.set_title("Latency percentiles", fontsize=10)
        ax.legend(fontsize=8)
    if wave:
        ax = axes.pop(0)
        times = [t for t, _ in wave["progress"]]
        done = [n for _, n in wave["progress"]]
        ax.plot(times, done, color=COLORS["broker"])
        ax.set_xlabel("seconds since all became due")
        ax.set_ylabel("sellers refreshed")
        ax.set_title(
            f"Refresh wave: {wave['sellers']:,} due at once, {wave['latency_ms']} ms upstream\n"
            f"{wave['rate']:,.0f}/s; simulator alone {wave['simulator_alone']['rps']:,.0f} req/s",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else source.with_name("results.png")
    render(json.loads(source.read_text()), target)


if __name__ == "__main__":
    main()
