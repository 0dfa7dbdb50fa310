#!/usr/bin/env bash
# Every GPU figure the issues ask for, in one short call on a lent GPU machine (device tool):
#   1. batch-1 decode, eager vs the fast path, bf16 and 4-bit (Triton GEMV where it measured faster, and
#      torch's int4 kernel alone), Llama-3.2-1B shape (issues 4, 9 and 19);
#   2. 2:4 sparse matmul and end-to-end decode against dense (issue 7);
#   3. the 1B fast path again with inductor's emulated precision casts (greedy identity with eager);
#   4. batch-1 decode of a SmolLM2-135M-shaped model (issue 4's SmolLM2 speed and memory on GPU).
# Each step has its own time limit so one failure does not cost the rest; logs go to $OUT (or ./gpu_out).
# Packages the image lacks (pydantic) travel as wheels in .whl (see bench/peers/README.md).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  grep -v "^\s*$" "$OUT/$name.log" | grep -iv "warn\|deprecat" | tail -n 30
  echo "=== $name rc=$rc in $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
want() { [[ " ${STEPS:-decode_1b sparse24_bf16 sparse24_e2e sparse24_fp16 decode_1b_casts decode_smollm2} " == *" $1 "* ]]; }
# STEPS picks a subset (e.g. STEPS="decode_1b sparse24_e2e"); each step's limit is its second word
want decode_1b && step decode_1b "${LIMIT_1B:-170}" python3 bench/decode_speed.py --shape llama-3.2-1b --device cuda \
  --dtype bfloat16 --weights bf16,int4,int4-tinygemm --new-tokens 128 --warmup 2 --repeats 5 ${DECODE_FLAGS:-} --out "$OUT/decode_1b.json"
# one process per kernel family and dtype: a kernel fault (seen once: illegal instruction) ends only its step
want sparse24_bf16 && step sparse24_bf16 "${LIMIT_24:-40}" python3 bench/sparse24_speed.py --dtypes bfloat16 \
  --iters 30 --skip-e2e --out "$OUT/sparse24_bf16.json"
want sparse24_e2e && step sparse24_e2e "${LIMIT_24E:-90}" python3 bench/sparse24_speed.py --dtypes bfloat16 \
  --layers 16 --new-tokens 64 --skip-matmul --out "$OUT/sparse24_e2e.json"
want sparse24_fp16 && step sparse24_fp16 "${LIMIT_24:-40}" python3 bench/sparse24_speed.py --dtypes float16 \
  --iters 30 --skip-e2e --out "$OUT/sparse24_fp16.json"
want decode_1b_casts && step decode_1b_casts "${LIMIT_CASTS:-70}" python3 bench/decode_speed.py --shape llama-3.2-1b \
  --device cuda --dtype bfloat16 --weights bf16 --new-tokens 128 --warmup 2 --repeats 5 --emulate-casts \
  --skip-generate-path --out "$OUT/decode_1b_casts.json"
want decode_smollm2 && step decode_smollm2 "${LIMIT_SMOL:-90}" python3 bench/decode_speed.py --shape smollm2-135m \
  --device cuda --dtype bfloat16 --weights bf16,int4 --new-tokens 128 --warmup 2 --repeats 5 --skip-generate-path \
  --out "$OUT/decode_smollm2.json"
echo "done $(date +%T)"
