"""The Pareto plot of fit: perplexity against file size, fit plans beside uniform settings and peers.

A plain function over rows so the bench (`bench/fit_quality.py`), a notebook or a report can draw
the same picture from whatever they measured. Each row is a dict:

    {"label": "fit 3.0b", "size_mb": 71.2, "ppl": 27.4, "kind": "fit"}   # or "size_bytes"

`kind` groups the markers: "fit" (joined by a line: the frontier fit traces), "uniform" (our uniform
settings), anything else (a peer's name, e.g. "llama.cpp", "AutoRound") gets its own marker.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qingzhou.errors import DataError

_STYLE = {"fit": ("o", "tab:red"), "uniform": ("s", "tab:blue")}
_PEER_MARKERS = ("^", "v", "D", "P", "X", "<", ">", "*")


def _size_mb(row: Mapping[str, Any]) -> float:
    if row.get("size_mb") is not None:
        return float(row["size_mb"])
    if row.get("size_bytes") is not None:
        return float(row["size_bytes"]) / 1e6
    raise DataError(f"row {row.get('label')!r} has neither size_mb nor size_bytes.", where="pareto_plot")


def pareto_front(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows no other row beats on both size and perplexity (smaller and lower), by size."""
    pts = sorted(rows, key=lambda r: (_size_mb(r), float(r["ppl"])))
    front, best = [], float("inf")
    for r in pts:
        if float(r["ppl"]) < best:
            front.append(r)
            best = float(r["ppl"])
    return front


def pareto_plot(rows: Iterable[Mapping[str, Any]], path: str | Path, *, title: str = "perplexity vs size",
                ylabel: str = "perplexity (lower is better)", xlabel: str = "model.safetensors size (MB)",
                log_y: bool = False, joined: Iterable[str] = ("fit",),
                reference: tuple[str, float] | None = None) -> Path:
    """Draw the rows (see the module doc) as perplexity against size (MB) into `path` (PNG),
    atomically; the Pareto front over all rows is drawn as a dashed grey line.

    `joined`: the kinds whose points are joined by a line (a curve one method traces over sizes);
    `reference`: (label, perplexity) drawn as a dotted horizontal line, e.g. the dense model."""
    rows = [r for r in rows if r.get("ppl") is not None]
    if not rows:
        raise DataError("no row has a perplexity to plot.", where="pareto_plot")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = list(dict.fromkeys(str(r.get("kind", "peer")) for r in rows))
    joined = set(joined)
    peers = iter(_PEER_MARKERS)
    for kind in kinds:
        pts = sorted((_size_mb(r), float(r["ppl"]), str(r.get("label", ""))) for r in rows
                      if str(r.get("kind", "peer")) == kind)
        marker, color = _STYLE.get(kind, (next(peers, "o"), None))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                linestyle="-" if kind in joined else "none", label=kind)
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(rows)
    ax.plot([_size_mb(r) for r in front], [float(r["ppl"]) for r in front], linestyle="--", color="grey",
            alpha=0.6, label="Pareto front")
    if reference is not None:
        ax.axhline(reference[1], color="grey", lw=0.8, ls=":", label=f"{reference[0]} {reference[1]:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_fmt(FormatStrFormatter("%g"))  # 20, 30 rather than 2 x 10^1
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
