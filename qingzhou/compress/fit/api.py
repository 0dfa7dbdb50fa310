"""`fit(model, budget, cfg, calib)`: the best per-linear quantisation plan that meets a budget, found
by measurement, applied, checked end to end and saved.

Steps (one calibration pass, one solve per candidate budget, one apply):
1. measure every option of every decoder linear (`sensitivity`: GPTQ's own output error per
   (bits, group size), on the original model's activations), then calibrate each linear's losses
   against measured end-to-end KL (`kl_scale`: one factor per decoder layer times one per kind of
   linear, from one held-out forward per layer and per kind);
2. cost every option in the budget's unit (`budget`: file bytes, bits per weight, or measured
   decode seconds from `timing`) and solve the multiple-choice knapsack exactly (`solve`), for the
   budget and for a few neighbouring budgets;
3. end-to-end check: KL of the final logits against the original model on held-out calibration
   tokens, for each candidate plan assembled from the measured GPTQ weights; among the plans that
   meet the budget the one of least KL wins (the summed per-linear proxy does not see how errors
   compound through the layers);
4. apply the winner with the one `quantize()` verb (the plan is `overrides`, so a recipe or a
   notebook reproduces it exactly) and, given `output_dir`, write the GPTQ folder (per-module
   bits in `quantization_config.dynamic`, as GPTQModel writes them), `metrics.json`,
   `report.json` and `plan.yaml`; with `gguf=True` also `model.gguf`, the same plan in llama.cpp's
   block formats (`fit/gguf.py`), written from the original weights just before the apply.

The applied GPTQ run uses all calibration samples, the held-out ones included: that is what the
plan recipe's quantize stage does with the same calibration, so its weights are bit-identical to
fit's. The candidates' KL (which picks the plan) is measured on samples the sensitivity pass never
saw; `kl_applied` (the model as saved) is on the same tokens, which its GPTQ run did see, unless
`heldout` gives separate samples.
"""
from __future__ import annotations

import copy
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qingzhou.compress.fit.budget import Budget
from qingzhou.compress.fit.solve import DROPPED, Droppable, Plan, solve_choice, uniform_choice
from qingzhou.compress.fit.storage import KEEP, Option, header_bytes_bound, linear_bytes, model_bytes, option_space
from qingzhou.errors import RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from qingzhou.compress.fit.sensitivity import LinearSensitivity

REST = "(rest of the model)"  # the tensors fit does not choose for: a fixed cost in the table
FIT_BITS = (2, 3, 4, 8)
FIT_GROUP_SIZES = (32, 64, 128)
METHODS = ("gptq", "rtn")  # quantizers whose per-option error fit measures
NEIGHBOURS = (0.95, 0.98, 1.02, 1.05)
# Whole-space alternatives solved beside the budget neighbours: the plan with no linear below this
# many bits. The per-linear errors add up well for small perturbations but under-price 2-bit
# linears, whose errors compound through the layers; the KL check decides between the two.
MIN_BITS = (3,)
# drop_layers=N: the 2N layers that turn the residual stream least have their drop measured (KL with
# the layer skipped: one forward per layer and sample); the N least damaging of them are offered
DROP_MEASURED = 2


def fit_options() -> list[Option]:
    """The default search space: bits {2, 3, 4, 8} x group {32, 64, 128}, plus keep."""
    return option_space(FIT_BITS, FIT_GROUP_SIZES)


