"""`export_merged`: fold a LoRA/DoRA/rsLoRA/IA3 adapter into its base and save a plain model.

Prompt-based adapters (prompt tuning, prefix tuning, P-tuning v2) add virtual tokens / per-layer
key-value prefixes to the *input*, not a delta to any weight, so there is nothing to fold in; they
are copied unchanged in peft format and the result says why.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qingzhou.errors import ModelLoadError
from qingzhou.io import atomic_dir

MERGEABLE = {"LORA", "IA3", "ADALORA", "LOHA", "LOKR"}
PROMPT_TYPES = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"}
WHY_NOT = (
    "{kind} adapters learn virtual tokens (or per-layer key/value prefixes) that are fed in with every "
    "input; they are not a change to any weight matrix, so they cannot be merged into the base model. "
    "The adapter was copied unchanged in peft format: load it with peft.PeftModel.from_pretrained(base, path)."
)


BASE_NOTE = "qingzhou_base.json"  # beside adapter_config.json: what the user asked for, what was recorded
GGUF_BASE_NOTE = (
    "base_model_name_or_path is a GGUF file: peft (AutoPeftModelForCausalLM) and transformers cannot load a base "
    "from a .gguf path. qingzhou loads this adapter as is (qingzhou.load_model('<this folder>')); with peft, load "
    "the base yourself (AutoModelForCausalLM.from_pretrained(<its folder>, gguf_file=<its name>)) and pass it to "
    "PeftModel.from_pretrained(base, '<this folder>'), or save a Hugging Face copy of the base and record that."
)


def record_base(peft_model: Any, base_source: str) -> dict[str, Any]:
    """Write where the base model lives into every adapter config of `peft_model`
    (`base_model_name_or_path`), resolved so other programs find it: an alias like `smollm2` means
    nothing to peft, which would send it to the hub, and a relative path breaks once the folder
    moves (`recorded_source`). Returns the note saved as `BASE_NOTE` beside the adapter."""
    from qingzhou.llm.loading import recorded_source

    recorded = recorded_source(base_source)
    for pc in peft_model.peft_config.values():
        pc.base_model_name_or_path = recorded
    note: dict[str, Any] = {"requested": str(base_source), "base_model_name_or_path": recorded}
    if recorded.lower().endswith(".gguf"):
        note["note"] = GGUF_BASE_NOTE
    return note


@dataclass
class ExportResult:
    out_dir: str
    merged: bool
    peft_type: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_base(source: str, **load_kw: Any) -> Any:
    try:
        from qingzhou.llm import load_model  # the project's loader (aliases, GGUF, safetensors only)
    except ImportError:
        load_model = None
    if load_model is not None:
        model, _ = load_model(source, **load_kw)
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, use_safetensors=True)


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base_model: Any = None, *, overwrite: bool = False,
                  allow_pickle: bool = False, trust_remote_code: bool = False, strict: bool = True) -> ExportResult:
    """Merge the peft adapter at `adapter_dir` into its base and save the merged model to `out_dir`.

    `base_model` is a loaded model (it is modified in place) or a path/alias; by default the
    adapter's recorded `base_model_name_or_path`. A non-empty `out_dir` is replaced only with
    `overwrite=True`, and only if qingzhou wrote it. An adapter saved only as pickle
    (adapter_model.bin) is refused unless `allow_pickle`; the other flags go to `load_model`.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        if (adapter_dir / "config.json").is_file():
            raise ModelLoadError("this is a full model, not an adapter: there is nothing to merge.", where=str(adapter_dir),
                                 hint="Use the folder directly as the model.")
        raise ModelLoadError("no adapter_config.json here.", where=str(adapter_dir), hint="Point at a peft adapter folder.")
    from qingzhou.llm.loading import check_adapter

    adapter_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    check_adapter(adapter_dir, str(adapter_dir), allow_pickle)
    peft_type = str(adapter_cfg.get("peft_type", "")).upper()
    if peft_type in PROMPT_TYPES or peft_type not in MERGEABLE:
        with atomic_dir(out_dir, overwrite=overwrite, what="adapter copy") as tmp:
            shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
        kind = peft_type.lower().replace("_", " ") or "these"
        return ExportResult(str(out_dir), False, peft_type, WHY_NOT.format(kind=kind))

    if base_model is None or isinstance(base_model, (str, Path)):
        source = str(base_model or adapter_cfg.get("base_model_name_or_path") or "")
        if not source:
            raise ModelLoadError("the adapter does not record its base model.", where=str(cfg_file), hint="Pass base_model.")
        base_model = _load_base(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, strict=strict)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    with atomic_dir(out_dir, overwrite=overwrite, what="merged model") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if (adapter_dir / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    variant = "DoRA" if adapter_cfg.get("use_dora") else ("rsLoRA" if adapter_cfg.get("use_rslora") else peft_type)
    return ExportResult(str(out_dir), True, peft_type, f"merged {variant} adapter into the base model")
