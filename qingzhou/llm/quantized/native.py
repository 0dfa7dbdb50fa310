"""The native decode step: `native_decode.c`, compiled with the system C compiler at first use.

Why: at batch 1 on a CPU, a small 4-bit model's token is mostly per-op dispatch when driven from
Python (lean_decode.py's docstring), and torch's int4 kernel converts every weight to bf16 before
multiplying. llama.cpp multiplies 4-bit weights with 8-bit activations in integer dot products in
one C step per token; this does the same for the Llama-family models lean decoding covers: one call
per token, one OpenMP team, int4 x int8 dot products (AVX2, and AVX-512 VNNI where the CPU has it),
the head in int8, norms / rotary / attention / SiLU in fp32. CPUs without AVX2 (ARM included) keep
torch's kernels: the file's plain C loops, tested for the same logits, ran at 28 tok/s on SmolLM2
4-bit against 199 for its AVX2 build and ~90 for the torch lean step.

Where it runs: `LeanDecoder.step` sends each one-token step here (the prompt's many-row prefill stays
on torch's kernels, sharing the same KV cache) when `native_model(model)` gives a model, i.e. a C
compiler was found and the library built (cached under the qingzhou cache, keyed by the source, the
compiler, its flags and the CPU), the model is fp32 with the lean path's linears, and every 4-bit
linear's group size is a multiple of 32. Act-order checkpoints (a permuted `g_idx`) are stored with
their columns sorted by group and each input gathered in that order before it is quantised; the
linears that read one input (q/k/v, gate/up) must share the order, as GPTQ's act-order gives them.
`QINGZHOU_NATIVE=0` turns it off. Its numbers differ from the torch path by the int8 rounding of each
matrix-vector product's input (llama.cpp's Q8 scheme); lean_decode's first-use check holds the final
hidden state to `CHECK_RTOL` of the model's own forward, and falls back to torch on a mismatch.

Memory: the step reads its own copy of the codes (half a byte per weight, plus fp32 scales and
offsets per group) and an int8 copy of the head; the torch packs stay for the prefill.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qingzhou.llm.quantized.int4_kernel import _column_order
from qingzhou.llm.quantized.qlinear import QuantLinear

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_decode.c")
ABI = 2
QK = 32  # the activation block (native_decode.c)
CHECK_RTOL = 0.1  # final hidden state vs the forward: SmolLM2 4-bit measures 1.8% mean, 3.3% max over 40 steps (int8 activations); a layout error ~100%
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"])  # the second: no OpenMP (one thread)
# model -> (the packs it was built from, its NativeModel): not an attribute, so `copy.deepcopy(model)`
# neither copies the C handle nor shares pointers into the original's tensors
_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OFF = "_qingzhou_native_off"  # the reason the C step is off for a model (its check failed)
_CHECKED = "_qingzhou_native_checked"


def disable(model: nn.Module, why: str) -> None:
    """Turn the C step off for `model` (its first-use check failed): the torch lean path stays."""
    log.warning("native decode step disagrees with the model's forward (%s); decoding on torch's kernels "
                "for this model", why)
    object.__setattr__(model, _OFF, why)
    _BUILT.pop(model, None)


def mark_checked(model: nn.Module) -> None:
    object.__setattr__(model, _CHECKED, True)


def checked(model: nn.Module) -> bool:
    """Whether the C step passed its first-use check on `model` (lean_decode._check)."""
    return getattr(model, _CHECKED, False)


def _cache_root() -> Path:
    root = os.environ.get("QINGZHOU_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "qingzhou")
    return Path(root).expanduser() / "native"


def _cpu_id() -> str:
    """What `-march=native` compiles for: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile(cc: str, flags: list[str], out: Path) -> bool:
    """Build the shared library at `out` atomically (temp file + rename); False if the compiler fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            log.debug("native decode: %s failed: %s", " ".join(cmd), done.stderr[-2000:])
            return False
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("native decode: compiling failed: %s", e)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.qz_abi.restype = i
    lib.qz_simd.restype = i
    lib.qz_create.restype = p
    lib.qz_create.argtypes = [i, i, i, i, i, i, i, f, p, p, p, p, p]
    lib.qz_set_layer.restype = None
    lib.qz_set_layer.argtypes = [p, i, p, p, p, p, p, p, p, p, p, p]
    lib.qz_free.restype = None
    lib.qz_free.argtypes = [p]
    lib.qz_step.restype = i
    lib.qz_step.argtypes = [p, i, i, i, p, p, p, p, p, p, i]
    return lib


def build(flags: list[str] | tuple[str, ...]) -> ctypes.CDLL | None:
    """The step compiled with `flags` (cached under the qingzhou cache, keyed by the source, the
    compiler, the flags and the CPU), loaded; None where it does not compile or load here."""
    cc = _compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(),
                                     _cpu_id().encode(), platform.machine().encode()])).hexdigest()[:20]
    so = _cache_root() / f"decode-{key}.so"
    if not (so.exists() or _compile(cc, list(flags), so)):
        return None
    try:
        lib = _bind(ctypes.CDLL(str(so)))
    except OSError as e:
        log.debug("native decode: loading %s failed: %s", so, e)
        return None
    return lib if lib.qz_abi() == ABI else None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled step, built once per machine with the first flag set that compiles (the CPU's
    own instructions and OpenMP, then without them); None without a working C compiler or with
    `QINGZHOU_NATIVE=0` (lean decoding then stays on torch's kernels)."""
    if os.environ.get("QINGZHOU_NATIVE", "1") == "0":
        return None
    if _compiler() is None:
        log.info("native decode: no C compiler found (cc / gcc / clang, or $CC); decoding on torch's kernels")
        return None
    for flags in _FLAG_SETS:
        lib = build(flags)
        if lib is not None and lib.qz_simd():
            log.debug("native decode: built with %s", " ".join(flags))
            return lib
    # plain C loops (no AVX2 here, e.g. ARM): measured 28 tok/s on SmolLM2 4-bit against 199 with
    # AVX2 and ~90 for torch's kernels, so one-token steps stay on torch
    log.info("native decode: no vectorised build of the C step here (x86 AVX2 with %s); decoding on "
             "torch's kernels", _compiler())
    return None


