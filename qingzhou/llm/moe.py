"""The MoE runtime: the module that replaces a dense FFN, the FFN layouts it knows, the router
shapes, and `apply_moefication`, which rebuilds a saved moefied folder on a loaded dense model
(so `load_model` restores MoE structure without reaching up into `compress.moefy`).

A moefied FFN is the *same* dense FFN with its intermediate neurons reordered so that expert i is
the contiguous slice `bounds[i]:bounds[i+1]` of gate/up rows and down columns. Reordering neurons
does not change what the dense FFN computes, so the weights still save and load as the original
architecture; the module only adds a router and, per token, runs the slices of its top-e experts.
With e == k every slice runs for every token and the output equals the dense FFN's (up to float
summation order).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qingzhou.errors import ModelLoadError


@dataclass(frozen=True)
class MLPLayout:
    """Attribute names of one FFN family: out = down(act(gate(x)) * up(x)), or down(act(up(x)))."""

    up: str
    down: str
    act: str
    gate: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.gate, self.up, self.down) if n)


LAYOUTS = (
    MLPLayout(gate="gate_proj", up="up_proj", down="down_proj", act="act_fn"),  # Llama, Qwen2/3, Mistral, Gemma
    MLPLayout(up="fc1", down="fc2", act="activation_fn"),  # Phi
    MLPLayout(up="dense_h_to_4h", down="dense_4h_to_h", act="act"),  # GPT-NeoX, Pythia
    MLPLayout(up="c_fc", down="c_proj", act="act"),  # StarCoder2 (GPT-2's Conv1D is not nn.Linear: refused)
)


def mlp_layout(mlp: nn.Module) -> MLPLayout | None:
    """The layout `mlp` follows (all its projections plain nn.Linear), or None."""
    for layout in LAYOUTS:
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in layout.names) and hasattr(mlp, layout.act):
            return layout
    return None


def ffn_activations(mlp: nn.Module, layout: MLPLayout, x: torch.Tensor) -> torch.Tensor:
    """The intermediate activations [tokens, neurons] (what down_proj reads), in float32."""
    act = getattr(mlp, layout.act)
    up = getattr(mlp, layout.up)
    h = F.linear(x.float(), up.weight.float(), None if up.bias is None else up.bias.float())
    if layout.gate is None:
        return act(h)
    gate = getattr(mlp, layout.gate)
    g = F.linear(x.float(), gate.weight.float(), None if gate.bias is None else gate.bias.float())
    return act(g) * h


@torch.no_grad()
def permute_neurons(mlp: nn.Module, layout: MLPLayout, order: torch.Tensor) -> None:
    """Reorder the intermediate neurons in place (gate/up rows, down columns); same function."""
    for name in (layout.gate, layout.up):
        if name:
            lin = getattr(mlp, name)
            lin.weight.data = lin.weight.data[order.to(lin.weight.device)].contiguous()
            if lin.bias is not None:
                lin.bias.data = lin.bias.data[order.to(lin.bias.device)].contiguous()
    down = getattr(mlp, layout.down)
    down.weight.data = down.weight.data[:, order.to(down.weight.device)].contiguous()


class MoEMLP(nn.Module):
    """An FFN split into experts (contiguous neuron slices) with a router; runs the top-e per token.

    The projections are registered under their original names, so `state_dict()` keys are the
    dense model's (plus `router.*`). `dense` (not a submodule) is the original FFN sharing the
    same linears, which `restore_dense` puts back for saving.
    """

    def __init__(self, dense: nn.Module, layout: MLPLayout, bounds: list[int], router: nn.Module, top_k: int):
        super().__init__()
        for name in layout.names:
            self.add_module(name, getattr(dense, name))
        self.act = getattr(dense, layout.act)
        self.router = router
        self.layout = layout
        self.bounds = list(bounds)
        self.num_experts = len(bounds) - 1
        self.top_k = top_k
        object.__setattr__(self, "dense", dense)  # a plain attribute: not a second copy in state_dict

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, widths={self.widths()}"

    def widths(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def select(self, x2d: torch.Tensor) -> torch.Tensor:
        """Indices [tokens, top_k] of the experts each token runs."""
        scores = self.router(x2d)
        return torch.topk(scores.float(), self.top_k, dim=-1).indices

    def expert(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Expert i's contribution to the FFN output (without down_proj's bias)."""
        a, b = self.bounds[i], self.bounds[i + 1]
        up = getattr(self, self.layout.up)
        h = F.linear(x, up.weight[a:b], None if up.bias is None else up.bias[a:b])
        if self.layout.gate is None:
            h = self.act(h)
        else:
            gate = getattr(self, self.layout.gate)
            h = self.act(F.linear(x, gate.weight[a:b], None if gate.bias is None else gate.bias[a:b])) * h
        return F.linear(h, getattr(self, self.layout.down).weight[:, a:b])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        down = getattr(self, self.layout.down)
        out = x2d.new_zeros(x2d.shape[0], down.out_features)
        if self.top_k >= self.num_experts:
            for i in range(self.num_experts):
                out += self.expert(x2d, i)
        elif x2d.shape[0] == 1:  # decoding one token: no gather/scatter, just its experts
            for i in self.select(x2d)[0].tolist():
                out += self.expert(x2d, i)
        else:
            chosen = self.select(x2d)
            for i in range(self.num_experts):
                rows = (chosen == i).any(dim=1).nonzero().squeeze(1)
                if rows.numel():
                    out.index_add_(0, rows, self.expert(x2d.index_select(0, rows), i))
        if down.bias is not None:
            out += down.bias
        return out.reshape(*shape[:-1], down.out_features)


