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

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from qingzhou.compress.moefy.module import (
    MLPLayout,
    MoEMLP,
    mlp_layout,
    moe_modules,
    replace_module,
    restore_dense,
    set_top_k,
)
from qingzhou.compress.moefy.router import make_router, router_spec
from qingzhou.errors import ModelLoadError

FORMAT = "qingzhou-moefication"
VERSION = 1
SPEC_FILE = "moefication.json"
WEIGHTS_FILE = "moefication.safetensors"


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


def is_moefied_folder(folder: str | Path) -> bool:
    return (Path(folder) / SPEC_FILE).is_file()


def apply_moefication(model: nn.Module, folder: str | Path, *, top_k: int | None = None) -> nn.Module:
    """Re-create the MoE modules of a moefied folder on `model` (its dense weights, loaded from
    that folder); `top_k` overrides the saved experts per token."""
    from safetensors.torch import load_file

    folder = Path(folder)
    where = str(folder / SPEC_FILE)
    try:
        spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read the moefication spec ({e}).", where=where) from e
    if spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise ModelLoadError(f"not a {FORMAT} v{VERSION} file (format={spec.get('format')!r}, "
                             f"version={spec.get('version')!r}).", where=where)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    for name, entry in spec["ffns"].items():
        try:
            mlp = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"the model has no module {name!r}.", where=where,
                                 hint="Load the model saved in the same folder.") from None
        layout = MLPLayout(**entry["layout"])
        if mlp_layout(mlp) != layout or getattr(mlp, layout.down).in_features != entry["bounds"][-1]:
            raise ModelLoadError(f"{name} does not match the saved FFN (layout {layout}, "
                                 f"width {entry['bounds'][-1]}).", where=where)
        weight = getattr(mlp, layout.up).weight
        router = make_router(**entry["router"])
        prefix = f"{name}.router."
        router.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        router = router.to(device=weight.device, dtype=weight.dtype).requires_grad_(False).eval()
        replace_module(model, name, MoEMLP(mlp, layout, entry["bounds"], router, top_k or entry["top_k"]))
    return model


def load_moefied(folder: str | Path, *, top_k: int | None = None, **load_kwargs: Any) -> tuple[nn.Module, Any]:
    """`qingzhou.llm.load_model(folder)` (which re-applies `moefication.json` itself), then an
    optional override of the experts per token."""
    from qingzhou.llm import load_model

    model, tokenizer = load_model(str(folder), **load_kwargs)
    if top_k is not None:
        set_top_k(model, top_k)
    return model, tokenizer
