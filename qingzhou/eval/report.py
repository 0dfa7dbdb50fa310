"""Run reports: a table a person reads (markdown) and the same numbers as JSON.

Rows come from the stage history of a run: every stage that measured something (perplexity,
task scores, speed) becomes one row, labelled with the stage and the model it measured, so a
quickstart that evaluates before and after tuning/quantizing shows both side by side. When the run
has eval stages, the report stage adds `qingzhou compare`'s table of them (deltas against the first)
and its quality-versus-size plot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qingzhou.eval.compare import model_label, task_columns
from qingzhou.eval.tables import markdown_table
from qingzhou.io import atomic_write_json, atomic_write_text


def _model_name(entry: dict[str, Any]) -> str:
    """A short name for the model a stage measured: the alias, or `03-export/model` for artifacts."""
    ref = entry.get("model_in") or entry.get("model_out") or {}
    return model_label(str(ref.get("source", "?")))


def build_report(history: list[dict[str, Any]], *, title: str = "qingzhou run") -> dict[str, Any]:
    """Collect comparable rows (one per measuring stage), model facts and generation samples."""
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    for entry in history:
        m = entry.get("metrics") or {}
        if entry["kind"] == "load":
            models.append({"stage": entry["label"], "model": _model_name({"model_in": entry.get("model_out")}), **m})
        row: dict[str, Any] = {}
        if "size" in m:
            row.update({"memory_mb": m["size"]["memory_mb"], "disk_mb": m["size"]["disk_mb"]})
        if "perplexity" in m:
            p = m["perplexity"]
            row.update({"ppl": round(p["ppl"], 3), "ppl_data": p["data"], "seq_len": p["seq_len"], "tokens": p["tokens"]})
        row.update(task_columns(m))
        for a in m.get("answers") or []:
            samples.append({"stage": f"{entry['label']} (before)", "prompt": a["prompt"], "text": a["before"]})
            samples.append({"stage": f"{entry['label']} (after)", "prompt": a["prompt"], "text": a["after"]})
        if "train_loss" in m or "eval_loss_before" in m:
            row_ft = {k: m[k] for k in ("eval_loss_before", "eval_loss_after", "steps", "tokens_per_s") if k in m}
            if row_ft:
                rows.append({"stage": entry["label"], "model": _model_name(entry), **row_ft, "seconds": entry.get("seconds")})
        if row:
            rows.append({"stage": entry["label"], "model": _model_name(entry), **row, "seconds": entry.get("seconds")})
        for s in m.get("samples") or []:
            samples.append({"stage": entry["label"], **s})
    timings = [{"stage": e["label"], "kind": e["kind"], "seconds": e.get("seconds"), "resumed": bool(e.get("resumed"))} for e in history]
    return {"title": title, "models": models, "rows": rows, "samples": samples, "timings": timings}


def render_markdown(report: dict[str, Any]) -> str:
    parts = [f"# {report['title']}\n"]
    if report["models"]:
        parts += ["## Model\n", markdown_table(report["models"])]
    parts += ["## Quality\n", markdown_table(report["rows"])]
    comparison = report.get("comparison")
    if comparison:
        parts += ["## Comparison with the first evaluation\n",
                  "Numbers in parentheses: difference from the first eval stage (task scores in %).\n",
                  markdown_table(comparison["table"])]
        parts += [f"![{Path(p).stem}]({p})\n" for p in comparison.get("plots", [])]
    if report["samples"]:
        parts.append("## Samples\n")
        for s in report["samples"]:
            parts.append(f"**{s['stage']}** — _{s['prompt']}_\n\n> " + s["text"].strip().replace("\n", "\n> ") + "\n")
    parts += ["## Timings (s)\n", markdown_table(report["timings"])]
    return "\n".join(parts)


def write_report(report: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    folder = Path(folder)
    md = atomic_write_text(folder / "report.md", render_markdown(report))
    js = atomic_write_json(folder / "report.json", report)
    return md, js
