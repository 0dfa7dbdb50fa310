"""`compare(run_dirs)`: one table over the models measured in any number of runs, deltas against a baseline.

A run's `run.json` is self-contained (metrics, stage configs, environment), so runs made on other
machines compare as well as local ones. Every `eval` stage is one row: the model it measured, the
chain of stages that produced that model ("finetune:lora > export > quantize:gptq-4b"), its size,
perplexity and task scores, and - from a `bench` stage (or, failing that, a `generate` stage) on the
same model - decode speed and peak memory, plus the device. The first row is the baseline; every
number also gets its delta against it. `Comparison.write(out)` adds a markdown report and matplotlib
plots: quality versus size and quality versus decode speed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qingzhou.errors import DataError
from qingzhou.eval.tables import markdown_table
from qingzhou.io import atomic_write_json, atomic_write_text

MODEL_CHANGING = ("finetune", "export", "quantize", "prune", "distill")
_METHOD_KEYS = (("bits", "{}b"), ("group_size", "g{}"), ("sparsity", "s{}"), ("nm", "{}"), ("r", "r{}"))


def task_columns(metrics: dict[str, Any]) -> dict[str, float]:
    """`task/metric` -> score of the eval metrics' tasks; accuracies in percent (as lm-eval prints)."""
    cols = {}
    for task, score in (metrics.get("tasks") or {}).items():
        if isinstance(score, dict) and score.get("score") is not None:
            metric = score.get("metric") or "score"
            value = score["score"]
            cols[f"{task}/{metric}"] = round(100 * value, 2) if metric.startswith("acc") else round(value, 3)
    return cols


def lower_is_better(column: str) -> bool:
    name = column.rsplit("/", 1)[-1]
    return "perplexity" in name or name in ("ppl", "bits_per_byte", "peak_mem_gib", "memory_mb", "disk_mb")


def read_run(path: str | Path) -> dict[str, Any]:
    """A run directory's (or a run.json file's) record, with a clear error for anything else."""
    p = Path(path)
    file = p / "run.json" if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"no run.json in {str(p)!r}.", where=str(p),
                        hint="Pass run directories written by `qingzhou run` (or their run.json files).")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"run.json is not valid JSON ({e.msg}, line {e.lineno}).", where=str(file)) from None
    if not isinstance(record, dict) or not isinstance(record.get("stages"), list):
        raise DataError("run.json has no `stages` list.", where=str(file), hint="Is this a qingzhou run.json?")
    record.setdefault("name", file.parent.name)
    record["_path"] = str(file.parent)
    return record


