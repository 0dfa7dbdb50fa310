"""`pretrain`: train a model from scratch on the token shards `preprocess` wrote, on the one training loop.

The model is built from a transformers config (any architecture) with the corpus' tokenizer; the
training rows are `seq_len`-token windows read lazily from the memory-mapped shards (packed documents,
attention reset at each end-of-text); the validation split is evaluated every `eval_every` steps.
Everything else (warmup + cosine schedule, mixed precision, checkpoints every `save_every` steps or
minutes, exact resume after Ctrl-C / SIGTERM / a crash, DDP/FSDP under `accelerate launch`) is the
fine-tuning loop's own, with `method: full`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qingzhou.data.prepare import PreparedData
from qingzhou.data.token_shards import PackedWindows, read_index
from qingzhou.errors import RecipeError
from qingzhou.finetune.loop import FinetuneResult, finetune
from qingzhou.finetune.methods import parse_finetune_config


def shard_data(data_dir: str | Path, seq_len: int, max_eval_windows: int | None = None) -> PreparedData:
    """Training windows (lazy) and held-out windows (read once) of a `preprocess` output folder."""
    index = read_index(data_dir)
    train = PackedWindows(Path(data_dir), "train", seq_len)
    if not len(train):
        raise RecipeError(f"the training shards in {data_dir} hold fewer than seq_len={seq_len} tokens.",
                          where="seq_len", hint="Lower seq_len or preprocess more text.")
    held = list(PackedWindows(Path(data_dir), "val", seq_len)) if "val" in index["splits"] else []
    held = held[:max_eval_windows] if max_eval_windows else held
    stats = {"train_windows": len(train), "train_tokens": train.tokens, "eval_windows": len(held), "seq_len": seq_len,
             "shards": str(data_dir)}
    return PreparedData(train=train, eval=held, packed=True, stats=stats)


def pretrain(data_dir: str | Path, architecture: dict[str, Any] | str | Path, cfg: Any, *, seq_len: int = 256,
             output_dir: str | Path, resume: bool = True, overwrite: bool = False, max_eval_windows: int | None = None,
             checkpoint_dir: str | Path | None = None, dtype: str = "float32",
             callbacks: list[Any] | None = None) -> FinetuneResult:
    """Pretrain a fresh `architecture` model on the shards in `data_dir`; the model (with the corpus'
    tokenizer) is saved to `<output_dir>/model`. `cfg` is a full fine-tuning config (dict or typed):
    learning_rate, max_steps, batch_size, warmup_ratio, eval_every, save_every, ..."""
    from transformers import AutoTokenizer

    from qingzhou.llm.scratch import model_from_config, scratch_config

    cfg = parse_finetune_config({"method": "full", **cfg} if isinstance(cfg, dict) else cfg)
    if cfg.method != "full":
        raise RecipeError(f"pretraining trains every weight (method: full), not '{cfg.method}'.", where="method")
    data = shard_data(data_dir, seq_len, max_eval_windows)
    tokenizer = AutoTokenizer.from_pretrained(Path(data_dir) / read_index(data_dir)["tokenizer"])
    model = model_from_config(scratch_config(architecture, tokenizer=tokenizer, max_positions=seq_len), seed=cfg.seed,
                              dtype=dtype)
    return finetune(model, tokenizer, data, cfg, output_dir=output_dir, resume=resume, overwrite=overwrite,
                    checkpoint_dir=checkpoint_dir, callbacks=callbacks)


def perplexities(result: FinetuneResult) -> list[tuple[int, float]]:
    """(step, validation perplexity) at every evaluation, the one before training included."""
    points = [(0, result.eval_loss_before)] + [tuple(p) for p in result.eval_loss]
    return [(int(step), math.exp(loss)) for step, loss in points if loss is not None]
