"""SmolLM2's weights in a Qwen2 body with small random q/k/v biases: a real-text model of the Qwen2
family, for checking qingzhou's Qwen2 exports (GGUF: q/k/v biases, no rotary permutation) in the
serving tools when no real Qwen2 model is at hand.

    python bench/make_qwen2_from_smollm2.py [OUT]     # default /work/peers/models/smollm2-as-qwen2
    python bench/gguf_llama_cpp.py --model OUT --types f16,q8_0,q4_k_m --chunks 4 --no-ggml-blocks
"""
from __future__ import annotations

import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qingzhou.llm import load_model, save_model


def main(out: str) -> None:
    src, tok = load_model("smollm2", dtype="float32", device="cpu")
    c = src.config
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=c.rms_norm_eps, rope_parameters=getattr(c, "rope_parameters", None),
                      tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
                      eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, hidden_act=c.hidden_act)
    q = Qwen2ForCausalLM(cfg).eval()
    missing, _ = q.load_state_dict(src.state_dict(), strict=False)
    assert all(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in missing), missing
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.endswith("_proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
        moved = (q(ids).logits - src(ids).logits).abs().max().item()
    print(f"max |logit change| from the biases: {moved:.2f}")
    save_model(q, tok, out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/peers/models/smollm2-as-qwen2")