@dataclass
class FitReport:
    """The chosen option per linear (as `quantize()` overrides), what it costs, and how it measured."""

    budget: dict[str, Any]
    choice: dict[str, Option]
    overrides: list[dict[str, Any]]
    predicted_bytes: int  # safetensors payload of the plan (every tensor save_quantized writes)
    predicted_file_bytes: int  # payload + an upper bound on the file's header
    avg_bits: float  # 8 * bytes of the fitted linears / their weights
    loss: float  # summed loss of the plan: measured output errors times the kl_scale factors
    config: dict[str, Any]
    predicted_tok_s: float | None = None  # speed budgets: 1 / predicted decode seconds per token
    kl: float | None = None  # held-out KL of the chosen plan (assembled from the measured weights)
    kl_applied: float | None = None  # held-out KL of the model as applied and saved
    chosen_by: str = "proxy"  # "proxy": least summed error; "kl": a neighbour had less KL
    candidates: list[dict[str, Any]] = field(default_factory=list)
    heldout_tokens: int = 0
    calibration_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    file_bytes: int | None = None  # model.safetensors as written (with output_dir)
    gguf: dict[str, Any] | None = None  # model.gguf (gguf=True): path, bytes, type counts, type per linear
    dropped_layers: list[int] = field(default_factory=list)  # decoder layers removed (original indices)
    quantize: dict[str, Any] = field(default_factory=dict)  # the apply's QuantizeReport
    warnings: list[str] = field(default_factory=list)
    kl_calibration: dict[str, Any] = field(default_factory=dict)  # kl_scale: measured KLs, factor per linear
    sensitivities: dict[str, LinearSensitivity] = field(repr=False, default_factory=dict)
    plan: Plan | None = field(repr=False, default=None)

    @property
    def budget_bytes(self) -> int | None:
        return self.budget.get("max_size")

    def quantize_config(self) -> dict[str, Any]:
        """The config that reproduces the plan with `quantize(model, cfg)`."""
        return {**self.config, "overrides": self.overrides, "on_indivisible_group": "error"}

    def plan_recipe(self, load: dict[str, Any] | None = None) -> dict[str, Any]:
        """A recipe (load + one quantize stage with per-module overrides) that reproduces the
        weights fit wrote, given the same model (`load`: the load stage's keys, e.g.
        {"model": "smollm2", "dtype": "float32"}) and calibration."""
        drop = [{"kind": "prune", "name": "fit-drop", "method": "structured", "drop_layers": self.dropped_layers}] \
            if self.dropped_layers else []
        return {"name": "fit-plan",
                "description": f"qingzhou fit plan for {self.budget}: {len(self.choice)} linears, "
                               f"avg {self.avg_bits:.3f} bits, {self.predicted_file_bytes} bytes predicted"
                               + (f", layers {self.dropped_layers} dropped" if self.dropped_layers else ""),
                "stages": [{"kind": "load", "model": "MODEL", **(load or {})}, *drop,
                           {"kind": "quantize", "name": "fit-plan", **self.quantize_config()}]}

    def mix(self) -> dict[str, int]:
        """How many linears took each option ({"w4g64": 120, "keep": 2, ...})."""
        return option_mix(self.choice)

    def summary(self) -> dict[str, Any]:
        """Headline numbers (metrics.json and the CLI table)."""
        return {"method": self.config.get("method"), **{f"budget_{k}": v for k, v in self.budget.items()},
                "predicted_bytes": self.predicted_file_bytes, "file_bytes": self.file_bytes,
                "avg_bits": round(self.avg_bits, 4), "predicted_tok_s": (round(self.predicted_tok_s, 2)
                                                                          if self.predicted_tok_s else None),
                "kl": self.kl, "kl_applied": self.kl_applied, "chosen_by": self.chosen_by,
                "gguf_bytes": self.gguf["bytes"] if self.gguf else None, "dropped_layers": self.dropped_layers,
                "linears": len(self.choice), "mix": self.mix(), "seconds": round(self.seconds.get("total", 0.0), 2)}

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("sensitivities", "plan", "choice")}
        out["choice"] = {n: o.label for n, o in self.choice.items()}
        out["mix"] = self.mix()
        out["errors"] = {n: {o.label: e for o, e in s.errors.items()} for n, s in self.sensitivities.items()}
        return out


def option_mix(choice: dict[str, Option]) -> dict[str, int]:
    """How many linears of `choice` take each option, by label (`drop`: in a dropped layer), sorted."""
    out: dict[str, int] = {}
    for o in choice.values():
        label = _label(o)
        out[label] = out.get(label, 0) + 1
    return dict(sorted(out.items()))


def _label(o: Any) -> str:
    return DROPPED if o == DROPPED else o.label


# Kept for callers of the groundwork API.
FitResult = FitReport


def plan_overrides(choice: dict[str, Option]) -> list[dict[str, Any]]:
    """One exact-name `ModuleOverride` dict per linear (keep = skip)."""
    out: list[dict[str, Any]] = []
    for name, o in choice.items():
        pattern = f"^{re.escape(name)}$"
        out.append({"pattern": pattern, "skip": True} if o.keep else
                   {"pattern": pattern, "bits": o.bits, "group_size": o.group_size})
    return out


def uniform_bytes(model: nn.Module, bits: int, group_size: int, *, skip: tuple[str, ...] = ()) -> int:
    """Bytes of `model.safetensors` for uniform `bits`/`group_size` quantisation of the decoder
    linears (group sizes that do not divide a width fall back as `quantize` does): the exact
    payload plus the header bound fit itself uses, so `fit(model, uniform_bytes(...))` can always
    afford the uniform plan and is never given less room than it (the file as written is at most
    a few hundred bytes smaller)."""
    from qingzhou.compress.calibrate import select_linears
    from qingzhou.compress.quantize.plan import fallback_group_size

    chosen, _ = select_linears(model, list(skip), ())
    plan = {}
    for name, lin, _ in chosen:
        gs = group_size if group_size == -1 or lin.in_features % group_size == 0 else \
            fallback_group_size(lin.in_features, group_size)
        plan[name] = Option(bits, gs)
    return model_bytes(model, plan) + header_bytes_bound(model, {n: [o] for n, o in plan.items()})


