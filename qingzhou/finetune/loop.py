"""The one training loop (accelerate) behind SFT, continued pretraining and every adapter method.

Design choices that matter for correctness:
* Loss is the sum of token losses over the whole optimizer step (all micro-batches, all processes)
  divided by the step's target-token count, so packing, padding, grad_accum and world size do not
  change what is optimised (HF averages per micro-batch unless given num_items_in_batch).
* Data order is a pure function of (seed, step): resuming at step k replays exactly the batches
  an uninterrupted run would have seen; together with optimizer + RNG state in the checkpoint this
  makes a resumed run match an uninterrupted one.
* The scheduler is stepped by us once per optimizer step (accelerate's prepared scheduler would
  step once per process).
* Under FSDP (an `accelerate launch` FSDP config, on GPUs or on CPU with gloo) the same loop runs
  on sharded parameters: every process runs the same number of forward passes (collectives in
  each), checkpoints are written per process (checkpoint.py), and the final artifact is the
  gathered full state dict (`accelerator.get_state_dict`) saved by the main process.
"""
from __future__ import annotations

import math
import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qingzhou.data.packing import Example, collate
from qingzhou.data.prepare import DataConfig, PreparedData, prepare_data
from qingzhou.data.templates import IGNORE_INDEX
from qingzhou.errors import RecipeError
from qingzhou.finetune.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint
from qingzhou.finetune.config import FinetuneConfig
from qingzhou.finetune.export import BASE_NOTE, record_base
from qingzhou.finetune.fused_loss import linear_cross_entropy
from qingzhou.finetune.fused_ops import fused_training_ops
from qingzhou.finetune.methods import METHODS, build_method, parse_finetune_config
from qingzhou.finetune.optimizers import build_optimizer
from qingzhou.finetune.sharding import (check_fsdp_model, check_launch, count_deepspeed_cpu_processes, enable_fsdp_on_cpu,
                                        fsdp_plugin, is_sharded, reshard)
from qingzhou.io import OutputError, atomic_dir, atomic_write_json, is_qingzhou_dir, write_marker
from qingzhou.llm.devices import CAPABILITIES, capabilities, keep_bnb_4bit_layout, peak_memory_mb, reset_peak_memory, torch_device
from qingzhou.llm.head import head_bypassed, plain_linear_head
from qingzhou.signals import Interrupted, fault_point, graceful_stop

PROMPT_METHODS = {"prompt_tuning", "prefix_tuning", "p_tuning"}


@dataclass
class FinetuneResult:
    """What `finetune` returns (and writes to `<output_dir>/metrics.json`)."""

    method: str
    output_dir: str
    artifact_dir: str
    artifact: str  # "adapter" (peft folder) or "model" (full fine-tune)
    steps: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    tokens_per_s: float = 0.0
    train_tokens: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    resumed_from: int | None = None
    mixed_precision: str = "no"
    data: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False, compare=False)  # the trained (peft) model, in memory

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it would deep-copy the model
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}

    def summary(self) -> dict[str, Any]:
        """Headline numbers (the CLI table)."""
        keys = ("method", "artifact_dir", "steps", "eval_loss_before", "eval_loss_after", "tokens_per_s",
                "peak_memory_mb", "trainable_params", "seconds", "resumed_from")
        return {k: getattr(self, k) for k in keys}


def resolve_mixed_precision(choice: str, device_type: str) -> str:
    """'auto' picks bf16 on accelerators that support it (the device layer's capability table),
    fp16 on those that do not (older GPUs), no on the CPU (bf16 there is slow) and Apple MPS."""
    if choice != "auto":
        return choice
    if device_type in {"cpu", "mps"} or device_type not in CAPABILITIES:
        return "no"
    caps = capabilities(device_type)
    return "bf16" if caps.bf16 else "fp16" if caps.fp16 else "no"


