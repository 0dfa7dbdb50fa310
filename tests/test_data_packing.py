"""Packing keeps per-sample losses identical to unpacked; the tokenisation cache hits and invalidates."""
from __future__ import annotations

import random

import pytest
import torch

from qingzhou.data import DataConfig, Example, pack_examples, prepare_data
from qingzhou.data.packing import collate
from qingzhou.data.templates import IGNORE_INDEX
from qingzhou.finetune.testing import byte_tokenizer, tiny_model


def _samples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(5, 30)
        ids = [rng.randrange(5, vocab) for _ in range(length)]
        cut = rng.randint(1, length - 2)
        out.append(Example(ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return out


def test_pack_examples_fills_rows_and_keeps_every_sample():
    samples = _samples(30, 200)
    rows = pack_examples(samples, 64)
    assert all(len(r) <= 64 for r in rows)
    assert sum(len(r) for r in rows) == sum(len(s) for s in samples)
    assert len(rows) < len(samples) / 2
    # each sample appears once, with positions restarting at 0
    starts = sum(r.position_ids.count(0) for r in rows)
    assert starts == len(samples)
    assert sum(r.n_targets for r in rows) == sum(s.n_targets for s in samples)


def test_split_long_for_pretraining_and_truncate_for_sft():
    long = Example(list(range(10, 110)), list(range(10, 110)))
    assert sum(len(r) for r in pack_examples([long], 32, truncate=False)) == 100
    assert sum(len(r) for r in pack_examples([long], 32, truncate=True)) == 32


def _per_sample_losses(model, rows, packed):
    losses = []
    batch = collate(rows, pad_id=0, packed=packed)
    with torch.no_grad():
        # use_cache=False: transformers only derives the packed (block-diagonal) mask without a cache
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    ).view(len(rows), -1)
    for b, row in enumerate(rows):
        # segment ids from position resets; attribute each target token (t+1) to its sample
        seg = torch.tensor(row.position_ids + [0] * (batch["input_ids"].shape[1] - len(row))).eq(0).cumsum(0)
        target_seg = seg[1:]
        for s in range(1, int(seg[: len(row)].max()) + 1):
            mask = (target_seg == s) & (batch["labels"][b, 1:] != IGNORE_INDEX)
            losses.append((row.input_ids[int((seg == s).nonzero()[0])], float(nll[b][mask].sum())))
    return losses


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_equals_unpacked_per_sample(arch):
    torch.manual_seed(0)
    model = tiny_model(arch, vocab_size=200)
    samples = _samples(12, 200, seed=1)
    packed_rows = pack_examples(samples, 64)
    assert any(r.position_ids.count(0) > 1 for r in packed_rows)
    packed = _per_sample_losses(model, packed_rows, packed=True)
    single = {}
    for s in samples:
        batch = collate([s], pad_id=0, packed=False)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="sum", ignore_index=IGNORE_INDEX)
        single.setdefault(s.input_ids[0], []).append(float(nll))
    assert len(packed) == len(samples)
    for first_token, loss in packed:
        assert min(abs(loss - x) for x in single[first_token]) < 1e-4 * max(1.0, loss)
    # sanity: without position resets (attention crossing samples) the losses do differ
    crossing = [Example(r.input_ids, r.labels) for r in packed_rows]  # positions 0..n-1
    batch = collate(crossing, pad_id=0, packed=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total_cross = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX)
    assert abs(float(total_cross) - sum(loss for _, loss in packed)) > 1e-2


def test_cache_hits_on_second_run_and_misses_when_settings_change(tmp_path):
    tok = byte_tokenizer()
    rows = [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(20)]
    cfg = DataConfig(source="<records>", cache_dir=str(tmp_path), eval_fraction=0.1)
    first = prepare_data(cfg, tok, records=rows)
    second = prepare_data(cfg, tok, records=rows)
    assert first.stats["cache"] == "miss" and second.stats["cache"] == "hit"
    assert [e.input_ids for e in first.train] == [e.input_ids for e in second.train]
    assert [e.labels for e in first.train] == [e.labels for e in second.train]
    changed = prepare_data(cfg.model_copy(update={"max_length": 40}), tok, records=rows)
    assert changed.stats["cache"] == "miss"
    edited = prepare_data(cfg, tok, records=rows[:-1] + [{"instruction": "q19", "output": "changed"}])
    assert edited.stats["cache"] == "miss"
    other_tok = prepare_data(cfg, byte_tokenizer(eos="</s>"), records=rows)
    assert other_tok.stats["cache"] == "miss"
    # no temp folders left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_text_packing_keeps_all_tokens(tmp_path):
    tok = byte_tokenizer()
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join("word " * n for n in (40, 90, 7, 130)), encoding="utf-8")
    data = prepare_data(DataConfig(source=str(p), packing=True, max_length=64, eval_fraction=0, cache=False), tok)
    assert data.stats["format"] == "text"
    assert all(len(r) <= 64 for r in data.train)
    expected = sum(len(tok("word " * n)["input_ids"]) + 1 for n in (40, 90, 7, 130))  # + EOS
    assert sum(len(r) for r in data.train) == expected
