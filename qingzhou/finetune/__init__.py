"""Fine-tuning and continued pretraining: `finetune(model, tokenizer, data, cfg)` and `export_merged`."""
from __future__ import annotations

from qingzhou.finetune.config import FinetuneConfig
from qingzhou.finetune.export import ExportResult, export_merged
from qingzhou.finetune.loop import FinetuneResult, finetune
from qingzhou.finetune.methods import METHODS, parse_finetune_config, register_method

__all__ = ["FinetuneConfig", "FinetuneResult", "ExportResult", "METHODS", "export_merged", "finetune",
           "parse_finetune_config", "register_method"]