def token_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Summed next-token cross-entropy over labelled tokens, and how many there were.

    Labels are shifted (padded with the ignore index) rather than the logits sliced, so nothing of
    vocabulary size is copied; where the head allows it the logits are never built at all
    (`fused_loss`: head and loss in row chunks, the largest activation of a step gone).
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    count = int((targets != IGNORE_INDEX).sum())
    if plain_linear_head(model) and not is_sharded(model):  # a sharded head has no whole weight to multiply
        with head_bypassed(model) as head:
            hidden = model(**inputs, use_cache=False).logits
        hidden = hidden[:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets, IGNORE_INDEX)
        return loss, count
    logits = model(**inputs, use_cache=False).logits[:, -labels.shape[1]:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, count


class BatchPlan:
    """Which rows form micro-batch m on process `rank`: a pure function of (seed, m)."""

    def __init__(self, n_rows: int, batch_size: int, world: int, rank: int, seed: int):
        self.n, self.bs, self.world, self.rank, self.seed = n_rows, batch_size, world, rank, seed
        self.global_bs = batch_size * world
        self.per_epoch = max(1, n_rows // self.global_bs)
        self._perm: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1]

    def rows(self, m: int) -> list[int]:
        epoch, idx = divmod(m, self.per_epoch)
        perm = self._permutation(epoch)
        start = idx * self.global_bs + self.rank * self.bs
        return [perm[(start + j) % self.n] for j in range(self.bs)]


def _make_optimizer(params: list[tuple[str, Any]], cfg: FinetuneConfig) -> Any:
    decay = [p for n, p in params if p.ndim >= 2 and cfg.weight_decay > 0]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and cfg.weight_decay > 0)]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return build_optimizer(groups, cfg)


def _torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper (and DeepSpeed's ZeRO optimizer, which is
    no torch Optimizer but steps the param groups of the one it holds): what the schedule drives."""
    import torch

    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _make_scheduler(optimizer: Any, cfg: FinetuneConfig) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), num_training_steps=cfg.max_steps)


def evaluate_loss(model: Any, rows: list[Example], pad_id: int, batch_size: int, accelerator: Any, max_batches: int | None = None) -> float | None:
    """Token-weighted mean loss over held-out rows (sharded over processes)."""
    import torch

    if not rows:
        return None
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    n_batches = -(-len(mine) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if accelerator.num_processes > 1:  # a sharded forward (FSDP, ZeRO-3) gathers from every process: all run as many, extras count 0
        n_batches = int(accelerator.reduce(torch.tensor([n_batches], device=accelerator.device), reduction="max").item())
    with torch.no_grad():
        for b in range(n_batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            weight = 1.0 if chunk else 0.0
            batch = {k: v.to(accelerator.device) for k, v in collate(chunk or rows[:1], pad_id, packed=False).items()}
            with accelerator.autocast():
                loss, n = token_loss_sum(model, batch)
            total += torch.tensor([float(loss) * weight, n * weight], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else None


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  {task.fields[mem]} MB"),
        disable=not enabled, transient=False,
    )


def _deepspeed_launch() -> bool:
    """True under `accelerate launch` with a DeepSpeed config (accelerate sets this variable)."""
    import os

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _configure_deepspeed(accelerator: Any, cfg: FinetuneConfig) -> None:
    """Fill the batch settings DeepSpeed needs from ours: we feed batches ourselves (no prepared
    dataloader), so accelerate cannot infer them, and the engine's accumulation must match ours."""
    plugin = accelerator.state.deepspeed_plugin
    values = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
              "train_batch_size": cfg.batch_size * cfg.grad_accum * accelerator.num_processes}
    if cfg.max_grad_norm:
        values["gradient_clipping"] = cfg.max_grad_norm
    # the plugin's dict and the copy its HfDeepSpeedConfig reads values from must agree
    for ds in (plugin.deepspeed_config, plugin.hf_ds_config.config):
        ds.update(values)
    plugin.gradient_accumulation_steps = cfg.grad_accum


