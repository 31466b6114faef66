"""The benchmark's figure: throughput and p99 against the number of sellers (cache on and off,
uniform and Zipf, beside the bare and raw ceilings), plus the refresh wave's progress.
`python -m bench.plot [results.json] [results.png]` redraws it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
COLORS = {"raw": "#616161", "bare": "#9e9e9e", "on": "#1f77b4", "off": "#ff7f0e"}
STYLES = {"uniform": "-", "zipf": "--"}


def render(results: dict[str, Any], path: Path) -> None:
    reads = results.get("reads")
    wave = results.get("wave")
    panels = (2 if reads else 0) + (1 if wave else 0)
    if not panels:
        return
    fig = Figure(figsize=(5.6 * panels, 4.6), layout="constrained")
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    settings = results.get("settings", {})
    if reads:
        cells = reads["cells"]
        throughput, tail = axes.pop(0), axes.pop(0)
        for cache in ("on", "off"):
            for dist in ("uniform", "zipf"):
                line = sorted(
                    (c for c in cells if c["cache"] == cache and c["dist"] == dist),
                    key=lambda c: c["sellers"],
                )
                if not line:
                    continue
                xs = [c["sellers"] for c in line]
                style = {"color": COLORS[cache], "linestyle": STYLES[dist], "marker": "o"}
                label = f"broker, cache {cache}, {dist}"
                throughput.plot(xs, [c["broker"]["rps"] for c in line], label=label, **style)
                tail.plot(xs, [c["broker"]["p99_ms"] for c in line], label=label, **style)
        for ceiling in ("raw", "bare"):  # measured in every cell: their median per size
            sizes = sorted({c["sellers"] for c in cells})
            rps = [_median([c[ceiling]["rps"] for c in cells if c["sellers"] == n]) for n in sizes]
            throughput.plot(sizes, rps, color=COLORS[ceiling], marker="s", label=ceiling)
        targets = results.get("targets", {})
        for value, label in (
            (targets.get("cached_p99_ms"), "cached p99 target"),
            (targets.get("p99_1m_ms"), "1M p99 target"),
        ):
            if value:
                tail.axhline(value, color="red", linestyle=":", linewidth=1, label=label)
        for ax in (throughput, tail):
            ax.set_xscale("log")
            ax.set_xlabel("sellers read among")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        throughput.set_ylabel("requests / s (median of rounds)")
        throughput.set_ylim(bottom=0)
        throughput.set_title(
            f"GET /sellers/{{id}}/token, {settings.get('connections', '?')} connections",
            fontsize=10,
        )
        tail.set_yscale("log")
        tail.set_ylabel("p99 latency, ms (log)")
        tail.set_title("p99 latency", fontsize=10)
    if wave:
        ax = axes.pop(0)
        times = [t for t, _ in wave["progress"]]
        done = [n for _, n in wave["progress"]]
        ax.plot(times, done, color=COLORS["on"])
        ax.set_xlabel("seconds since all became due")
        ax.set_ylabel("sellers refreshed")
        ax.set_title(
            f"Refresh wave: {wave['sellers']:,} due at once, {wave['latency_ms']} ms upstream\n"
            f"{wave['rate']:,.0f}/s; simulator alone {wave['simulator_alone']['rps']:,.0f} req/s",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else source.with_name("results.png")
    render(json.loads(source.read_text()), target)


if __name__ == "__main__":
    main()