def moe_modules(model: nn.Module) -> dict[str, MoEMLP]:
    """Every MoEMLP in `model`, by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEMLP)}


def set_top_k(model: nn.Module, top_k: int) -> None:
    """Change how many experts every moefied FFN runs per token (the compute/quality knob)."""
    for m in moe_modules(model).values():
        if not 1 <= top_k <= m.num_experts:
            raise ValueError(f"top_k={top_k} is outside 1..{m.num_experts}")
        m.top_k = top_k


class restore_dense:
    """Context manager: the original dense FFNs in place of the MoE modules (e.g. while saving)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.swapped: dict[str, MoEMLP] = {}

    def __enter__(self) -> nn.Module:
        self.swapped = moe_modules(self.model)
        for name, m in self.swapped.items():
            self.model.set_submodule(name, m.dense)
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for name, m in self.swapped.items():
            self.model.set_submodule(name, m)


def make_router(hidden_size: int, k: int, width: int = 0, bias: bool = True) -> nn.Module:
    """A router's shape: linear (width 0; the centroid router is one without bias) or
    Linear-ReLU-Linear. `router_spec` describes it for saving."""
    if width == 0:
        return nn.Linear(hidden_size, k, bias=bias)
    return nn.Sequential(nn.Linear(hidden_size, width, bias=bias), nn.ReLU(), nn.Linear(width, k, bias=bias))


def router_spec(router: nn.Module) -> dict[str, int | bool]:
    """The `make_router` arguments that rebuild `router` (what moefication.json records)."""
    first = router if isinstance(router, nn.Linear) else router[0]
    last = router if isinstance(router, nn.Linear) else router[-1]
    return {"hidden_size": first.in_features, "k": last.out_features,
            "width": 0 if isinstance(router, nn.Linear) else first.out_features, "bias": first.bias is not None}


# ----------------------------------------------------------------------------- saved folders
FORMAT = "qingzhou-moefication"
VERSION = 1
SPEC_FILE = "moefication.json"
WEIGHTS_FILE = "moefication.safetensors"


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
        model.set_submodule(name, MoEMLP(mlp, layout, entry["bounds"], router, top_k or entry["top_k"]))
    return model