def _check_deepspeed(cfg: FinetuneConfig, accelerator: Any) -> None:
    """What a DeepSpeed run cannot do, refused before training.

    Resumable checkpoints are not written under DeepSpeed: its ZeRO optimizer keeps a partitioned
    state with its own objects (loss scaler, stage enums) that qingzhou's safetensors + JSON
    checkpoints do not hold, and DeepSpeed's own checkpoints are pickles. A run asking for step
    checkpoints is refused; time-based ones are skipped. The final artifact of a ZeRO-3 run is
    gathered from its partitions, which DeepSpeed does only with 16-bit gathering on save enabled."""
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise RecipeError("a ZeRO-3 run's final model can only be gathered from its partitions with "
                          "stage3_gather_16bit_weights_on_model_save on.",
                          where="accelerate config (DEEPSPEED, zero_stage: 3), deepspeed_config.zero3_save_16bit_model",
                          hint="Set zero3_save_16bit_model: true (as in examples/accelerate/deepspeed_zero3_offload.yaml).")
    if cfg.save_every:
        raise RecipeError("resumable checkpoints are not written under DeepSpeed (its partitioned ZeRO optimizer state "
                          "has no safetensors form here; DeepSpeed's own checkpoints are pickles).",
                          where=f"save_every: {cfg.save_every} (accelerate config: distributed_type DEEPSPEED)",
                          hint="Set save_every: 0 to train without checkpoints, or use the FSDP config "
                               "(examples/accelerate/fsdp.yaml), whose checkpoints are sharded and resumable.")
    if cfg.save_every_minutes:
        warnings.warn("no time-based checkpoints under DeepSpeed: an interrupted run starts over", stacklevel=3)


def prepare_training_data(data: DataConfig | PreparedData | str | list[dict], tokenizer: Any, seed: int) -> PreparedData:
    """Rows for the loop from any of the data forms `finetune` accepts (prepared data passes through)."""
    if isinstance(data, PreparedData):
        return data
    if isinstance(data, list):
        return prepare_data(DataConfig(source="<records>", seed=seed), tokenizer, records=data)
    return prepare_data(data if isinstance(data, DataConfig) else DataConfig(source=data, seed=seed), tokenizer)


def finetune(
    model: Any,
    tokenizer: Any,
    data: DataConfig | PreparedData | str | list[dict],
    cfg: FinetuneConfig | dict[str, Any],
    *,
    output_dir: str | Path,
    resume: bool = True,
    callbacks: list[Callable[[int, dict[str, Any]], None]] | None = None,
    base_source: str | None = None,
    loss_fn: Callable[[Any, dict[str, Any]], tuple[Any, int]] | None = None,
    checkpoint_dir: str | Path | None = None,
    overwrite: bool = False,
) -> FinetuneResult:
    """Fine-tune `model` (full, LoRA family, QLoRA, IA3 or prompt-based) and save the result.

    `data` is a DataConfig, a source string, in-memory rows or already prepared data. The adapter
    (peft format) or full model is written to `<output_dir>/adapter` or `<output_dir>/model`;
    checkpoints go to `<output_dir>/checkpoints` and a rerun with resume=True continues from the
    newest. `callbacks(step, metrics)` run after every optimizer step (an exception there stops the
    run, as a crash would). `base_source` (alias/path of the base model) is recorded in the adapter
    config so `export_merged` can find the base later. `loss_fn(model, batch) -> (summed loss,
    target tokens)` replaces next-token cross-entropy in training (distillation plugs in here; the
    held-out loss stays cross-entropy); if it is an `nn.Module`, its parameters (e.g. hidden-state
    projections) are trained and checkpointed with the model's.

    Checkpoints are written every `save_every` steps and every `save_every_minutes` of training,
    and when SIGINT/SIGTERM arrives (at the end of the current step; then `Interrupted` is raised);
    `checkpoint_dir` puts them elsewhere than `<output_dir>/checkpoints` (the recipe runner keeps
    them outside its temporary stage folder). A non-empty `output_dir` must be an earlier
    `finetune` output (it is continued with resume=True); `overwrite=True` starts such a folder
    over; a folder qingzhou did not write is never used.
    """
    cfg = parse_finetune_config(cfg)
    output_dir = Path(output_dir)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint_root(output_dir)
    claim_output_dir(output_dir, ckpt_root, resume=resume, overwrite=overwrite)
    s = _setup(model, tokenizer, data, cfg, output_dir, ckpt_root, loss_fn)
    if resume and not overwrite:
        _resume(s)
    _start(s)
    progress = _progress(cfg.progress and s.accelerator.is_main_process)
    # opt-in: SwiGLU/RMSNorm that keep fewer activations, on the covered architectures, while training only
    with progress, fused_training_ops(s.unwrapped, enabled=cfg.fused_ops), graceful_stop() as stop:
        task = progress.add_task("train", total=cfg.max_steps, completed=s.start_step, loss="-", tps="-", mem="-")
        for step in range(s.start_step + 1, cfg.max_steps + 1):
            step_loss = _train_step(s, step)
            _after_step(s, step, step_loss, stop, progress, task, callbacks)
    return _save(s, base_source)


