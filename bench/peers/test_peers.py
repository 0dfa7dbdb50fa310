"""Checks of the llm-compressor side-by-side plumbing (run: python -m pytest bench/peers/test_peers.py -q).

The pure parts run anywhere; the recipe check runs inside the peer venv and is skipped without it.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import llmc_run  # noqa: E402
import side_by_side as S  # noqa: E402


def test_setting_names_mirror_ours():
    g = S.parse_peer_setting("llmc-gptq-asym-3")
    assert (g.kind, g.bits, g.group_size, g.sym, g.timing_key) == ("gptq", 3, 64, False, "quantize_s")
    assert S.parse_peer_setting("llmc-gptq-sym-4-g32").group_size == 32
    assert S.parse_peer_setting("llmc-awq-asym-4").kind == "awq"
    nm = S.parse_peer_setting("llmc-sparsegpt-2:4")
    assert (nm.sparsity, nm.mask, nm.timing_key) == (0.5, "2:4", "prune_s")
    un = S.parse_peer_setting("llmc-wanda-50")
    assert (un.sparsity, un.mask) == (0.5, "0:0")
    for bad in ("gptq-asym-4", "llmc-gptq-4", "llmc-rtn-asym-4", "llmc-wanda"):
        with pytest.raises(ValueError):
            S.parse_peer_setting(bad)
    for name in (S.QUANT_PEERS + "," + S.PRUNE_PEERS).split(","):
        S.parse_peer_setting(name)


def test_fingerprint_sees_values_shape_and_dtype():
    a = torch.arange(12).reshape(3, 4)
    base = S.fingerprint([a])
    assert S.fingerprint([a.clone()]) == base
    assert S.fingerprint([a.reshape(4, 3)]) != base
    assert S.fingerprint([a.int()]) != base
    b = a.clone()
    b[2, 3] += 1
    assert S.fingerprint([b]) != base


def test_run_peers_fails_before_the_long_run(tmp_path):
    with pytest.raises(FileNotFoundError):
        S.run_peers("llmc-gptq-asym-4", windows=1, calib_rows=1, threads=1, python=str(tmp_path / "nope"))
    with pytest.raises(ValueError):
        S.run_peers("llmc-gptq-asym-9x", windows=1, calib_rows=1, threads=1, python=sys.executable)


FAKE_DRIVER = """#!/bin/sh
# stands in for `python llmc_run.py ...`: echo the checked hashes back as a row, fail on request
shift  # the driver path
while [ $# -gt 0 ]; do case $1 in --out) out=$2;; --expect-calib-sha) c=$2;; --settings) s=$2;; esac; shift 2; done
[ "$s" = llmc-wanda-2:4 ] && exit 3
printf '{"setting": "%s", "ppl": 1.5, "prune_s": 2.0, "calib_sha": "%s"}\\n' "$s" "$c" > "$out"
"""


def test_run_peers_returns_the_drivers_rows_and_passes_our_hashes(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text(FAKE_DRIVER)
    fake.chmod(0o755)
    monkeypatch.setattr(S, "token_fingerprints", lambda tok, rows, windows: {"calib_sha": f"c{rows}", "eval_sha": "e"})
    rows = S.run_peers("llmc-wanda-50", windows=2, calib_rows=7, threads=1, tokenizer=object(), python=str(fake))
    assert rows == [{"setting": "llmc-wanda-50", "ppl": 1.5, "prune_s": 2.0, "calib_sha": "c7"}]
    with pytest.raises(RuntimeError, match="exit 3"):
        S.run_peers("llmc-wanda-2:4", windows=2, calib_rows=7, threads=1, tokenizer=object(), python=str(fake))


def test_running_ppl_records_every_window_and_ends_at_the_result():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from qingzhou.eval.perplexity import perplexity

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64)).eval()
    t = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    text = " ".join(f"t{(7 * i) % 64}" for i in range(16 * 5))
    with llmc_run.running_ppl([]) as seen:
        res = perplexity(model, tok, text, seq_len=16, max_windows=5)
    assert len(seen) == 5 and seen[-1] == pytest.approx(res.ppl, abs=1e-3)
    first2 = perplexity(model, tok, text, seq_len=16, max_windows=2, progress=False)
    assert seen[1] == pytest.approx(first2.ppl, abs=1e-3)
    assert not math.isnan(seen[0])


@pytest.mark.skipif(not Path(S.PEER_PYTHON).exists(), reason="peer venv not installed (bench/peers/README.md)")
def test_recipes_build_the_modifiers_we_mean():
    """Inside the venv: each setting maps to llm-compressor's modifier with our grid/sparsity."""
    code = f"""
import sys; sys.path.insert(0, {str(HERE)!r})
import llmc_run as L
from side_by_side import parse_peer_setting as p
[g] = L.RECIPES["gptq"](p("llmc-gptq-asym-3"))
w = g.config_groups["group_0"].weights
assert (type(g).__name__, w.num_bits, w.symmetric, w.group_size, w.strategy) == ("GPTQModifier", 3, False, 64, "group"), w
assert g.ignore == ["lm_head"]
a, q = L.RECIPES["awq"](p("llmc-awq-asym-4"))
assert (type(a).__name__, type(q).__name__) == ("AWQModifier", "QuantizationModifier")
[s] = L.RECIPES["sparsegpt"](p("llmc-sparsegpt-2:4"))
assert (type(s).__name__, s.sparsity, s.mask_structure) == ("SparseGPTModifier", 0.5, "2:4")
[w] = L.RECIPES["wanda"](p("llmc-wanda-50"))
assert (type(w).__name__, w.sparsity, w.mask_structure, w.ignore) == ("WandaPruningModifier", 0.5, "0:0", ["re:.*lm_head"])
print("ok")
"""
    out = subprocess.run([S.PEER_PYTHON, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
