"""Tiny in-process models and a byte-level tokenizer, for tests, benchmarks and offline demos.

They need no download, so the whole fine-tuning path can be exercised on CPU in seconds.
"""
from __future__ import annotations

from typing import Any

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer(chat_template: str | None = CHATML, eos: str = "<|im_end|>") -> Any:
    """A 256-byte BPE tokenizer (no merges) + 5 special tokens: vocabulary 261, any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token=eos, unk_token=None,
        additional_special_tokens=[t for t in SPECIALS if t not in {"<pad>", "<s>", eos}],
    )
    tok.chat_template = chat_template
    return tok


def tiny_model(arch: str = "llama", vocab_size: int = 272, seed: int = 0, **overrides: Any) -> Any:
    """A 2-layer, 64-wide random causal LM of the given architecture (llama, qwen2, mistral, gemma,
    gemma3_text, gpt2)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab_size, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=4, tie_word_embeddings=False)
    if arch.startswith("gemma"):  # Gemma configs default to 256-wide heads whatever the width
        common["head_dim"] = common["hidden_size"] // common["num_attention_heads"]
    if arch == "gpt2":
        common = dict(vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=4, n_positions=512,
                      bos_token_id=1, eos_token_id=4)
    common.update(overrides)
    config = AutoConfig.for_model(arch, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def memorise_data(tokenizer: Any, rows: list[dict[str, Any]]) -> Any:
    """`rows` prepared for a "does it learn them" test: the eval split is the training rows
    themselves, so eval_loss_before/after measure exactly what the run was fitting."""
    from qingzhou.data import DataConfig, prepare_data

    data = prepare_data(DataConfig(source="<records>", eval_fraction=0, cache=False), tokenizer, records=rows)
    data.eval = data.train
    return data