@dataclass
class _Session:
    """One training run between the phases of `finetune`: what setup built and what the steps change."""

    cfg: FinetuneConfig
    output_dir: Path
    ckpt_root: Path
    tokenizer: Any
    prepared: PreparedData
    pad_id: int
    accelerator: Any
    deepspeed: bool
    mixed: str
    model: Any  # as accelerate prepared it (DDP / DeepSpeed wrapper, or the model itself)
    unwrapped: Any
    optimizer: Any
    scheduler: Any
    loss_fn: Callable[[Any, dict[str, Any]], tuple[Any, int]]
    ckpt_module: Any  # what checkpoints hold
    use_cache: bool | None  # the model's own setting, restored before saving
    trainable: int
    total: int
    state: dict[str, Any] = field(default_factory=lambda: {"train_loss": [], "eval_loss": [], "eval_loss_before": None,
                                                          "tokens": 0, "seconds": 0.0})
    start_step: int = 0
    resumed_from: int | None = None
    plan: BatchPlan | None = None
    t0: float = 0.0  # perf_counter when this process started training, and the token count then
    tokens0: int = 0
    last_save: float = 0.0

    def evaluate(self) -> float | None:
        return evaluate_loss(self.model, self.prepared.eval, self.pad_id, self.cfg.batch_size, self.accelerator,
                             self.cfg.eval_batches)

    def peak_memory_mb(self) -> float:
        return peak_memory_mb(self.accelerator.device)


