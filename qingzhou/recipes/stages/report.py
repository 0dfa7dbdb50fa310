"""`kind: report`: one markdown + JSON report of everything the earlier stages measured."""
from __future__ import annotations

from typing import Literal

from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage


class ReportStage(StageConfig):
    kind: Literal["report"] = "report"
    title: str | None = None


@register_stage("report", ReportStage)
def run_report(cfg: ReportStage, ctx: StageContext) -> StageResult:
    """Write report.md and report.json (in the stage folder and at the run root)."""
    from qingzhou.eval.report import build_report, write_report

    report = build_report(ctx.history, title=cfg.title or ctx.run_dir.name)
    write_report(report, ctx.work_dir)
    write_report(report, ctx.run_dir)
    return StageResult(metrics={"rows": len(report["rows"])})