def fit(model: nn.Module, budget: Budget | int | str | dict[str, Any], cfg: Any = None, calib: Any = None, *,
        tokenizer: Any = None, output_dir: str | Path | None = None, heldout: float | list[Any] = 0.1,
        neighbours: tuple[float, ...] = NEIGHBOURS, options: list[Option] | None = None, apply: bool = True,
        overwrite: bool = False, timing_cache: str | Path | None = None, clip_grid: int = 20,
        load_stage: dict[str, Any] | None = None, gguf: bool = False, gguf_keep: str = "f16",
        weighting: str = "fisher", fisher_samples: int = 16, fisher_autocast: str | None = None,
        min_bits: tuple[int, ...] = MIN_BITS, drop_layers: int = 0, drop_samples: int = 4,
        kl_calibrate: int = 2) -> FitReport:
    """Fit `model` to `budget` (see `budget.Budget`: max_size bytes / "80MB", avg_bits, or
    min_tok_s with device) with the least measured damage, and (with `apply`) quantise it in place.

    `cfg`: a quantize config (dict or typed; default `{"method": "gptq"}`, or rtn) giving the grid
    (`sym`, `clip_search`), `skip`, the engine settings and `calibration`; `bits`/`group_size`
    are the defaults of `quantization_config`, the plan sets every linear's own. `calib` as for
    `quantize()`. `heldout`: the fraction of the samples (from the end) kept out of the
    measurement for the KL check, or explicit held-out samples (then all of `calib` is used);
    `neighbours`: factors on the budget's room above the fixed rest of the model (bytes of the
    embeddings and norms, or the decode time outside the linears) whose plans are also solved and
    KL-checked when they are <= 1 (only those can win; the others' summed errors are reported);
    `min_bits`: for each, the plan at the budget that puts no
    linear below that many bits is KL-checked too (and can win). `options`: the search space (default bits {2,3,4,8} x group {32,64,128} + keep).
    `clip_grid`: steps of the clip search while measuring (the apply uses the method's own).
    `weighting`: "fisher" (default) weighs each linear's per-row output error by the loss's
    sensitivity to that output (`fisher.output_fisher`: one forward + backward per calibration
    sample), so errors of different linears add up in loss units; "none" sums raw output errors.
    `fisher_samples`: at most this many of the measured samples (evenly spaced) feed the Fisher; its
    backward through the whole model costs about one GPTQ run at 74 x 512 tokens on SmolLM2.
    `fisher_autocast`: the Fisher pass's autocast dtype (None: the model's own dtype; "bfloat16" is
    faster on CPUs with AMX but moves some linears' weights by tens of percent on SmolLM2).
    `kl_calibrate`: on this many of the held-out samples, measure the end-to-end KL of each decoder
    layer and each kind of linear at a reference option and scale every linear's losses by the
    fitted `a[layer] * b[kind]` (`kl_scale.py`: the proxy's ratio to the KL varied 40x across
    Gemma 3's layers); 0 leaves the proxy as measured. Costs (layers + kinds) forwards per sample.
    `load_stage`: the load stage of the written `plan.yaml` ({"model": ..., "dtype": ...}; default
    the model's `name_or_path`).
    `drop_layers`: at most this many whole decoder layers may be dropped (0: none): of the
    `DROP_MEASURED * drop_layers` layers that turn the residual stream least, the `drop_layers` of
    least measured damage (`layer_drop.py`: KL with the layer skipped, on `drop_samples` of the
    measured samples) become droppable groups of the knapsack, and the plan of the same budget with
    no layer dropped is a KL-checked candidate too. Size and average-bits budgets; needs
    `weighting="fisher"`. A plan that drops layers saves a model with fewer layers, and its
    `plan.yaml` has a structured prune stage (`drop_layers`) before the quantize stage.
    `gguf`: also write `output_dir/model.gguf`, the plan as llama.cpp per-tensor types
    (`fit.gguf.gguf_tensor_types`: 8 -> q8_0, 4 -> q4_k, 3 -> q3_k, 2 -> q2_k, keep -> `gguf_keep`,
    with llama.cpp's fallback where a row is not a multiple of 256), quantised from the original
    weights; its bytes are `report.gguf["bytes"]` (not the GPTQ file's). Llama, Mistral, Qwen2, Gemma 3.
    Raises `RecipeError` naming the smallest reachable size (bits, speed) when no plan fits.
    """
    import torch

    from qingzhou.compress.calibrate import LayerwiseOptions, select_linears
    from qingzhou.compress.driver import calibration_samples
    from qingzhou.compress.fit.sensitivity import SensitivityCollector, measure_sensitivity
    from qingzhou.compress.quantize.registry import QUANTIZERS

    t_start = time.perf_counter()
    budget = Budget.parse(budget)
    cfg = QUANTIZERS.validate(cfg if cfg is not None else {"method": "gptq"})
    if cfg.method not in METHODS:
        raise RecipeError(f"fit measures and applies {' or '.join(METHODS)}, not {cfg.method!r}.", where="method",
                          hint="Use method: gptq (default) or rtn.")
    if cfg.overrides:
        raise RecipeError("fit writes the per-module overrides itself; the config must not have any.",
                          where="overrides", hint="Use `skip` to keep modules out of the search.")
    chosen, _ = select_linears(model, cfg.skip, ())
    if not chosen:
        raise RecipeError("no full-precision nn.Linear left to fit in the decoder layers.", where="fit",
                          hint="The model may already be compressed, or `skip` matches every linear.")
    linears = {name: m for name, m, _ in chosen}
    if gguf:
        from qingzhou.compress.fit.gguf import KEEP_TYPES, check_gguf_model

        if output_dir is None or not apply:
            raise RecipeError("gguf needs output_dir and apply=True (model.gguf is written beside the GPTQ folder).",
                              where="fit gguf")
        if gguf_keep not in KEEP_TYPES:
            raise RecipeError(f"gguf_keep must be one of {', '.join(KEEP_TYPES)}, not {gguf_keep!r}.",
                              where="fit gguf_keep")
        check_gguf_model(model)  # before minutes of measuring
    if drop_layers:
        if weighting != "fisher" or budget.kind == "min_tok_s":
            raise RecipeError("drop_layers needs a max_size or avg_bits budget and weighting fisher (a dropped "
                              "layer's loss is measured in the Fisher-weighted units of the other options).",
                              where="fit drop_layers", hint="Drop layers with a size or bits budget, or set it to 0.")
        from qingzhou.compress.calibrate import find_decoder_layers

        n_layers = len(find_decoder_layers(model)[0])
        if drop_layers >= n_layers:
            raise RecipeError(f"drop_layers {drop_layers} would allow dropping every decoder layer "
                              f"({n_layers}).", where="fit drop_layers",
                              hint="Allow fewer layers to be dropped.")
    space = list(options) if options is not None else fit_options()
    per_linear = {n: _options_of(m.in_features, space) for n, m in linears.items()}

    samples = calibration_samples(calib, cfg, tokenizer, "fit")
    if isinstance(heldout, (int, float)) and not isinstance(heldout, bool):
        n_held = min(len(samples) - 1, max(1, round(heldout * len(samples)))) if heldout > 0 else 0
        measure, held = (samples[:-n_held], samples[-n_held:]) if n_held > 0 else (samples, [])
    else:
        held = calibration_samples(list(heldout), cfg, tokenizer, "fit heldout")
        measure = samples
    check = bool(held)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    gptq = gptq_measure_settings(cfg, clip_grid)
    if weighting not in ("fisher", "none"):
        raise RecipeError(f"weighting must be fisher or none, not {weighting!r}.", where="fit weighting")
    row_weights = None
    if weighting == "fisher":
        from qingzhou.compress.fit.fisher import output_fisher

        step = max(1, len(measure) // max(1, fisher_samples))
        row_weights = output_fisher(model, measure[::step][:fisher_samples], linears, autocast=fisher_autocast)
        seconds["fisher"] = time.perf_counter() - t0
        t0 = time.perf_counter()  # each stage's seconds are its own: the stages add up to the total
    collector = SensitivityCollector(space, sym=cfg.sym, clip_search=cfg.clip_search, gptq=gptq, keep_weights=check,
                                     options_of=lambda name, m: per_linear[name], row_weights=row_weights)
    engine = LayerwiseOptions(device=getattr(cfg, "device", None), batch_size=getattr(cfg, "batch_size", 8),
                              offload_inputs=getattr(cfg, "offload_inputs", False), targets=linears.__contains__,
                              true_sequential=False)  # weights are not written: one pass per layer suffices
    sens = measure_sensitivity(model, measure, layerwise=engine, collector=collector)
    seconds["sensitivity"] = time.perf_counter() - t0
    work = copy.deepcopy(model) if check else None  # plans are written into this copy, never into `model`
    reference_cache: dict[int, Any] = {}  # the original model's KL terms per held-out sample (`heldout_kl`)
    factor: dict[str, float] = {}
    calibration: dict[str, Any] = {}
    if kl_calibrate and work is not None:
        from qingzhou.compress.calibrate import find_decoder_layers
        from qingzhou.compress.fit.kl_scale import kl_factors

        t0 = time.perf_counter()
        few = held[:kl_calibrate]
        factor, calibration = kl_factors(sens, collector.weights,
                                         lambda plans, w=work: heldout_kl(model, w, few, plans, collector.weights, cfg,
                                                                          reference_cache=reference_cache),
                                         find_decoder_layers(model)[1])
        calibration["held_tokens"] = sum(int(h.numel()) for h in few)
        calibration["factors"] = {n: round(f, 6) for n, f in factor.items()}
        seconds["kl_calibrate"] = time.perf_counter() - t0
    groups: list[Any] = []
    if drop_layers:
        from qingzhou.compress.fit.layer_drop import angular_distances, drop_losses, layer_groups

        t0 = time.perf_counter()
        groups = layer_groups(model, list(sens))
        step = max(1, len(measure) // max(1, drop_samples))
        few = measure[::step][:drop_samples]
        turn = angular_distances(model, few)  # one forward per sample: which layers are worth measuring
        groups = sorted(groups, key=lambda g: turn[g.index])[:DROP_MEASURED * drop_layers]
        lost = drop_losses(model, few, groups)
        groups = sorted(groups, key=lambda g: lost[g.index])[:drop_layers]  # only the least damaging can go
        seconds["layer_drop"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    costs, fixed, limit_of, describe = _cost_model(model, budget, cfg, linears, sens, timing_cache)
    droppable: list[Droppable] = []
    if groups:  # a kept layer pays its norms itself; dropped, they leave the file with it
        own = {g.index: g.own_bytes if budget.kind == "max_size" else 0 for g in groups}
        fixed -= sum(own.values())
        droppable = [Droppable(g.linears, own[g.index], lost[g.index]) for g in groups]
    table: dict[Any, dict[Any, tuple[int, float]]] = {REST: {KEEP: (fixed, 0.0)}}
    table.update({n: {o: (costs[n][o], e * factor.get(n, 1.0)) for o, e in s.errors.items()} for n, s in sens.items()})
    in_groups = {n for g in droppable for n in g.items}
    smallest = sum(min(c for c, _ in row.values()) for n, row in table.items() if n not in in_groups)
    limit = limit_of(budget)
    if smallest > limit:
        raise RecipeError(f"no plan meets {budget.describe()}: {describe(smallest)}.", where="fit budget",
                          hint="Relax the budget to at least that, allow cheaper options, or skip fewer linears.")
    # a neighbour scales the room the plan distributes, not the whole budget: for SmolLM2 in fp32
    # the embeddings alone are ~2/3 of the file, so "5% of the file" would be ~15% of the linears
    factors = sorted({1.0, *neighbours})
    # key: (budget factor, min bits, uniform?, no layer dropped although allowed?)
    plans: dict[tuple[float, int | None, bool, bool], Plan] = {}
    for f in factors:
        lim = limit if f == 1.0 else fixed + math.floor(f * (limit - fixed))
        if lim >= smallest:
            plans[(f, None, False, False)] = solve_choice(table, lim, droppable=droppable)
    for mb in sorted(set(min_bits)):
        sub = {n: {o: v for o, v in row.items() if n == REST or o.keep or o.bits >= mb} for n, row in table.items()}
        if all(sub.values()) and sum(min(c for c, _ in row.values()) for n, row in sub.items()
                                     if n not in in_groups) <= limit:
            plans[(1.0, mb, False, False)] = solve_choice(sub, limit, droppable=droppable)
    # every layer kept: the rest of the model pays all the layers' own tensors again
    keep_all = {**table, REST: {KEEP: (fixed + sum(g.cost for g in droppable), 0.0)}} if droppable else table
    if droppable and sum(min(c for c, _ in row.values()) for row in keep_all.values()) <= limit:
        plans[(1.0, None, False, True)] = solve_choice(keep_all, limit)
    budget_of = None
    if budget.kind == "max_size":  # one option's header is smaller than the bound over all options
        def budget_of(o: Option) -> int:
            return int(budget.max_size) - header_bytes_bound(model, {n: [o] for n in sens})
    if check and (same := uniform_choice(keep_all, limit, fixed=(REST,), budget_of=budget_of)) is not None:
        plans[(1.0, None, True, bool(droppable))] = same
    seconds["solve"] = time.perf_counter() - t0
    layer_of = {n: g.index for g in groups for n in g.linears}
    prefix = groups[0].prefix.rpartition(".")[0] if groups else "model.layers"

    def summary_of(plan: Plan) -> dict[str, Any]:
        choice = {n: o for n, o in plan.choice.items() if n != REST}
        dropped = sorted({layer_of[n] for n, o in choice.items() if o == DROPPED})
        kept = {n: o for n, o in choice.items() if o != DROPPED}
        return {"choice": choice, "payload": _payload(model, kept, [f"{prefix}.{i}" for i in dropped]),
                "loss": plan.loss, "avg_bits": _avg_bits(linears, kept), "cost": plan.cost, "dropped": dropped}

    candidates: list[dict[str, Any]] = []
    seen: dict[tuple, dict[str, Any]] = {}
    for (f, mb, uniform, nodrop), plan in plans.items():
        s = summary_of(plan)
        key = tuple(sorted((n, _label(o)) for n, o in s["choice"].items()))
        row = {"factor": f, "min_bits": mb, "uniform": uniform, "eligible": f <= 1.0, "loss": s["loss"],
               "avg_bits": round(s["avg_bits"], 4), "payload_bytes": s["payload"], "cost": s["cost"],
               "dropped_layers": s["dropped"], "same_as": None, "kl": None}
        if key in seen:
            row["same_as"] = seen[key]["name"]
        elif row["eligible"]:  # an over-budget plan is never the one another row's KL comes from
            seen[key] = row
        label = next(iter(s["choice"].values())).label if uniform and s["choice"] else ""
        row["name"] = (f"uniform {label}" if uniform else f"x{f:g}" + (f" min{mb}b" if mb is not None else "")) \
            + (" no drop" if nodrop and not uniform else "")
        row["mix"] = option_mix(s["choice"])
        row["_choice"] = s["choice"]
        candidates.append(row)
    seen_rows = {r["name"]: r for r in candidates}

    t0 = time.perf_counter()
    best = next(r for r in candidates if r["factor"] == 1.0 and r["min_bits"] is None and not r["uniform"]
                and not r["name"].endswith("no drop"))
    chosen_by = "proxy"
    if work is not None:
        # only plans within the budget can win: the larger neighbours are solved (their loss shows
        # the trend) but not run end to end
        unique = [r for r in candidates if r["same_as"] is None and r["eligible"]]
        kls = heldout_kl(model, work, held, [r["_choice"] for r in unique], collector.weights, cfg,
                         drops=[r["dropped_layers"] for r in unique], reference_cache=reference_cache)
        for r, kl in zip(unique, kls):
            r["kl"] = kl
        for r in candidates:
            if r["same_as"] is not None:
                r["kl"] = seen_rows[r["same_as"]]["kl"]
        eligible = [r for r in candidates if r["eligible"] and r["kl"] is not None]
        winner = min(eligible, key=lambda r: (r["kl"], -r["factor"]))
        if winner is not best and winner["kl"] < best["kl"]:
            best, chosen_by = winner, "kl"
    collector.weights.clear()
    seconds["kl_check"] = time.perf_counter() - t0
    for r in candidates:
        r["chosen"] = r is best

    dropped: list[int] = best["dropped_layers"]
    kept_choice = {n: o for n, o in best["_choice"].items() if o != DROPPED}
    header = header_bytes_bound(model, {n: [o] for n, o in kept_choice.items()})  # a bound: a dropped layer's
    # tensors leave the header and the kept layers' names only get shorter (renumbered)
    names = _renamed(list(kept_choice), prefix, dropped)
    choice: dict[str, Option] = {names[n]: o for n, o in kept_choice.items()}  # as the saved model names them
    report = FitReport(
        budget=budget.to_dict(), choice=choice, overrides=plan_overrides(choice), predicted_bytes=best["payload_bytes"],
        predicted_file_bytes=best["payload_bytes"] + header, avg_bits=_avg_bits(linears, kept_choice),
        loss=best["loss"], config=cfg.model_dump(mode="json", exclude={"overrides"}), kl=best["kl"],
        chosen_by=chosen_by, candidates=[{k: v for k, v in r.items() if k != "_choice"} for r in candidates],
        heldout_tokens=sum(int(h.numel()) for h in held), calibration_tokens=sum(int(s.numel()) for s in measure),
        sensitivities=sens, plan=plans[(1.0, None, False, False)], dropped_layers=dropped, kl_calibration=calibration)
    if budget.kind == "min_tok_s":
        report.predicted_tok_s = 1e9 / best["cost"] if best["cost"] > 0 else math.inf  # cost includes the rest

    gguf_tmp: tuple[Path, dict[str, Any]] | None = None
    try:
        if apply:
            from qingzhou.compress.quantize.api import quantize

            if dropped:  # first, so the GGUF and the quantize run see the model as it is saved
                from qingzhou.compress.prune.structured import structured_prune

                structured_prune(model, {"method": "structured", "drop_layers": dropped})
            if gguf:  # from the original weights: the plan is applied in place next
                t0 = time.perf_counter()
                gguf_tmp = _export_gguf_aside(model, tokenizer, choice, output_dir, gguf_keep)  # type: ignore[arg-type]
                seconds["gguf"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if work is not None:  # back to the original weights: the reference of the applied model's KL
                with torch.no_grad():
                    for name, lin in linears.items():
                        work.get_submodule(name).weight.copy_(lin.weight)
            qreport = quantize(model, report.quantize_config(), samples, tokenizer=tokenizer)
            report.quantize = qreport.to_dict()
            report.quantize.pop("modules", None)
            report.warnings = qreport.warnings
            seconds["apply"] = time.perf_counter() - t0
            if work is not None:
                # `work` holds the original weights again: the same reference as the check's
                report.kl_applied = heldout_kl(work, model, held, [None], {}, cfg, reference_cache=reference_cache)[0]
        del work
        seconds["total"] = time.perf_counter() - t_start
        report.seconds = {k: round(v, 2) for k, v in seconds.items()}
        if output_dir is not None:
            if not apply:
                raise RecipeError("output_dir needs apply=True (the folder holds the fitted model).", where="fit")
            if gguf_tmp is not None:
                info = gguf_tmp[1]
                report.gguf = {"path": str(Path(output_dir) / "model.gguf"), "bytes": info["bytes"],
                               "keep": gguf_keep, "tensor_types": info["tensor_types"],
                               "linear_types": info["linear_types"]}
            write_fit_outputs(model, tokenizer, report, output_dir, overwrite=overwrite, load_stage=load_stage)
            if gguf_tmp is not None:
                os.replace(gguf_tmp[0] / "model.gguf", Path(output_dir) / "model.gguf")
    finally:
        if gguf_tmp is not None:
            shutil.rmtree(gguf_tmp[0], ignore_errors=True)
    return report


def _export_gguf_aside(model: nn.Module, tokenizer: Any, choice: dict[str, Option], output_dir: str | Path,
                       keep: str) -> tuple[Path, dict[str, Any]]:
    """Write the plan's GGUF into a temporary folder beside `output_dir` (the GPTQ folder is
    written atomically later and would replace anything already inside it); moved in after."""
    import tempfile

    from qingzhou.compress.fit.gguf import export_fit_gguf

    parent = Path(output_dir).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{Path(output_dir).name}.gguf.", dir=parent))
    try:
        return tmp, export_fit_gguf(model, tokenizer, choice, tmp / "model.gguf", keep=keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gptq_measure_settings(cfg: Any, clip_grid: int = 20) -> dict[str, Any] | None:
    """The GPTQ settings the sensitivity pass measures every option with: the apply's own (block,
    damping, act order, Hessian clip), with a coarser clip search; None when the method is not GPTQ
    (options are then measured by round-to-nearest)."""
    if cfg.method != "gptq":
        return None
    return {"block_size": cfg.block_size, "damp_percent": cfg.damp_percent, "act_order": cfg.act_order,
            "hessian_clip": cfg.hessian_clip, "clip_grid": clip_grid}


def _options_of(in_features: int, space: list[Option]) -> list[Option]:
    """The options of one linear: the space's group sizes that divide its width; a width none
    divides gets per-channel (-1) at each offered width instead, so it is still searched."""
    from qingzhou.compress.fit.storage import options_for

    opts = options_for(in_features, space)
    if not any(not o.keep for o in opts):
        bits = sorted({int(o.bits) for o in space if not o.keep})  # type: ignore[arg-type]
        opts = [Option(b, -1) for b in bits] + [o for o in opts if o.keep]
    return opts


def _payload(model: nn.Module, choice: dict[str, Option], dropped: tuple[str, ...] | list[str] = ()) -> int:
    """Bytes of the plan's payload: `choice` for the kept linears, without the `dropped` layers."""
    return model_bytes(model, choice, dropped=dropped)


def _renamed(names: list[str], prefix: str, dropped: list[int]) -> dict[str, str]:
    from qingzhou.compress.fit.layer_drop import renamed

    return renamed(names, prefix, dropped) if dropped else {n: n for n in names}


def _avg_bits(linears: dict[str, Any], choice: dict[str, Option]) -> float:
    """8 * bytes the fitted linears' tensors take / their weight count (scales, zeros, g_idx, bias in;
    a linear not in `choice` is in a dropped layer: no bytes, its weights still counted)."""
    nbytes = weights = 0
    for name, lin in linears.items():
        bias = lin.bias.element_size() if lin.bias is not None else 0
        if name in choice:
            nbytes += linear_bytes(lin.in_features, lin.out_features, choice[name], bias_bytes=bias,
                                   dtype_bytes=lin.weight.element_size())
        weights += lin.in_features * lin.out_features
    return 8 * nbytes / weights


def _cost_model(model: nn.Module, budget: Budget, cfg: Any, linears: dict[str, Any], sens: dict[str, Any],
                timing_cache: str | Path | None):
    """(cost[linear][option] as ints, fixed cost of the rest, limit(budget) -> int, describe(cost) -> str)
    in the budget's own unit: bytes, bytes of the fitted linears, or nanoseconds per decode step."""
    if budget.kind == "max_size":
        costs = {n: {o: s.cost(o) for o in s.errors} for n, s in sens.items()}
        fixed = model_bytes(model, {}) - sum(s.cost(KEEP) for s in sens.values())
        header = header_bytes_bound(model, {n: list(s.errors) for n, s in sens.items()})
        return (costs, fixed, lambda b: int(b.max_size) - header,
                lambda c: f"the smallest reachable size is {c + header} bytes ({(c + header) / 1e6:.2f} MB, "
                          f"{(c + header) / 2**20:.2f} MiB)")
    if budget.kind == "avg_bits":
        weights = sum(lin.in_features * lin.out_features for lin in linears.values())
        costs = {n: {o: s.cost(o) for o in s.errors} for n, s in sens.items()}
        return (costs, 0, lambda b: math.floor(b.avg_bits * weights / 8),
                lambda c: f"the lowest reachable average is {8 * c / weights:.4f} bits per weight")
    from qingzhou.compress.fit.timing import speed_table
    from qingzhou.llm.devices import torch_device

    device = torch_device(budget.device or getattr(cfg, "device", None))
    times, rest = speed_table(model, linears, {n: list(s.errors) for n, s in sens.items()}, device, timing_cache)
    costs = {n: {o: max(1, round(t * 1e9)) for o, t in times[n].items()} for n in sens}
    fixed = round(rest * 1e9)
    return (costs, fixed, lambda b: math.floor(1e9 / b.min_tok_s),
            lambda c: f"the highest reachable speed is {1e9 / c:.2f} tokens/s on {device} (predicted)")


def heldout_kl(reference: nn.Module, work: nn.Module, held: list[torch.Tensor], choices: list[dict[str, Option] | None],
               weights: dict[str, dict[Option, Any]], cfg: Any, drops: list[list[int]] | None = None, *,
               replay: bool = True, reference_cache: dict[int, Any] | None = None) -> list[float]:
    """Mean per-token KL(reference || plan) of the final logits on `held`, for each plan in
    `choices` written into `work` from the measured `weights` (None: `work` as it is; a linear a
    plan does not name is original, whatever the plans before it wrote), with the
    decoder layers `drops[k]` of plan k skipped (their linears' choice is `DROPPED`).

    Batches run outer, plans inner, so the reference logits are computed once per batch. With
    `replay`, a plan that changes nothing below decoder layer i starts at layer i: the layers
    below play back the reference's recorded outputs (`layer_drop.replayed`; `work` must be a copy
    of `reference` with the same weights outside the plans). The result is the same.

    When both models' logits are one plain linear head, the same in both (`head_kl.shared_head`), the
    models run with the head bypassed and the KL goes through the head in vocabulary chunks
    (`head_kl`): no [tokens, vocab] logits, the same KL to float rounding. Then `reference_cache`
    ({index in `held`: the reference's terms}, filled here) lets calls whose reference computes the
    same function on the same leading samples skip the reference's forward and head where no plan
    needs its recorded layers (`fit`: the calibration, the candidate check and the applied model's
    KL all measure against the original weights)."""
    import torch

    from qingzhou.compress.calibrate import batch_samples, find_decoder_layers
    from qingzhou.compress.fit.head_kl import heads_bypassed, kl_to, reference_side, shared_head
    from qingzhou.compress.fit.layer_drop import recorded, replayed, skipped
    from qingzhou.llm.devices import torch_device

    device = torch_device(getattr(cfg, "device", None))
    starts = [0] * len(choices)
    if replay:
        _, prefix = find_decoder_layers(work)
        starts = [_first_changed(c, drops[k] if drops else [], prefix) for k, c in enumerate(choices)]
    modules = dict(work.named_modules())
    originals: dict[str, torch.Tensor] = {}
    if any(c is not None for c in choices):
        originals = {n: modules[n].weight.detach().clone() for n in weights}
    totals = [0.0] * len(choices)
    tokens = 0
    loaded: dict[str, Option] = {}  # what each linear of `work` holds now: only changes are written
    homes = (_home(reference), _home(work))
    reference.to(device)
    work.to(device)
    reference.eval()
    work.eval()
    head = shared_head(reference, work, weights)
    try:
        with torch.no_grad(), heads_bypassed((reference, work), head):
            for i, batch in enumerate(batch_samples(held, 1)):
                ids = batch.to(device)
                outputs: list[Any] = []
                if reference_cache is not None and i in reference_cache and head is not None and max(starts) == 0:
                    ref = reference_cache[i]
                else:
                    with recorded(reference, max(starts)) as outputs:
                        ref = reference_side(reference, ids, head)
                    if reference_cache is not None and head is not None:
                        reference_cache[i] = ref
                for k, choice in enumerate(choices):
                    if choice is not None:
                        # a linear the plan does not name is original: undo what an earlier plan wrote
                        for name in [n for n, o in loaded.items() if n not in choice and not o.keep]:
                            modules[name].weight.copy_(originals[name])
                            loaded[name] = KEEP
                        for name, o in choice.items():
                            if loaded.get(name) == o or o == DROPPED:  # shared with the previous plan / skipped
                                continue
                            w = originals[name] if o.keep else weights[name][o].dequantize()
                            modules[name].weight.copy_(w.to(modules[name].weight))
                            loaded[name] = o
                    with skipped(work, drops[k] if drops else []), replayed(work, outputs, starts[k]):
                        totals[k] += kl_to(work, ids, ref, head)
                tokens += ids.numel()
    finally:
        for name, w in originals.items():
            modules[name].weight.data.copy_(w)
        for m, home in zip((reference, work), homes):
            if home is not None:
                m.to(home)
    return [t / max(tokens, 1) for t in totals]


def _first_changed(choice: dict[str, Any] | None, drops: list[int], prefix: str) -> int:
    """The lowest decoder layer a plan changes (a quantised or dropped linear, a dropped layer):
    `heldout_kl` replays the layers below it. 0 (replay nothing) for `None` (the model as it is),
    a changed linear outside the decoder layers, or a plan that changes nothing."""
    from qingzhou.compress.fit.layer_drop import split_layer_name

    if choice is None:
        return 0
    changed = [split_layer_name(n, prefix) for n, o in choice.items() if o == DROPPED or not o.keep]
    if None in changed:
        return 0
    return min([i for i, _ in changed] + list(drops), default=0)


def _home(m: nn.Module) -> Any:
    from qingzhou.compress.calibrate import _module_device

    return _module_device(m)


def write_fit_outputs(model: nn.Module, tokenizer: Any, report: FitReport, output_dir: str | Path, *,
                      overwrite: bool = False, load_stage: dict[str, Any] | None = None) -> Path:
    """The model folder (GPTQ layout, mixed bits in `quantization_config.dynamic`), `metrics.json`,
    `report.json` and `plan.yaml` (a recipe reproducing the weights), through `write_outputs`."""
    from qingzhou.compress.driver import write_outputs
    from qingzhou.compress.quantize.api import save_compressed
    from qingzhou.io import atomic_write_text
    from qingzhou.llm.quantized.gptq_layout import WEIGHTS

    output_dir = Path(output_dir)

    def write_model(folder: Path) -> None:
        save_compressed(model, tokenizer, folder, "gptq", overwrite=overwrite)
        report.file_bytes = (folder / WEIGHTS).stat().st_size

    write_outputs(output_dir, report, write_model)
    if load_stage is None:
        load_stage = {"model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or "MODEL")}
    atomic_write_text(output_dir / "plan.yaml", plan_yaml(report, load_stage))
    return output_dir


def plan_yaml(report: FitReport, load_stage: dict[str, Any]) -> str:
    """`report.plan_recipe(load_stage)` as YAML, with a comment saying what it reproduces."""
    import yaml

    head = ("# Written by `qingzhou fit`: this recipe reproduces the fitted model's weights exactly\n"
            "# (`qingzhou run plan.yaml OUT`), given the same model and the same calibration samples\n"
            "# (the `calibration` below; a fit called from Python with explicit samples used those).\n"
            f"# budget: {report.budget}; predicted file bytes {report.predicted_file_bytes}; "
            f"avg bits {report.avg_bits:.4f}; mix {report.mix()}\n")
    return head + yaml.safe_dump(report.plan_recipe(load_stage), sort_keys=False, width=120)