def stage_entries(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's stages with their recipe config (run.json keeps configs under `config.stages`)."""
    configs = (record.get("config") or {}).get("stages") or []
    out = []
    for s in record["stages"]:
        index = s.get("index")
        cfg = s.get("config") or (configs[index - 1] if isinstance(index, int) and 0 < index <= len(configs) else {})
        out.append({**s, "config": cfg or {"kind": s.get("kind")}})
    return out


def describe_stage(entry: dict[str, Any]) -> str:
    """A short name for a model-changing stage: `quantize:gptq-4b-g64`, `finetune:lora-r16`."""
    cfg = entry.get("config") or {}
    settings = {**cfg, **(cfg.get("settings") or {})}
    method = settings.get("method")
    if not method:
        return entry["kind"]
    parts = [str(method)] + [fmt.format(settings[k]) for k, fmt in _METHOD_KEYS
                             if settings.get(k) not in (None, "", False)]
    return f"{entry['kind']}:{'-'.join(parts)}"


def model_label(source: str | None, alias: str | None = None) -> str:
    """A readable name for a model reference: the alias, or `NN-stage/model` for run artifacts."""
    if not source:
        return alias or "?"
    path = Path(source)
    if path.name in ("model", "adapter", "model.gguf") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name if path.is_absolute() else source


def _speed(entries: list[dict[str, Any]], source: str | None) -> dict[str, Any]:
    """Decode speed / peak memory of the model at `source`: a bench stage's, else a generate stage's."""
    bench = gen = None
    for e in entries:
        if (e.get("model_out") or {}).get("source") != source:
            continue
        m = e.get("metrics") or {}
        if e["kind"] == "bench" and m.get("decode_tokens_per_s") is not None and bench is None:
            bench = m
        if e["kind"] == "generate" and m.get("decode_tokens_per_s") is not None and gen is None:
            gen = m
    if bench:
        return {"decode_tok_s": bench["decode_tokens_per_s"], "peak_mem_gib": bench.get("peak_memory_gib"),
                "speed_source": "bench"}
    if gen:
        return {"decode_tok_s": gen["decode_tokens_per_s"], "peak_mem_gib": None,
                "speed_source": "generate (end-to-end)"}
    return {"decode_tok_s": None, "peak_mem_gib": None, "speed_source": None}


def run_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per eval stage of a run record."""
    entries = stage_entries(record)
    env = record.get("environment") or {}
    device = env.get("device") or "?"
    if env.get("device_name") and env.get("device_name") != device:
        device = f"{device} ({env['device_name']})"
    rows, chain = [], []
    for e in entries:
        if e["kind"] in MODEL_CHANGING:
            chain.append(describe_stage(e))
        if e["kind"] != "eval":
            continue
        m = e.get("metrics") or {}
        source = (e.get("model_out") or {}).get("source")
        size = m.get("size") or {}
        ppl = m.get("perplexity") or {}
        rows.append({
            "run": record["name"], "stage": e.get("label"), "model": model_label(source),
            "method": " > ".join(chain) or "base", "memory_mb": size.get("memory_mb"), "disk_mb": size.get("disk_mb"),
            "ppl": round(ppl["ppl"], 3) if ppl.get("ppl") is not None else None, "ppl_data": ppl.get("data"),
            **task_columns(m), **_speed(entries, source), "device": device,
        })
    return rows


QUALITY_FIXED = ("ppl",)
NUMERIC = ("memory_mb", "disk_mb", "ppl", "decode_tok_s", "peak_mem_gib")


@dataclass
class Comparison:
    """The compared rows (first = baseline), their deltas, and which columns measure quality."""

    rows: list[dict[str, Any]]
    runs: list[str]
    quality: list[str] = field(default_factory=list)  # ppl and task/metric columns present
    files: dict[str, str] = field(default_factory=dict)  # what write() produced

    @property
    def baseline(self) -> dict[str, Any]:
        return self.rows[0]

    def deltas(self, row: dict[str, Any]) -> dict[str, float]:
        """row - baseline for every numeric column both have."""
        out = {}
        for col in (*NUMERIC, *[q for q in self.quality if q not in NUMERIC]):
            a, b = row.get(col), self.baseline.get(col)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                out[col] = round(a - b, 4)
        return out

    def columns(self) -> list[str]:
        fixed = ["run", "stage", "model", "method", "memory_mb", "disk_mb", "ppl"]
        tasks = [q for q in self.quality if q != "ppl"]
        cols = fixed + tasks + ["decode_tok_s", "peak_mem_gib", "device"]
        return [c for c in cols if c in ("run", "stage", "model", "method") or any(r.get(c) is not None for r in self.rows)]

    def constant(self, column: str) -> Any:
        """The value of `column` when every row has the same one (shown once, in a title), else None."""
        values = {str(r.get(column)) for r in self.rows}
        return self.rows[0].get(column) if len(values) == 1 else None

    def point_label(self, row: dict[str, Any]) -> str:
        return row["stage"] if len(set(self.runs)) == 1 else f"{row['run']}/{row['stage']}"

    def display_rows(self, columns: list[str] | None = None) -> list[dict[str, str]]:
        """Rows as text cells, each number followed by its signed delta against the baseline."""
        cols = columns or self.columns()
        out = []
        for i, row in enumerate(self.rows):
            d = self.deltas(row)
            cells = {}
            for c in cols:
                v = row.get(c)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    cells[c] = _num(v) + (f" ({_signed(d[c])})" if i and c in d else "")
                else:
                    cells[c] = "" if v is None else str(v)
            out.append(cells)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "baseline": {k: self.baseline.get(k) for k in ("run", "stage", "model")},
                "quality": self.quality, "rows": [{**r, "delta": self.deltas(r)} for r in self.rows],
                "files": self.files}

    def markdown(self, plots: list[str] | None = None) -> str:
        lines = ["# qingzhou compare\n", f"Runs: {', '.join(self.runs)}. Baseline: {self.baseline['run']} / "
                 f"{self.baseline['stage']}; numbers in parentheses are differences from it "
                 "(perplexity and size: lower is better; task scores in %, speed: higher is better).\n",
                 markdown_table(self.display_rows())]
        speed_sources = {r["speed_source"] for r in self.rows if r.get("speed_source")}
        if "generate (end-to-end)" in speed_sources:
            lines.append("Decode speed from a `generate` stage is end-to-end (prompt included); a `bench` "
                         "stage measures decode alone.\n")
        lines += [f"![{Path(p).stem}]({p})\n" for p in plots or []]
        return "\n".join(lines)

    def write(self, out: str | Path) -> dict[str, str]:
        """compare.md, compare.json and plots/*.png in `out`; returns the written paths."""
        out = Path(out)
        plots = write_plots(self, out / "plots")
        rel = [str(Path(p).relative_to(out)) for p in plots]
        self.files = {"markdown": str(out / "compare.md"), "json": str(out / "compare.json"),
                      **{Path(p).stem: p for p in plots}}
        atomic_write_text(out / "compare.md", self.markdown(rel))
        atomic_write_json(out / "compare.json", self.to_dict())
        return self.files


def comparison_from_records(records: list[dict[str, Any]]) -> Comparison:
    rows = [row for r in records for row in run_rows(r)]
    if not rows:
        names = ", ".join(r["_path"] if "_path" in r else r["name"] for r in records)
        raise DataError(f"no eval stage in {names}: nothing to compare.",
                        hint="Compare runs whose recipes have `kind: eval` stages.")
    quality = [c for c in QUALITY_FIXED if any(r.get(c) is not None for r in rows)]
    quality += list(dict.fromkeys(c for r in rows for c in r if "/" in c))
    return Comparison(rows=rows, runs=[r["name"] for r in records], quality=quality)


def compare(run_dirs: list[str | Path], out: str | Path | None = None) -> Comparison:
    """Compare the eval stages of `run_dirs` (first eval of the first run = baseline).

    With `out`, also writes compare.md, compare.json and plots/quality_vs_size.png and
    plots/quality_vs_speed.png (the latter when some row has a decode speed)."""
    if not run_dirs:
        raise DataError("no run directories given.", hint="qingzhou compare RUN_DIR [RUN_DIR ...]")
    result = comparison_from_records([read_run(p) for p in run_dirs])
    if out is not None:
        result.write(out)
    return result


# ------------------------------------------------------------------------------------ plots
def write_plots(comparison: Comparison, folder: str | Path) -> list[str]:
    """Quality (one panel per quality column) against weights in memory, and against decode speed."""
    folder = Path(folder)
    written = []
    for x, label, name in (("memory_mb", "weights in memory (MB)", "quality_vs_size"),
                           ("decode_tok_s", "decode tokens/s", "quality_vs_speed")):
        path = quality_plot(comparison, x, label, folder / f"{name}.png")
        if path is not None:
            written.append(str(path))
    return written


def quality_plot(comparison: Comparison, x: str, xlabel: str, path: Path) -> Path | None:
    """A scatter per quality column of rows that have `x`; None when no row has both."""
    panels = [q for q in comparison.quality
              if any(r.get(x) is not None and r.get(q) is not None for r in comparison.rows)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, q in zip(axes[0], panels):
        pts = [(r[x], r[q], comparison.point_label(r)) for r in comparison.rows if r.get(x) is not None and r.get(q) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="tab:blue")
        for px, py, name in pts:
            ax.annotate(str(name), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(q + (" (lower is better)" if lower_is_better(q) else ""))
        ax.grid(alpha=0.3)
        ax.margins(0.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # atomic, like every other artifact
    return path


def _num(v: float) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.2f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


def _signed(v: float) -> str:
    return ("+" if v > 0 else "") + _num(v) if v != 0 else "0"
