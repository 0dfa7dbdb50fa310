"""Big models on the memory you have: random-weight models of real shapes, offloaded decode.

Sections (one per part of issue 20):
  make      write a seeded random-weight model of a real shape as sharded safetensors (bf16, ~2 GB
            shards, an index), and its 4-bit RTN version in the GPTQ layout; once, atomically.
  offload   decode at batch 1 under a memory budget (default: a quarter of the bf16 bytes):
            qingzhou's offload (`load_model(..., max_memory=...)`) vs accelerate's
            `device_map="auto"` + `max_memory` offload vs AirLLM, on the same model and budget;
            tokens/s, peak RSS, and whether the greedy tokens agree. Each engine runs in its own
            process (peak RSS is per process, and AirLLM lives in its own venv). The engine
            `in-memory` (qingzhou with the whole model resident, no budget) is the ceiling every
            offload engine approaches from below: add it with --engines ...,in-memory.
  stream    streaming quantization (issue 20 part 2) lives in bench/big_model_stream.py (another
            helper's); `stream` runs it when it is there.

Random weights (std 0.02, norms 1) make no sense as text, but every kernel, byte and layer is the
size of the real model, which is what memory and speed depend on. The folders carry no tokenizer:
the bench feeds token ids.

  python bench/big_model.py make --shape llama-3.2-3b            # -> /work/peers/models/llama-3.2-3b-random{,-4bit}
  python bench/big_model.py offload --shape llama-3.2-3b --tokens 16
  python bench/big_model.py offload --shape tiny --tokens 8       # proves the bench works, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qingzhou
MODELS = Path(os.environ.get("QINGZHOU_BIG_MODELS", "/work/peers/models"))
AIRLLM_PYTHON = Path(os.environ.get("AIRLLM_PYTHON", "/work/peers/airllm/bin/python"))
SHARD_BYTES = 2 * 10**9
_LLAMA3 = {"vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
           "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": 128001,
           "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
SHAPES = {
    # the published configs of meta-llama/Llama-3.2-1B, -3B and Llama-3.1-8B
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True},
    "llama-3.2-3b": {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False},
    # a few MB, to prove the bench end to end in seconds
    "tiny": {**_LLAMA3, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "tie_word_embeddings": True,
             "bos_token_id": 1, "eos_token_id": 2},
}


def model_dir(shape: str, bits: int = 16) -> Path:
    return MODELS / (f"{shape}-random" + ("-4bit" if bits == 4 else ""))


# ---------------------------------------------------------------- make

def make_model(shape: str, seed: int = 0, out: Path | None = None) -> Path:
    """Write the seeded random bf16 model of `shape` as ~2 GB safetensors shards plus an index,
    tensor by tensor (memory: one shard), into a temp folder renamed into place at the end."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = out or model_dir(shape)
    if (out / "config.json").is_file():
        return out
    cfg = LlamaConfig(**SHAPES[shape], architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    names = [n for n, _ in meta.state_dict().items() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    shapes = dict(meta.state_dict())

    def tensor(i: int, name: str):
        t = shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(t.shape, dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        return (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)

    _write_sharded(out, cfg.to_dict(), ((n, tensor(i, n)) for i, n in enumerate(names)))
    return out


def add_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (ids < 300), so loaders that insist on one (AirLLM, `load_model`)
    accept the folder; the bench itself feeds token ids."""
    from qingzhou.finetune.testing import byte_tokenizer

    if not (folder / "tokenizer.json").is_file():
        byte_tokenizer().save_pretrained(folder)


def make_4bit(shape: str, group_size: int = 128) -> Path:
    """The 4-bit g128 RTN version of the bf16 model in the GPTQ layout, one tensor at a time."""
    import torch

    from qingzhou.llm.shards import ShardIndex
    from qingzhou.llm.quantized.grid import QuantScheme, rtn_quantize_weight
    from qingzhou.llm.quantized.qlinear import QuantLinear

    src, out = make_model(shape), model_dir(shape, 4)
    if (out / "config.json").is_file():
        return out
    index = ShardIndex(src)
    scheme = QuantScheme(bits=4, group_size=group_size, sym=False, clip_search=False)
    linear = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", ".gate_proj.", ".up_proj.", ".down_proj.")

    def tensors():
        for name in index.names:
            w = index.tensor(name)
            if name.endswith(".weight") and any(p in name for p in linear):
                layer = QuantLinear.from_quantized(rtn_quantize_weight(w, scheme))
                prefix = name[: -len(".weight")]
                for k, v in layer.state_dict().items():
                    yield f"{prefix}.{k}", v.contiguous()
            else:
                yield name, w.clone()

    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                                     "sym": False, "checkpoint_format": "gptq", "pack_dtype": "int32",
                                     "lm_head": False, "meta": {"quantizer": ["qingzhou-bench:rtn"]}}
    del torch
    _write_sharded(out, config, tensors())
    return out


def _write_sharded(out: Path, config: dict, tensors) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weight_map: dict[str, str] = {}
    shard: dict = {}
    size = total = 0
    files: list[str] = []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, t in tensors:
        if size and size + t.numel() * t.element_size() > SHARD_BYTES:
            flush()
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
    flush()
    # the conventional names: model-0000i-of-0000n.safetensors
    final = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for f, g in final.items():
        (tmp / f).rename(tmp / g)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    add_tokenizer(tmp)
    tmp.rename(out)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ---------------------------------------------------------------- offload

PROMPT = [128000, 791, 6864, 315, 9822, 374, 12366, 13, 578]  # token ids (any ids < vocab do)


def run_engine(engine: str, folder: Path, budget: int, tokens: int, dtype: str, threads: int) -> dict:
    """One engine in a fresh process: {"tokens": [...], "tokens_per_s": x, "peak_rss_mb": y, ...}."""
    python = str(AIRLLM_PYTHON) if engine == "airllm" else sys.executable
    if engine == "airllm" and not AIRLLM_PYTHON.is_file():
        return {"engine": engine, "skipped": f"AirLLM venv not found at {AIRLLM_PYTHON} (set AIRLLM_PYTHON)"}
    warm_page_cache(folder)
    cmd = [python, str(Path(__file__).resolve()), "_engine", engine, str(folder), str(budget), str(tokens), dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"engine": engine, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    return json.loads(lines[-1][len("RESULT "):])


def warm_page_cache(folder: Path) -> None:
    """Read every shard once before each engine, so none pays (or is spared) the cold disk because
    of the order the engines run in. (With less free RAM than the model, all of them read the disk.)"""
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass


def _engine(engine: str, folder: str, budget: int, tokens: int, dtype: str) -> None:
    """Child process: load with `engine` under `budget` bytes, greedy-decode `tokens` at batch 1."""
    import torch

    torch_dtype = getattr(torch, dtype)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    ids = torch.tensor([[i % vocab for i in PROMPT]])
    t0 = time.perf_counter()
    if engine == "airllm":
        model = _airllm_model(folder, budget)
    elif engine == "accelerate":
        from transformers import AutoModelForCausalLM

        offload = Path(folder).with_name(Path(folder).name + ".accelerate-offload")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map="auto",
                                                     max_memory={"cpu": budget}, offload_folder=str(offload))
    else:
        from qingzhou.llm import load_model

        # "in-memory": the whole model resident, no budget: the ceiling any offload can approach
        model, _ = load_model(folder, dtype=dtype, device="cpu", max_memory=None if engine == "in-memory" else budget)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        model(ids[:, :1])  # warm-up: one forward, not counted
        t0 = time.perf_counter()
        out = _greedy(model, ids, tokens)
        dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"engine": engine, "tokens": out, "tokens_per_s": round(tokens / dt, 4),
                                  "seconds": round(dt, 2), "load_s": round(load_s, 2), "peak_rss_mb": round(rss, 1)}))


def _greedy(model, ids, n: int) -> list[int]:
    """Plain greedy decode with a KV cache, the same loop for every engine."""
    import torch

    out, past, x = [], None, ids
    for _ in range(n):
        res = model(input_ids=x, past_key_values=past, use_cache=True)
        logits = res.logits if hasattr(res, "logits") else res[0]
        past = getattr(res, "past_key_values", None)
        nxt = int(torch.argmax(logits[0, -1]))
        out.append(nxt)
        x = torch.tensor([[nxt]]) if past is not None else torch.cat([x, torch.tensor([[nxt]])], 1)
    return out


def _airllm_model(folder: str, budget: int):
    from airllm import AutoModel  # only in the AirLLM venv

    split = Path(folder).with_name(Path(folder).name + ".airllm-split")
    # AirLLM has no memory budget: it always streams every decoder layer (about one layer resident)
    return AutoModel.from_pretrained(folder, device="cpu", layer_shards_saving_path=str(split))


def offload(shape: str, tokens: int, threads: int, engines: list[str], bits_list: list[int]) -> list[dict]:
    rows = []
    bf16 = make_model(shape)
    add_tokenizer(bf16)
    budget = folder_bytes(bf16) // 4
    for bits in bits_list:
        folder = bf16 if bits == 16 else make_4bit(shape)
        if bits == 4:  # the first 4-bit load writes the int4 kernel cache: do it outside the measured process
            run_engine("qingzhou", folder, budget, 1, "bfloat16", threads)
        for engine in engines if bits == 16 else [e for e in engines if e in ("qingzhou", "in-memory")]:
            r = run_engine(engine, folder, budget, tokens, "bfloat16", threads)
            r.update(shape=shape, bits=bits, budget_mb=None if engine == "in-memory" else round(budget / 2**20),
                     model_mb=round(folder_bytes(folder) / 2**20))
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
    ref = next((r.get("tokens") for r in rows if r.get("bits") == 16 and r.get("engine") == "qingzhou"), None)
    peers = [r["tokens_per_s"] for r in rows if r.get("engine") in ("accelerate", "airllm") and r.get("tokens_per_s")]
    for r in rows:
        if r.get("tokens") is not None and r["bits"] == 16:
            r["same_tokens_as_qingzhou"] = r["tokens"] == ref
        if r.get("engine") in ("qingzhou", "in-memory") and r.get("tokens_per_s") and peers:
            r["x_fastest_peer_bf16"] = round(r["tokens_per_s"] / max(peers), 2)
    print(markdown(rows))
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| shape | engine | weights | budget MB | tok/s | x fastest peer | peak RSS MB | load s | same tokens |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        tps = r.get("tokens_per_s", r.get("skipped") or ("error: " + " ".join(r.get("error", []))[-80:]))
        lines.append(f"| {r.get('shape')} | {r['engine']} | {'bf16' if r.get('bits') == 16 else '4-bit g128'} | "
                     f"{r.get('budget_mb') or 'none'} | {tps} | {r.get('x_fastest_peer_bf16', '')} | {r.get('peak_rss_mb', '')} | "
                     f"{r.get('load_s', '')} | {r.get('same_tokens_as_qingzhou', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_engine":
        _, engine, folder, budget, tokens, dtype = argv
        return _engine(engine, folder, int(budget), int(tokens), dtype)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", choices=["make", "offload", "stream"])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--engines", default="qingzhou,accelerate,airllm")
    ap.add_argument("--bits", default="16,4")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.section == "make":
        free = shutil.disk_usage(MODELS if MODELS.exists() else MODELS.parent).free
        print(f"free disk: {free / 2**30:.1f} GiB")
        print(make_model(args.shape), make_4bit(args.shape))
        return
    if args.section == "stream":
        stream = Path(__file__).with_name("big_model_stream.py")
        if not stream.is_file():
            print("bench/big_model_stream.py is not there (streaming quantization: issue 20 part 2).")
            return
        subprocess.run([sys.executable, str(stream), *argv[1:]], check=True)
        return
    rows = offload(args.shape, args.tokens, args.threads, args.engines.split(","), [int(b) for b in args.bits.split(",")])
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
