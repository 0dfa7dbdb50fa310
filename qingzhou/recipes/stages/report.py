"""`kind: report`: one markdown + JSON report of everything the earlier stages measured.

With eval stages in the run it also holds `qingzhou compare`'s table of them (deltas against the
first eval) and the quality-versus-size plot (`NN-report/plots/quality_vs_size.png`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage


class ReportStage(StageConfig):
    kind: Literal["report"] = "report"
    title: str | None = None
    plots: bool = Field(True, description="draw the quality-versus-size plot of the eval stages")


@register_stage("report", ReportStage)
def run_report(cfg: ReportStage, ctx: StageContext) -> StageResult:
    """Write report.md and report.json (in the stage folder and at the run root), with plots."""
    from qingzhou.eval.compare import comparison_from_records, quality_plot, read_run
    from qingzhou.eval.report import build_report, write_report

    report = build_report(ctx.history, title=cfg.title or ctx.run_dir.name)
    plot = None
    if any(e["kind"] == "eval" for e in ctx.history):
        comparison = comparison_from_records([read_run(ctx.run_dir)])  # run.json: configs + environment
        report["comparison"] = {"table": comparison.display_rows(), "rows": comparison.to_dict()["rows"], "plots": []}
        if cfg.plots:
            plot = quality_plot(comparison, "memory_mb", "weights in memory (MB)",
                                ctx.work_dir / "plots" / "quality_vs_size.png")
    # the plot lives in the stage folder; each copy of report.md links it relative to itself
    for folder, prefix in ((ctx.work_dir, ""), (ctx.run_dir, f"{ctx.final_dir.name}/")):
        if plot is not None:
            report["comparison"]["plots"] = [f"{prefix}plots/{plot.name}"]
        write_report(report, folder)
    return StageResult(metrics={"rows": len(report["rows"]),
                                "plots": [ctx.artifact_path(f"plots/{plot.name}")] if plot else []})
