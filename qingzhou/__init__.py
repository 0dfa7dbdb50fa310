"""轻舟 qingzhou: take an LLM through pretraining, adaptation, compression and evaluation.

The public Python API. Names are imported lazily so that `import qingzhou` (and recipe
validation) stays fast and does not import torch until a function that needs it is called.

    import qingzhou as qz
    model, tok = qz.load_model("smollm2")
    print(qz.perplexity(model, tok, qz.load_text("builtin:corpus"), seq_len=512).ppl)
    qz.run_recipe("quickstart", out_dir="runs/qs")
"""
from __future__ import annotations

from qingzhou._lazy import lazy_getattr

from qingzhou._version import __version__

_API = {
    "load_model": "qingzhou.llm",
    "save_model": "qingzhou.llm",
    "generate": "qingzhou.llm",
    "describe_model": "qingzhou.llm",
    "env_info": "qingzhou.llm.devices",
    "resolve_device": "qingzhou.llm.devices",
    "perplexity": "qingzhou.eval.perplexity",
    "evaluate": "qingzhou.eval.harness",
    "bench": "qingzhou.eval.bench",
    "compare": "qingzhou.eval.compare",
    "finetune": "qingzhou.finetune",
    "export_merged": "qingzhou.finetune",
    "quantize": "qingzhou.compress.quantize",
    "save_quantized": "qingzhou.compress.quantize",
    "prune": "qingzhou.compress.prune",
    "distill": "qingzhou.finetune.distill",
    "moefy": "qingzhou.compress.moefy",
    "fit": "qingzhou.compress.fit",
    "Budget": "qingzhou.compress.fit",
    "load_text": "qingzhou.data.corpus",
    "run_recipe": "qingzhou.recipes.runner",
    "load_recipe": "qingzhou.recipes.schema",
    "QingzhouError": "qingzhou.errors",
    "RecipeError": "qingzhou.errors",
    "DataError": "qingzhou.errors",
    "ModelLoadError": "qingzhou.errors",
    "DeviceError": "qingzhou.errors",
}

__all__ = ["__version__", *_API]


__getattr__ = lazy_getattr(__name__, _API)