@dataclass
class NativeModel:
    """A model's weights in the C step's layouts, and the handle of its C-side description. The
    tensors here are what the C side reads: they live as long as this object."""

    lib: Any
    handle: int
    hidden: int
    vocab: int
    keep: list[torch.Tensor] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the C side's scratch is one per model

    @property
    def bytes_per_step(self) -> int:
        """Bytes a one-token step reads: every tensor the C side holds but the embedding (one row)."""
        return sum(t.numel() * t.element_size() for t in self.keep[1:])  # keep[0]: the embedding

    def __del__(self):
        if getattr(self, "handle", 0):
            self.lib.qz_free(self.handle)
            self.handle = 0

    def step(self, token: int, pos: int, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
             values: torch.Tensor, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [vocab] and final hidden state [hidden] of `token` at `pos` (its K/V written into
        `keys`/`values` [layers, 1, kv_heads, max_len, head_dim] at `pos`)."""
        logits = torch.empty(self.vocab)
        hidden = torch.empty(self.hidden)
        with self.lock:
            rc = self.lib.qz_step(self.handle, token, pos, keys.shape[-2], cos.data_ptr(), sin.data_ptr(), keys.data_ptr(),
                                  values.data_ptr(), logits.data_ptr(), hidden.data_ptr(), threads)
        if rc != 0:
            raise ValueError(f"native decode step refused token {token} at position {pos}")
        return logits, hidden


def _order(lin: QuantLinear) -> torch.Tensor | None:
    """The input-column order that makes the layer's groups contiguous (act-order checkpoints; the
    int4 kernel's `_column_order`), None where they already are; raises ValueError where no order
    does (groups of unequal size)."""
    g = lin.group_size if lin.group_size > 0 else lin.in_features
    perm = _column_order(lin.g_idx, g)
    if perm is None:
        raise ValueError("groups of unequal size")
    return None if torch.equal(perm, torch.arange(lin.in_features)) else perm


def _q4(lin: QuantLinear, keep: list[torch.Tensor]) -> tuple[tuple[int, int, int, int, int, int, int],
                                                               torch.Tensor | None]:
    """A 4-bit linear in the C layout (columns in `_order`): its (codes, s, m, bias pointers, rows,
    k, group), and the order (None where the columns are in order)."""
    g = lin.group_size if lin.group_size > 0 else lin.in_features
    codes = lin.codes().to(torch.uint8)
    perm = _order(lin)
    if perm is not None:
        codes = codes[:, perm]
    codes = codes.view(lin.out_features, lin.in_features // QK, 2, QK // 2)
    packed = (codes[:, :, 0] | (codes[:, :, 1] << 4)).contiguous()
    s = lin.scales.float().T.contiguous()
    m = (lin.zero_points().float().T * s).contiguous()
    bias = lin.bias.float().contiguous() if lin.bias is not None else None
    keep += [packed, s, m] + ([bias] if bias is not None else [])
    return (packed.data_ptr(), s.data_ptr(), m.data_ptr(), bias.data_ptr() if bias is not None else 0,
            lin.out_features, lin.in_features, g), perm


def _int8_blocks(w: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of `w` [out, in] with one fp32 scale per 32 inputs (llama.cpp's Q8_0),
    `rows` rows at a time (an fp32 temporary of a whole 128k-vocabulary head would be gigabytes)."""
    out, k = w.shape
    codes = torch.empty(out, k, dtype=torch.int8)
    scales = torch.empty(out, k // QK, dtype=torch.float32)
    for i in range(0, out, rows):
        block = w[i:i + rows].detach().float().view(-1, k // QK, QK)
        d = block.abs().amax(-1) / 127
        codes[i:i + rows] = torch.round(block / d.clamp_min(1e-30)[..., None]).clamp_(-127, 127).view(-1, k)
        scales[i:i + rows] = d
    return codes, scales


def _switched_off(model: nn.Module) -> str | None:
    """Why the C step is off for `model` whatever its shapes: its check failed, or QINGZHOU_NATIVE=0."""
    if getattr(model, _OFF, None):
        return f"its first-use check failed ({getattr(model, _OFF)})"
    if os.environ.get("QINGZHOU_NATIVE", "1") == "0":
        return "QINGZHOU_NATIVE=0"
    return None


def why_not(model: nn.Module) -> str | None:
    """None if the C step can run this (lean-decodable) model, else the reason."""
    off = _switched_off(model)
    if off is not None:
        return off
    if library() is None:
        return "the native step is not built here (no C compiler, or QINGZHOU_NATIVE=0)"
    cfg, inner = model.config, model.model
    if inner.embed_tokens.weight.dtype != torch.float32:
        return f"model dtype {inner.embed_tokens.weight.dtype} (the C step is fp32)"
    if cfg.hidden_size % QK or cfg.intermediate_size % QK:
        return "hidden or intermediate size not a multiple of 32"
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if head_dim % 2 or (heads * head_dim) % QK:
        return "head sizes the C step does not take"
    head = model.get_output_embeddings()
    if head is None or type(head).__name__ not in ("Linear", "FastHead") or head.weight.shape[1] % QK:
        return "an output head that is not a plain linear layer over the hidden size"
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            g = lin.group_size if lin.group_size > 0 else lin.in_features
            if lin.bits != 4 or g % QK or lin.in_features % g or lin.scale_factor is not None:
                return "a decoder linear that is not 4-bit with groups of a multiple of 32"
        for set_ in ((a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)):  # one input, one order
            if len({lin.group_size for lin in set_}) != 1:
                return "q/k/v (or gate/up) with different group sizes"
            try:
                orders = [_order(lin) for lin in set_]
            except ValueError:
                return "act-order groups of unequal size"
            if any((o is None) != (orders[0] is None) or (o is not None and not torch.equal(o, orders[0]))
                   for o in orders):
                return "q/k/v (or gate/up) whose act-order column orders differ"
        try:
            _order(a.o_proj), _order(m.down_proj)
        except ValueError:
            return "act-order groups of unequal size"
        for name in ("input_layernorm", "post_attention_layernorm"):
            if getattr(getattr(layer, name), "weight", None) is None:
                return f"a decoder layer without {name}.weight"
    return None


def _packs(model: nn.Module) -> list:
    """Every decoder linear's current CPU fp32 int4 pack: the lean path builds them first, and new
    weights or scales drop them (`QuantLinear.clear_runtime`), so they mark what a build read."""
    key = (torch.device("cpu"), torch.float32)
    return [lin._fast.get(key) for lin in model.modules() if isinstance(lin, QuantLinear)]


def native_model(model: nn.Module) -> NativeModel | None:
    """The model in the C step's layouts (built once and kept on the model; rebuilt after new
    weights), or None where `why_not` says so."""
    cached = _BUILT.get(model)
    if cached is not None and _switched_off(model) is None and all(a is b for a, b in zip(cached[0], _packs(model))):
        return cached[1]
    reason = why_not(model)
    if reason is not None:
        log.debug("native decode not used: %s", reason)
        return None
    native = load_model(model, library())
    if native is not None:
        _BUILT[model] = (_packs(model), native)
    return native


def _column(mats: list[tuple], j: int, ctype: Any) -> ctypes.Array:
    """Field `j` of the 7 matrices of a layer, as a C array."""
    return (ctype * len(mats))(*[x[j] for x in mats])


def load_model(model: nn.Module, lib: ctypes.CDLL) -> NativeModel | None:
    """`model` (one `why_not` accepts) described to the library `lib`: the C layouts of its weights."""
    cfg, inner = model.config, model.model
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    keep: list[torch.Tensor] = []
    embed = inner.embed_tokens.weight.detach().contiguous()
    final = inner.norm.weight.detach().float().contiguous()
    head = model.get_output_embeddings()
    head_q, head_d = _int8_blocks(head.weight)
    bias = head.bias.detach().float().contiguous() if getattr(head, "bias", None) is not None else None
    keep += [embed, final, head_q, head_d] + ([bias] if bias is not None else [])
    eps = float(getattr(inner.norm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6)))
    handle = lib.qz_create(len(inner.layers), cfg.hidden_size, heads, kv_heads, head_dim, cfg.intermediate_size,
                           head.weight.shape[0], eps, embed.data_ptr(), final.data_ptr(),
                           head_q.data_ptr(), head_d.data_ptr(), bias.data_ptr() if bias is not None else None)
    if not handle:
        return None
    native = NativeModel(lib, handle, cfg.hidden_size, head.weight.shape[0], keep)
    vp, ci = ctypes.c_void_p, ctypes.c_int
    for i, layer in enumerate(inner.layers):
        a, m = layer.self_attn, layer.mlp
        built = [_q4(lin, keep) for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj,
                                             m.down_proj)]
        mats = [fields for fields, _ in built]
        # the input orders of q/k/v, o, gate/up and down (why_not checked that each set shares one)
        perms = [built[j][1] for j in (0, 3, 4, 6)]
        perms = [p.to(torch.int32).contiguous() if p is not None else None for p in perms]
        keep += [p for p in perms if p is not None]
        n1 = layer.input_layernorm.weight.detach().float().contiguous()
        n2 = layer.post_attention_layernorm.weight.detach().float().contiguous()
        keep += [n1, n2]
        lib.qz_set_layer(handle, i, n1.data_ptr(), n2.data_ptr(), _column(mats, 0, vp), _column(mats, 1, vp),
                         _column(mats, 2, vp), _column(mats, 3, vp), _column(mats, 4, ci), _column(mats, 5, ci),
                         _column(mats, 6, ci), (vp * 4)(*[p.data_ptr() if p is not None else None for p in perms]))
    return native