def _setup(model: Any, tokenizer: Any, data: DataConfig | PreparedData | str | list[dict], cfg: FinetuneConfig,
           output_dir: Path, ckpt_root: Path, loss_fn: Callable[[Any, dict[str, Any]], tuple[Any, int]] | None) -> _Session:
    """Data, accelerator, method (adapter / QLoRA / ...), optimizer and scheduler: everything a step needs."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    device_type = torch_device().type
    # refuse a launch or an FSDP request that cannot work before any data work or process group
    check_launch(accelerator_devices=None if device_type == "cpu" else _device_count(device_type))
    fsdp = fsdp_plugin()
    if fsdp is not None:  # before QLoRA quantises anything
        check_fsdp_model(model, cfg, fsdp)
    prepared = prepare_training_data(data, tokenizer, cfg.seed)
    if prepared.packed and cfg.method in PROMPT_METHODS:
        raise RecipeError(f"packing cannot be combined with '{cfg.method}': virtual tokens would be shared by every packed sample.",
                          where="packing", hint="Set packing: false for prompt-based methods.")
    if not prepared.train:
        raise RecipeError("no training rows.", where="data")

    mixed = resolve_mixed_precision(cfg.mixed_precision, device_type)
    # cpu=True on CPU-only machines: under a multi-process launch accelerate then uses gloo (MULTI_CPU).
    # Not under a DeepSpeed launch: there the engine owns the device and the process group.
    deepspeed = _deepspeed_launch()
    # (FSDP's RAM-efficient loading leaves the weights of processes other than 0 on the meta device)
    on_cpu = device_type == "cpu" and next(model.parameters()).device.type in {"cpu", "meta"} and not deepspeed
    accelerator = Accelerator(mixed_precision=mixed, cpu=on_cpu)
    if deepspeed:
        _check_deepspeed(cfg, accelerator)
        if device_type == "cpu":
            count_deepspeed_cpu_processes(accelerator)
        _configure_deepspeed(accelerator, cfg)
    if fsdp is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        enable_fsdp_on_cpu(accelerator, fsdp)
    reset_peak_memory(accelerator.device)
    torch.manual_seed(cfg.seed)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    model = build_method(keep_bnb_4bit_layout(model), cfg)  # a 4-bit base must stay trainable after evaluation
    if fsdp is not None:  # what the method built must still be wrappable
        check_fsdp_model(model, cfg, fsdp)
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing needs no input-grad hooks, so it works for frozen-base adapters too
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    loss_fn = loss_fn or token_loss_sum
    extra = [(f"loss_fn.{n}", p) for n, p in loss_fn.named_parameters() if p.requires_grad] \
        if isinstance(loss_fn, torch.nn.Module) else []
    if extra:
        loss_fn.to(accelerator.device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + extra
    trainable = sum(p.numel() for _, p in named)
    total = sum(p.numel() for p in model.parameters())
    optimizer = _make_optimizer(named, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = _make_scheduler(_torch_optimizer(optimizer), cfg)
    unwrapped = accelerator.unwrap_model(model)
    # what checkpoints hold: the model, plus the loss's own parameters when it has any
    ckpt_module = torch.nn.ModuleDict({"model": unwrapped, "loss_fn": loss_fn}) if extra else unwrapped
    return _Session(cfg=cfg, output_dir=output_dir, ckpt_root=ckpt_root, tokenizer=tokenizer, prepared=prepared,
                    pad_id=tokenizer.pad_token_id, accelerator=accelerator, deepspeed=deepspeed, mixed=mixed,
                    model=model, unwrapped=unwrapped, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                    ckpt_module=ckpt_module, use_cache=use_cache, trainable=trainable, total=total)


def _resume(s: _Session) -> None:
    """Continue from the newest checkpoint, if any: weights, optimizer, RNG, loop state, scheduler."""
    ckpt = latest_checkpoint(root=s.ckpt_root)
    if ckpt is None:
        return
    loaded = load_checkpoint(ckpt, s.ckpt_module, s.optimizer, s.accelerator)
    if loaded.get("data_fingerprint") != s.prepared.fingerprint or loaded.get("method") != s.cfg.method:
        raise RecipeError(f"checkpoint {ckpt} was made with different data or method.", where="resume",
                          hint="Use a new output folder, or resume=False to start over.")
    s.start_step = s.resumed_from = loaded["step"]
    s.state.update({k: loaded[k] for k in s.state if k in loaded})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(s.start_step):
            s.scheduler.step()


def _start(s: _Session) -> None:
    """The batch plan, the held-out loss before training (once per run, not per resume), the clocks."""
    acc = s.accelerator
    s.plan = BatchPlan(len(s.prepared.train), s.cfg.batch_size, acc.num_processes, acc.process_index, s.cfg.seed)
    if s.state["eval_loss_before"] is None:
        s.state["eval_loss_before"] = s.evaluate()
    s.model.train()
    s.t0, s.tokens0 = time.perf_counter(), s.state["tokens"]
    s.last_save = time.perf_counter()


def _train_step(s: _Session, step: int) -> float:
    """One optimizer step (all its micro-batches): returns the step's loss per target token."""
    import torch

    cfg, acc, train = s.cfg, s.accelerator, s.prepared.train
    micro = [[train[i] for i in s.plan.rows((step - 1) * cfg.grad_accum + a)] for a in range(cfg.grad_accum)]
    batches = [{k: v.to(acc.device) for k, v in collate(rows, s.pad_id, packed=s.prepared.packed).items()} for rows in micro]
    local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    counts = acc.reduce(torch.tensor([local_targets], device=acc.device), reduction="sum")
    step_targets = max(1, int(counts.item()))
    loss_sum = 0.0
    for a, batch in enumerate(batches):
        sync = a == len(batches) - 1
        if s.deepspeed:  # the engine reads its accumulation boundary from accelerate's flag
            acc.gradient_state._set_sync_gradients(sync)
        ctx = acc.no_sync(s.model) if not sync and acc.num_processes > 1 else _null()
        with ctx:
            with acc.autocast():
                loss, _ = s.loss_fn(s.model, batch)
            # DDP averages gradients over processes, so scale by world size to get sum / step_targets.
            # The DeepSpeed engine steps itself at its accumulation boundary (gas = grad_accum)
            # and must not divide by gas again: the loss is already normalised per step.
            acc.backward(loss * acc.num_processes / step_targets, **({"scale_wrt_gas": False} if s.deepspeed else {}))
        loss_sum += float(loss.detach())
        s.state["tokens"] += sum(len(r) for r in micro[a]) * acc.num_processes
    if cfg.max_grad_norm:
        acc.clip_grad_norm_(s.model.parameters(), cfg.max_grad_norm)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)

    step_loss = float(acc.reduce(torch.tensor([loss_sum], device=acc.device), reduction="sum").item()) / step_targets
    if not math.isfinite(step_loss):
        raise FloatingPointError(f"training loss became {step_loss} at step {step}; lower learning_rate or use bf16/fp32.")
    return step_loss


