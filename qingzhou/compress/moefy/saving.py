"""Saving and reloading a moefied model.

The folder is the dense model as plain transformers writes it (neurons reordered, which changes
nothing the dense model computes, so any loader or runtime reads it as an ordinary model), plus:
* `moefication.json`        - format version, experts per token, and per FFN its expert bounds,
                              layout and router shape;
* `moefication.safetensors` - the router weights (`<ffn name>.router.<param>`).
`apply_moefication(model, folder)` (or `load_moefied(folder)`) turns a loaded dense model back into
the MoE one. The json is written last, so a folder without it is simply the dense model.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from qingzhou.llm.moe import FORMAT, SPEC_FILE, VERSION, WEIGHTS_FILE, moe_modules, restore_dense, router_spec, set_top_k
from qingzhou.errors import ModelLoadError



def moefication_spec(model: nn.Module) -> dict[str, Any]:
    """What `moefication.json` holds for `model` (no tensors)."""
    ffns = {}
    for name, m in moe_modules(model).items():
        layout = {"up": m.layout.up, "down": m.layout.down, "act": m.layout.act, "gate": m.layout.gate}
        ffns[name] = {"bounds": m.bounds, "top_k": m.top_k, "layout": layout, "router": router_spec(m.router)}
    return {"format": FORMAT, "version": VERSION, "ffns": ffns}


def save_moefied(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the dense weights (`qingzhou.llm.save_model`), the router weights and the spec."""
    from safetensors.torch import save_file

    from qingzhou.io import atomic_write_json
    from qingzhou.llm import save_model

    spec = moefication_spec(model)
    if not spec["ffns"]:
        raise ModelLoadError("the model has no moefied FFN to save.", where="save_moefied",
                             hint="Run `moefy` first, or save it with `save_model`.")
    tensors = {f"{name}.router.{k}": v.detach().cpu().contiguous()
               for name, m in moe_modules(model).items() for k, v in m.router.state_dict().items()}
    with restore_dense(model):
        out_dir = save_model(model, tokenizer, out_dir, overwrite=overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_FILE}.", dir=out_dir)
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, out_dir / WEIGHTS_FILE)
    atomic_write_json(out_dir / SPEC_FILE, spec)
    return out_dir


def load_moefied(folder: str | Path, *, top_k: int | None = None, **load_kwargs: Any) -> tuple[nn.Module, Any]:
    """`qingzhou.llm.load_model(folder)` (which re-applies `moefication.json` itself), then an
    optional override of the experts per token."""
    from qingzhou.llm import load_model

    model, tokenizer = load_model(str(folder), **load_kwargs)
    if top_k is not None:
        set_top_k(model, top_k)
    return model, tokenizer
