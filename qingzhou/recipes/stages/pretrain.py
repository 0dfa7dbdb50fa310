"""`kind: pretrain`: train a model from scratch (any transformers architecture) on token shards.

    - kind: pretrain
      architecture: {model_type: llama, hidden_size: 256, num_hidden_layers: 4, ...}
      seq_len: 256
      learning_rate: 3.0e-3    # the rest are full fine-tuning settings, flat
      max_steps: 300
      eval_every: 50

`data` defaults to the output of the latest `kind: preprocess` stage of the run. The trained model
(with the corpus' tokenizer) becomes the current model, so eval / quantize / export stages follow.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import MethodStage, StageResult, register_stage
from qingzhou.registry import Registry


class PretrainStage(MethodStage):
    kind: Literal["pretrain"] = "pretrain"
    data: str | None = Field(None, description="a `preprocess` output folder (default: the latest preprocess stage's)")
    architecture: dict[str, Any] | str = Field(..., description="a transformers config: {model_type: llama, ...} or a "
                                                                "config.json / model folder")
    seq_len: int = Field(256, gt=1, description="tokens per training window")
    eval_windows: int | None = Field(None, gt=0, description="cap the validation windows")
    resume: bool = True
    default_method: ClassVar[str] = "full"

    @classmethod
    def methods(cls) -> Registry[Any]:
        from qingzhou.finetune.methods import METHODS

        return METHODS

    @classmethod
    def parse_method(cls, method: dict[str, Any], stage: dict[str, Any]) -> Any:
        if method.get("method", "full") != "full":
            raise ValueError(f"pretraining trains every weight: method must be 'full', not '{method['method']}'.")
        return super().parse_method(method, stage)


def _data_dir(cfg: PretrainStage, ctx: StageContext) -> str:
    if cfg.data:
        return cfg.data
    from qingzhou.errors import RecipeError
    from qingzhou.recipes.stages.preprocess import OUTPUT

    for entry in reversed(ctx.history):
        if entry["kind"] == "preprocess":
            return str(ctx.run_dir / entry["dir"] / OUTPUT)
    raise RecipeError("this stage has no data: set `data:` to a preprocess output folder, or add a "
                      "`kind: preprocess` stage before it.", where=f"stages.{ctx.index}.data")


@register_stage("pretrain", PretrainStage)
def run_pretrain(cfg: PretrainStage, ctx: StageContext) -> StageResult:
    """Pretrain from scratch; saves the model and makes it the current model."""
    from qingzhou.finetune.pretrain import perplexities, pretrain

    data = _data_dir(cfg, ctx)
    settings = cfg.settings if "seed" in cfg.settings.model_fields_set else cfg.settings.model_copy(update={"seed": ctx.seed})
    result = pretrain(data, cfg.architecture, settings, seq_len=cfg.seq_len, output_dir=ctx.work_dir,
                      resume=cfg.resume, max_eval_windows=cfg.eval_windows, checkpoint_dir=ctx.checkpoints())
    metrics = {k: v for k, v in result.to_dict().items() if k not in {"output_dir", "artifact_dir"}}
    metrics["val_perplexity"] = perplexities(result)
    ctx.set_model_artifact(result.artifact, result.model, _tokenizer(data))
    return StageResult(metrics=metrics, data_hashes={data: result.data["fingerprint"]})


def _tokenizer(data: str) -> Any:
    from pathlib import Path

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(data) / "tokenizer")
