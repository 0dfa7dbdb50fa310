"""llama.cpp's k-quant mixes (Q2_K, Q3_K_M, Q4_K_M, with and without an importance matrix) for
`bench/fit_quality.py`, made with llama.cpp's own tools and read back through transformers.

The tools are llama.cpp's `llama-imatrix` and `llama-quantize`, built from the llama.cpp that the
`llama-cpp-python` sdist vendors (`LLAMA_CPP_BIN`, default the build folder under /work/peers).
They are never a qingzhou dependency: `tools()` says what is missing and the bench skips the arm.

Path from our dense weights to a row:
1. `dense_gguf`: the shipped GGUF re-written with every tensor dequantised to F32 (every key and
   tensor name kept, so llama.cpp sees the model it shipped, at full precision: these are the
   very weights transformers gives our own arms, since it dequantises the same blocks);
2. `imatrix`: `llama-imatrix` over the calibration text (our calibration samples decoded back to
   text, cut by the tool into chunks of the same 512 tokens);
3. `quantize`: `llama-quantize [--imatrix]` to the mix;
4. the caller loads the result with transformers (`gguf_file=`, which dequantises k-quants with
   the `gguf` package) and measures it with our harness; `gguf_linear_bytes` counts the bytes of
   the decoder linears as stored, for a size comparable across formats.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

LLAMA_CPP_BIN = Path(os.environ.get("LLAMA_CPP_BIN",
                                    "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"))
MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M")
# llama.cpp names of the decoder linears, as `gguf_linear_bytes` counts them
LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def tools(names: tuple[str, ...] = ("llama-quantize", "llama-imatrix")) -> dict[str, Path] | str:
    """The tools `names`, or a sentence saying which is missing (the bench prints it and skips)."""
    found = {name: LLAMA_CPP_BIN / name for name in names}
    missing = [str(p) for p in found.values() if not os.access(p, os.X_OK)]
    if missing:
        return (f"llama.cpp tools not found: {', '.join(missing)} (build llama.cpp, or set LLAMA_CPP_BIN "
                "to its build/bin folder)")
    return found


def dense_gguf(src: str | Path, out: str | Path) -> Path:
    """Write `src` with every quantised tensor dequantised to F32 (F32/F16 tensors as they are),
    all metadata copied, so `llama-quantize` starts from the same weights our arms load."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    out = Path(out)
    if out.exists():
        return out
    reader = GGUFReader(str(src))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    tmp = out.with_suffix(".tmp")
    w = GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if key == "general.file_type":
            w.add_uint32(key, 0)  # ALL_F32
            continue
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == GGUFValueType.STRING:
                vals = [str(bytes(field.parts[i]), "utf-8") for i in field.data]
            else:
                vals = [field.parts[i].tolist()[0] for i in field.data]
            w.add_array(key, vals)
        elif vtype == GGUFValueType.STRING:
            w.add_string(key, str(bytes(field.parts[-1]), "utf-8"))
        else:
            w.add_key_value(key, field.parts[-1].tolist()[0], vtype)
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.asarray(t.data).reshape(shape)
            data = data.astype(np.float32) if t.tensor_type == GGMLQuantizationType.F16 and len(shape) == 1 else data
        else:
            data = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def imatrix(dense: Path, calib_text: Path, out: Path, *, ctx: int = 512, threads: int = 2) -> float:
    """`llama-imatrix` over `calib_text` in chunks of `ctx` tokens; returns its wall seconds."""
    t0 = time.perf_counter()
    _run([str(LLAMA_CPP_BIN / "llama-imatrix"), "-m", str(dense), "-f", str(calib_text), "-o", str(out), "-c", str(ctx),
          "-b", str(ctx), "-t", str(threads), "--no-ppl"], out)
    return time.perf_counter() - t0


def quantize(dense: Path, out: Path, mix: str, *, imatrix_file: Path | None = None, threads: int = 2) -> float:
    """`llama-quantize [--imatrix F] dense out MIX threads`; returns its wall seconds."""
    cmd = [str(LLAMA_CPP_BIN / "llama-quantize")]
    if imatrix_file is not None:
        cmd += ["--imatrix", str(imatrix_file)]
    t0 = time.perf_counter()
    _run(cmd + [str(dense), str(out), mix, str(threads)], out)
    return time.perf_counter() - t0


def gguf_linear_bytes(path: str | Path) -> dict[str, int | dict[str, int]]:
    """Bytes and element count of the decoder linears as stored in `path`, the whole file's
    tensor bytes and elements, and the count of each tensor type among the linears."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    lin_bytes = lin_n = all_bytes = all_n = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        all_bytes += int(t.n_bytes)
        all_n += int(t.n_elements)
        if LINEAR.match(t.name):
            lin_bytes += int(t.n_bytes)
            lin_n += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"linear_bytes": lin_bytes, "linear_weights": lin_n, "tensor_bytes": all_bytes, "weights": all_n,
            "linear_types": types}


def _run(cmd: list[str], out: Path) -> None:
    log = out.with_suffix(out.suffix + ".log")
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