def _after_step(s: _Session, step: int, step_loss: float, stop: Any, progress: Any, task: Any,
                callbacks: list[Callable[[int, dict[str, Any]], None]] | None) -> None:
    """The cadence after a step: log, evaluate, show progress, checkpoint (by steps, by minutes, or on
    a signal, then `Interrupted`), early metrics.json, callbacks."""
    cfg, acc, state = s.cfg, s.accelerator, s.state
    elapsed = state["seconds"] + time.perf_counter() - s.t0
    tps = (state["tokens"] - s.tokens0) / max(time.perf_counter() - s.t0, 1e-9)
    metrics = {"loss": step_loss, "lr": s.scheduler.get_last_lr()[0], "tokens_per_s": tps}
    if step % cfg.log_every == 0 or step == cfg.max_steps:
        state["train_loss"].append((step, step_loss))
    if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
        ev = s.evaluate()
        state["eval_loss"].append((step, ev))
        metrics["eval_loss"] = ev
    progress.update(task, completed=step, loss=f"{step_loss:.4f}", tps=f"{tps:,.0f}", mem=f"{s.peak_memory_mb():,.0f}")
    fault_point(f"step {step}")
    # no resumable checkpoints under DeepSpeed (see _check_deepspeed)
    timely = bool(cfg.save_every_minutes) and time.perf_counter() - s.last_save >= 60 * cfg.save_every_minutes \
        and not s.deepspeed
    stopping, timely = _any_process(acc, stop.requested, timely)  # every process saves, or none
    due = step != cfg.max_steps and (bool(cfg.save_every) and step % cfg.save_every == 0 or timely)
    if stopping and s.deepspeed:
        raise Interrupted(stop.signum or signal.SIGTERM, f"stopped at step {step}/{cfg.max_steps}; no checkpoint "
                                                         "(none are written under DeepSpeed).")
    if due or stopping:
        acc.wait_for_everyone()
        loop_state = {**state, "seconds": elapsed, "method": cfg.method, "data_fingerprint": s.prepared.fingerprint}
        if is_sharded(s.ckpt_module):  # every process writes its shard
            save_checkpoint(None, step, s.ckpt_module, s.optimizer, loop_state, keep=cfg.keep_checkpoints,
                            root=s.ckpt_root, accelerator=acc)
        elif acc.is_main_process:
            save_checkpoint(None, step, s.ckpt_module, s.optimizer, loop_state, keep=cfg.keep_checkpoints, root=s.ckpt_root)
        if acc.is_main_process:
            atomic_write_json(s.output_dir / "metrics.json", {"step": step, **metrics, "train_loss": state["train_loss"]})
        s.last_save = time.perf_counter()
    elif step % 10 == 0 and acc.is_main_process:  # early metrics for dashboards / the runner
        atomic_write_json(s.output_dir / "metrics.json", {"step": step, **metrics, "train_loss": state["train_loss"]})
    if stopping:
        raise Interrupted(stop.signum or signal.SIGTERM, f"stopped at step {step}/{cfg.max_steps}; checkpoint saved in {s.ckpt_root}. "
                                       "Run the same command again to continue from it.")
    for cb in callbacks or []:
        cb(step, metrics)


