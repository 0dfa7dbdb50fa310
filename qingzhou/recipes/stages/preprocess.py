"""`kind: preprocess`: raw text -> cleaned, de-duplicated documents -> a BPE tokenizer + token shards.

The settings are `PreprocessConfig`'s, flat (`vocab_size: 8192, near_dup_threshold: 0.8`). The output
folder (`data/` in the stage folder) is what a later `kind: pretrain` stage trains on.
"""
from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field

from qingzhou.data.preprocess import PreprocessConfig
from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage

OUTPUT = "data"


class PreprocessStage(StageConfig, PreprocessConfig):
    kind: Literal["preprocess"] = "preprocess"
    source: str | list[str] = Field("builtin:wiki-demo", description="text files (one document per line), "
                                                                     ".jsonl/.json rows, builtin:<name> or hub sets")


@register_stage("preprocess", PreprocessStage)
def run_preprocess(cfg: PreprocessStage, ctx: StageContext) -> StageResult:
    """Clean and de-duplicate the corpus, train its tokenizer and write token shards."""
    from qingzhou.data.preprocess import preprocess

    settings = PreprocessConfig(**cfg.model_dump(include=set(PreprocessConfig.model_fields)))
    report = preprocess(cfg.source, ctx.work_dir / OUTPUT, settings)
    index = (ctx.work_dir / OUTPUT / "index.json").read_bytes()
    return StageResult(metrics={**report.summary(), "output_dir": ctx.artifact_path(OUTPUT)},
                       data_hashes={str(cfg.source): hashlib.sha256(index).hexdigest()[:16]})
