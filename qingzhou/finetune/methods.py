"""Adaptation methods: one config class + one builder each, registered with one line.

Builders take a plain transformers model and return the model to train (a peft model, or the model
itself with every weight trainable for full fine-tuning). peft does the adapters; we choose the
target modules per architecture (override with `target_modules`).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError

from qingzhou.errors import RecipeError
from qingzhou.finetune.config import FinetuneConfig
from qingzhou.finetune.quant_scales import QuantScalesConfig, fold_scales, make_scales_trainable, save_quantized_folder
from qingzhou.registry import Registry

# name -> build(model, cfg) -> trainable model; config = the method's FinetuneConfig subclass;
# meta `mergeable`: the adapter can be merged into the base weights (export merge); `finish(model)`
# runs on every process after training (before the held-out loss and the save); `save(model,
# tokenizer, folder)` writes a whole-model artifact in the method's own format.
METHODS: Registry[Any] = Registry("fine-tuning method")


def register_method(name: str, config: type[FinetuneConfig], *, mergeable: bool, finish: Any = None, save: Any = None):
    """Decorator: `build(model, cfg) -> trainable model` for fine-tuning method `name`."""
    return METHODS.register(name, config, mergeable=mergeable, finish=finish, save=save)


def parse_finetune_config(data: dict[str, Any] | FinetuneConfig) -> FinetuneConfig:
    """Validate a dict against the config class of its `method` (default lora); a typed config
    passes through unchanged."""
    if isinstance(data, FinetuneConfig):
        return data
    method = data.get("method", "lora")
    entry = METHODS.get(str(method), where="method")
    try:
        return entry.config.model_validate({**data, "method": method})
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{first['msg']}.", where=key or "finetune",
                          hint=f"({e.error_count()} problem(s) in the {method} config)") from None


# Attention + MLP projections per model_type; anything unknown falls back to every linear layer.
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_MODULES: dict[str, list[str]] = {
    **{t: LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "deepseek_v2", "deepseek_v3",
                                "internlm2", "yi", "granite", "smollm3", "starcoder2", "cohere")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "chatglm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "baichuan": ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
# IA3 rescales keys, values and the MLP input of the down projection ("feed-forward" modules)
IA3_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "llama_like": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "c_proj"], ["c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
}


def target_modules_for(model: Any, override: list[str] | str | None = None) -> list[str] | str:
    """Module names to adapt: the override, the table entry for the architecture, or 'all-linear'."""
    if override:
        return override
    return TARGET_MODULES.get(getattr(model.config, "model_type", ""), "all-linear")


def _task_type():
    from peft import TaskType

    return TaskType.CAUSAL_LM


# ---------------------------------------------------------------- full fine-tuning
class FullConfig(FinetuneConfig):
    method: Literal["full"] = "full"
    learning_rate: float = Field(2e-5, gt=0)
    freeze_embeddings: bool = Field(False, description="keep input/output embeddings fixed (saves optimizer memory)")


@register_method("full", FullConfig, mergeable=False)
def build_full(model: Any, cfg: FullConfig) -> Any:
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.freeze_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)
    return model


@register_method("quant_scales", QuantScalesConfig, mergeable=False, finish=fold_scales,
                 save=save_quantized_folder)
def build_quant_scales(model: Any, cfg: QuantScalesConfig) -> Any:
    return make_scales_trainable(model, train_norms=cfg.train_norms)


# ---------------------------------------------------------------- LoRA family
class LoraConfig(FinetuneConfig):
    method: Literal["lora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0, description="scaling numerator: alpha/r (alpha/sqrt(r) for rsLoRA)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input; 0 as in peft, LLaMA-Factory "
                           "and torchtune: above 0 peft keeps a dropped copy of every adapted layer's input for backward")
    target_modules: list[str] | str | None = Field(None, description="module names or 'all-linear'; None: per architecture")
    modules_to_save: list[str] | None = None


class DoraConfig(LoraConfig):
    method: Literal["dora"] = "dora"


class RsLoraConfig(LoraConfig):
    method: Literal["rslora"] = "rslora"


class QLoraConfig(LoraConfig):
    method: Literal["qlora"] = "qlora"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the 4-bit base is dequantised to (auto: float32 on CPU, bf16/fp16 on GPUs)")


def _lora(model: Any, cfg: LoraConfig, *, dora: bool = False, rslora: bool = False) -> Any:
    import peft

    config = peft.LoraConfig(
        task_type=_task_type(), r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=target_modules_for(model, cfg.target_modules), modules_to_save=cfg.modules_to_save,
        use_dora=dora, use_rslora=rslora,
    )
    _register_quantized_bases(model, config)
    return peft.get_peft_model(model, config)


def _register_quantized_bases(model: Any, config: Any) -> None:
    """peft wraps only base layer types it knows. qingzhou's own `QuantLinear` (GPTQ layout) takes
    peft's GPTQ LoRA layer, which adds the adapter on top of the base layer's forward, so a
    quantised model (e.g. a distillation student) can be LoRA-tuned on its frozen 4-bit base."""
    from qingzhou.llm.quantized.qlinear import QuantLinear

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        from peft.tuners.lora.gptq import GPTQLoraLinear

        config._register_custom_module({QuantLinear: GPTQLoraLinear})


@register_method("lora", LoraConfig, mergeable=True)
def build_lora(model: Any, cfg: LoraConfig) -> Any:
    return _lora(model, cfg)


@register_method("dora", DoraConfig, mergeable=True)
def build_dora(model: Any, cfg: DoraConfig) -> Any:
    return _lora(model, cfg, dora=True)


@register_method("rslora", RsLoraConfig, mergeable=True)
def build_rslora(model: Any, cfg: RsLoraConfig) -> Any:
    return _lora(model, cfg, rslora=True)


@register_method("qlora", QLoraConfig, mergeable=True)
def build_qlora(model: Any, cfg: QLoraConfig) -> Any:
    """Quantise the frozen base linears to 4-bit NF4 with bitsandbytes, then add LoRA on top."""
    from qingzhou.finetune.qlora import quantize_base_4bit

    model = quantize_base_4bit(model, quant_type=cfg.quant_type, double_quant=cfg.double_quant, compute_dtype=cfg.compute_dtype)
    return _lora(model, cfg)


# ---------------------------------------------------------------- IA3
class IA3Config(FinetuneConfig):
    method: Literal["ia3"] = "ia3"
    learning_rate: float = Field(3e-3, gt=0)
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None


@register_method("ia3", IA3Config, mergeable=True)
def build_ia3(model: Any, cfg: IA3Config) -> Any:
    import peft

    model_type = getattr(model.config, "model_type", "")
    key = model_type if model_type in IA3_MODULES else ("llama_like" if TARGET_MODULES.get(model_type) == LLAMA_LIKE else None)
    if cfg.target_modules is None and key is None:
        raise RecipeError(f"no default IA3 modules for architecture '{model_type}'.", where="target_modules",
                          hint="Set target_modules and feedforward_modules.")
    targets, ff = IA3_MODULES[key] if key else ([], [])
    targets = cfg.target_modules or targets
    ff = cfg.feedforward_modules if cfg.feedforward_modules is not None else [m for m in ff if m in targets]
    return peft.get_peft_model(model, peft.IA3Config(task_type=_task_type(), target_modules=targets, feedforward_modules=ff))


# ---------------------------------------------------------------- prompt-based methods
class PromptTuningConfig(FinetuneConfig):
    method: Literal["prompt_tuning"] = "prompt_tuning"
    learning_rate: float = Field(3e-2, gt=0)
    num_virtual_tokens: int = Field(20, gt=0)
    init_text: str | None = Field(None, description="initialise the soft prompt from this text's embeddings")


@register_method("prompt_tuning", PromptTuningConfig, mergeable=False)
def build_prompt_tuning(model: Any, cfg: PromptTuningConfig) -> Any:
    import peft

    kwargs: dict[str, Any] = {}
    if cfg.init_text:
        kwargs = dict(prompt_tuning_init=peft.PromptTuningInit.TEXT, prompt_tuning_init_text=cfg.init_text,
                      tokenizer_name_or_path=getattr(model, "_qingzhou_tokenizer_path", None))
        if kwargs["tokenizer_name_or_path"] is None:
            raise RecipeError("init_text needs a tokenizer saved on disk.", where="init_text", hint="Leave init_text unset for random init.")
    return peft.get_peft_model(model, peft.PromptTuningConfig(task_type=_task_type(), num_virtual_tokens=cfg.num_virtual_tokens, **kwargs))


class PrefixTuningConfig(FinetuneConfig):
    method: Literal["prefix_tuning"] = "prefix_tuning"
    learning_rate: float = Field(1e-2, gt=0)
    num_virtual_tokens: int = Field(20, gt=0)
    encoder_hidden_size: int | None = Field(None, gt=0, description="width of the reparameterisation MLP (default: hidden size)")


class PTuningV2Config(FinetuneConfig):
    method: Literal["p_tuning"] = "p_tuning"
    learning_rate: float = Field(1e-2, gt=0)
    num_virtual_tokens: int = Field(20, gt=0)


@register_method("prefix_tuning", PrefixTuningConfig, mergeable=False)
def build_prefix_tuning(model: Any, cfg: PrefixTuningConfig) -> Any:
    """Li & Liang prefix tuning: per-layer key/value prefixes produced by a small MLP (reparameterised)."""
    import peft

    hidden = cfg.encoder_hidden_size or model.config.hidden_size
    return peft.get_peft_model(model, peft.PrefixTuningConfig(
        task_type=_task_type(), num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=True, encoder_hidden_size=hidden))


@register_method("p_tuning", PTuningV2Config, mergeable=False)
def build_p_tuning_v2(model: Any, cfg: PTuningV2Config) -> Any:
    """P-tuning v2 (Liu et al. 2022): deep prompts at every layer, learned directly (no MLP)."""
    import peft

    return peft.get_peft_model(model, peft.PrefixTuningConfig(
        task_type=_task_type(), num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=False))


def build_method(model: Any, cfg: FinetuneConfig) -> Any:
    return METHODS.get(cfg.method, where="method").obj(model, cfg)