def _save(s: _Session, base_source: str | None) -> FinetuneResult:
    """Held-out loss after training, the artifact (adapter or model + tokenizer), the result and metrics.json."""
    cfg, acc, state, unwrapped = s.cfg, s.accelerator, s.state, s.unwrapped
    seconds = state["seconds"] + time.perf_counter() - s.t0
    meta = METHODS.get(cfg.method, where="method").meta
    if meta.get("finish") is not None:  # e.g. trained quantization scales back into their stored form
        meta["finish"](s.unwrapped)
    eval_after = s.evaluate()
    if eval_after is not None:
        state["eval_loss"].append((cfg.max_steps, eval_after))
    if s.use_cache is not None:  # training ran without a KV cache; the saved/returned model decodes with one
        unwrapped.config.use_cache = s.use_cache
    save = meta.get("save")  # a method whose artifact is a whole model in its own format
    artifact = "model" if cfg.method == "full" or save is not None else "adapter"
    artifact_dir = s.output_dir / artifact
    acc.wait_for_everyone()
    base_note = record_base(unwrapped, base_source) if base_source and hasattr(unwrapped, "peft_config") else None
    # sharded: the whole state dict gathered on the main process (a collective: every process calls it);
    # peft's save_pretrained picks the adapter's weights out of it
    gathered = {}
    if is_sharded(unwrapped) or s.deepspeed:  # ZeRO-3 holds partitions too; the engine gathers them
        reshard(unwrapped)
        gathered["state_dict"] = acc.get_state_dict(s.model)
    if acc.is_main_process:
        with atomic_dir(artifact_dir, overwrite=True, what=f"finetune {artifact}") as tmp:  # inside our own folder
            if save is not None:
                save(unwrapped, s.tokenizer, tmp)
            else:
                unwrapped.save_pretrained(tmp, safe_serialization=True, **gathered)
                s.tokenizer.save_pretrained(tmp)
            if base_note is not None:
                atomic_write_json(tmp / BASE_NOTE, base_note)
    result = FinetuneResult(
        method=cfg.method, output_dir=str(s.output_dir), artifact_dir=str(artifact_dir), artifact=artifact,
        steps=cfg.max_steps, train_loss=state["train_loss"], eval_loss=state["eval_loss"],
        eval_loss_before=state["eval_loss_before"], eval_loss_after=eval_after,
        tokens_per_s=(state["tokens"] - s.tokens0) / max(seconds - state["seconds"], 1e-9),
        train_tokens=state["tokens"], seconds=seconds, peak_memory_mb=s.peak_memory_mb(),
        trainable_params=s.trainable, total_params=s.total, resumed_from=s.resumed_from, mixed_precision=s.mixed,
        data={**s.prepared.stats, "fingerprint": s.prepared.fingerprint}, model=unwrapped,
    )
    if acc.is_main_process:
        # paths relative to the file's own folder: it may be a temp folder renamed later (recipe stages)
        atomic_write_json(s.output_dir / "metrics.json", {**result.to_dict(), "output_dir": ".", "artifact_dir": artifact,
                                                          "config": cfg.model_dump()})
    # every process returns once the artifact and metrics are on disk: none leaves (and closes its
    # connections) while the main process is still writing
    acc.wait_for_everyone()
    return result


def claim_output_dir(output_dir: Path, ckpt_root: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty output folder that is not an earlier fine-tune's, and one that is when
    it is neither resumed nor overwritten; mark the folder as ours. With `overwrite`, the old
    checkpoints go (the run starts over)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError("the output path is a file, not a folder.", where=str(output_dir))
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not is_qingzhou_dir(output_dir):
            raise OutputError("the output folder is not empty and was not written by qingzhou; it is never used "
                              "for output.", where=str(output_dir), hint="Choose a new (or empty) folder.")
        if not resume and not overwrite:
            raise OutputError("the output folder holds an earlier fine-tune.", where=str(output_dir),
                              hint="Resume it (resume=True), start it over (overwrite=True, --force), or choose "
                                   "another folder.")
    if overwrite and ckpt_root.is_dir():
        import shutil

        shutil.rmtree(ckpt_root, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not is_qingzhou_dir(output_dir):
        write_marker(output_dir, "finetune")


def _any_process(accelerator: Any, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true if it is true on any process: a checkpoint or a stop must happen on all of
    them or the collective save would wait forever (a signal or a clock reaches one process first)."""
    if accelerator.num_processes == 1:
        return flags
    import torch

    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=accelerator.device)
    return tuple(bool(v > 0) for v in accelerator.reduce(t, reduction="sum").tolist())


def _device_count(device_type: str) -> int | None:
    import torch

    module = getattr(torch, device_type, None)
    return module.device_count() if module is not None and hasattr(module, "device_count") else None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["FinetuneResult", "finetune", "evaluate_loss", "METHODS"]
