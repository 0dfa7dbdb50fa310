"""The LM interface: lm-eval tokenisation, log-likelihoods equal to a direct computation from the
logits, batching that changes nothing, rolling windows that score each token once, generation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from qingzhou.eval.lm import HFLM, rolling_windows

torch.set_num_threads(1)

CORPUS = [
    "Question: Which gas do plants take in?\nAnswer: carbon dioxide",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hello world, hello there, the world is wide and the sea is deep.",
] * 20


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE (GPT-2 style, spaces glued to the next word) trained in-process."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_model(arch: str = "llama"):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=384, max_position_embeddings=256)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def direct_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of log P(cont) from one unpadded forward pass over ctx + cont."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    rows = logp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    target = torch.tensor(cont)
    return rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def test_encode_pair_moves_trailing_space_and_splits_whole_encoding(tok):
    lm = HFLM(tiny_model(), tok, progress=False)
    ctx, cont = lm.encode_pair("Question: Which gas?\nAnswer: ", "carbon dioxide")
    assert ctx == tok.encode("Question: Which gas?\nAnswer:")
    whole = tok.encode("Question: Which gas?\nAnswer: carbon dioxide")
    assert ctx + cont == whole
    assert tok.decode(cont) == " carbon dioxide"
    # a continuation that merges with the end of the context is split from the whole encoding
    # (lm-eval's rule: the continuation is whatever the whole encoding holds past the context's length)
    ctx, cont = lm.encode_pair("Hello world, hel", "lo there")
    whole = tok.encode("Hello world, hello there")
    assert ctx == tok.encode("Hello world, hel") and cont == whole[len(ctx):]
    assert cont != tok.encode("lo there")  # encoding the parts separately would differ


def test_empty_context_uses_prefix_token(tok):
    lm = HFLM(tiny_model(), tok, progress=False)
    ctx, cont = lm.encode_pair("", " the world")
    assert ctx == [tok.eos_token_id] and cont == tok.encode(" the world")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loglikelihood_equals_direct_computation(tok, arch):
    model = tiny_model(arch)
    lm = HFLM(model, tok, batch_size=3, progress=False)
    requests = [("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
                ("The quick brown", " fox jumps"), ("Hello", " world, hello there"), ("", " the sea")]
    got = lm.loglikelihood(requests)
    for (c, x), (lp, greedy) in zip(requests, got):
        want_lp, want_greedy = direct_logprob(model, *lm.encode_pair(c, x))
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert greedy == want_greedy
        assert lp < 0


def test_is_greedy_true_exactly_for_argmax_continuation(tok):
    model = tiny_model()
    lm = HFLM(model, tok, progress=False)
    ctx = tok.encode("The quick brown fox")
    with torch.no_grad():
        greedy = []
        ids = list(ctx)
        for _ in range(3):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            greedy.append(nxt)
            ids.append(nxt)
    other = (greedy[-1] + 1) % 300
    (lp1, g1), (lp2, g2) = lm.loglikelihood_tokens([(ctx, greedy), (ctx, greedy[:-1] + [other])])
    assert g1 is True and g2 is False
    assert lp1 > lp2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_equals_one_at_a_time(tok, arch):
    model = tiny_model(arch)
    texts = [line[:n] for line in CORPUS[:3] for n in (12, 25, 40, 64)]
    requests = [(t, " the world") for t in texts] + [(t, " A") for t in texts[:4]] + [(texts[0], " B")]
    one = HFLM(model, tok, batch_size=1, progress=False).loglikelihood(requests)
    inputs = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw), with_kwargs=True)
    many = HFLM(model, tok, batch_size=5, progress=False, share_context=False).loglikelihood(requests)
    handle.remove()
    assert [g for _, g in one] == [g for _, g in many]
    assert max(abs(a[0] - b[0]) for a, b in zip(one, many)) < 1e-4
    # right-padded rows of different lengths, scored without an attention mask (causal: no real
    # position sees a pad), so SDPA keeps its causal kernel
    assert any(kw["input_ids"].shape[0] > 1 for kw in inputs)
    assert all(kw.get("attention_mask") is None for kw in inputs)


def test_logits_to_keep_shortcut_changes_nothing(tok):
    model = tiny_model()
    requests = [(t[:30], t[30:50]) for t in CORPUS[:3]] + [("Hello", " world")]
    fast = HFLM(model, tok, batch_size=4, progress=False)
    slow = HFLM(model, tok, batch_size=4, progress=False)
    slow._accepts_logits_to_keep = False
    assert fast._accepts_logits_to_keep
    for (a, ga), (b, gb) in zip(fast.loglikelihood(requests), slow.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_one_token_continuations_share_a_forward_pass(tok):
    model = tiny_model()
    lm = HFLM(model, tok, batch_size=8, progress=False)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    ctx = "Question: Which gas?\nAnswer:"
    got = lm.loglikelihood([(ctx, " A"), (ctx, " B"), (ctx, " C"), (ctx, " D")])
    handle.remove()
    assert len(calls) == 1  # one forward pass serves the four letters
    for letter, (lp, _) in zip("ABCD", got):
        assert lp == pytest.approx(direct_logprob(model, *lm.encode_pair(ctx, " " + letter))[0], abs=1e-4)


@pytest.mark.parametrize("n,max_length", [(1, 4), (4, 4), (5, 4), (10, 4), (23, 7), (7, 1), (30, 30)])
def test_rolling_windows_score_every_token_once(n, max_length):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, prefix_token=0, max_length=max_length)
    assert [t for _, cont in windows for t in cont] == tokens  # each token once, in order
    assert windows[0][0] == [0]
    for ctx, cont in windows:
        inputs = (ctx + cont)[:-1]
        assert 1 <= len(inputs) <= max_length and ctx
        # the context is exactly the text right before the continuation
        start = tokens.index(cont[0])
        assert ctx == ([0] + tokens)[: start + 1][-len(ctx):]
    if n > max_length:  # later windows see a full window of context
        assert all(len((c + x)[:-1]) == max_length for c, x in windows[1:])


def test_loglikelihood_rolling_equals_direct_sum(tok):
    model = tiny_model()
    text = " ".join(CORPUS[:3])
    ids = tok.encode(text)
    assert len(ids) > 40
    lm = HFLM(model, tok, batch_size=2, max_length=16, progress=False)
    want = sum(direct_logprob(model, c, x)[0] for c, x in rolling_windows(ids, tok.eos_token_id, 16))
    (got,) = lm.loglikelihood_rolling([text])
    assert got == pytest.approx(want, abs=1e-3)
    # a text that fits in one window is plain next-token log-likelihood after the prefix token
    short = CORPUS[1]
    (got_short,) = HFLM(model, tok, progress=False).loglikelihood_rolling([short])
    assert got_short == pytest.approx(direct_logprob(model, [tok.eos_token_id], tok.encode(short))[0], abs=1e-4)


def test_generate_until_is_greedy_and_cut_at_stop(tok):
    model = tiny_model()
    model.generation_config.pad_token_id = tok.eos_token_id
    contexts = ["The quick brown fox", "Hello world, hello"]
    with torch.no_grad():
        free = []
        for c in contexts:
            ids = torch.tensor([tok.encode(c)])
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
            free.append(tok.decode(out[0, ids.shape[1]:]))
    stop = free[0][5:8]
    lm = HFLM(model, tok, batch_size=2, progress=False)
    got = lm.generate_until([(c, {"until": [stop], "max_gen_toks": 12}) for c in contexts])
    assert got[0] == free[0].split(stop)[0]
    assert got[1] == free[1].split(stop)[0]
    assert len(got[0]) < len(free[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_shared_context_path_equals_plain_path(tok, arch, batch_size):
    """Choices scored on their question's KV cache give the plain path's numbers."""
    model = tiny_model(arch)
    questions = [f"Question: {line[:n]}\nAnswer:" for line in CORPUS[:3] for n in (10, 31)]
    choices = [" carbon dioxide", " the sea", " deep and wide water", " A"]
    requests = [(q, c) for q in questions for c in choices] + [("Hello", " world, hello there")]
    shared_lm = HFLM(model, tok, batch_size=batch_size, progress=False)
    plain_lm = HFLM(model, tok, batch_size=batch_size, progress=False, share_context=False)
    assert shared_lm._can_share and not plain_lm._can_share
    shared_groups, plain_idx = shared_lm._split_shared([shared_lm.encode_pair(c, x) for c, x in requests])
    assert len(shared_groups) == len(questions) and plain_idx == [len(requests) - 1]
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i))
    got = shared_lm.loglikelihood(requests)
    handle.remove()
    want = plain_lm.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in want]
    assert max(abs(a[0] - b[0]) for a, b in zip(got, want)) < 1e-4
    # two passes (contexts, then continuations) per batch of questions, one for the lone request
    assert len(calls) == 2 * -(-len(questions) // batch_size) + 1


def test_logit_budget_splits_long_rows_into_smaller_batches(tok, monkeypatch):
    """Rolling windows of a long-context model ran 8 rows x 8192 positions x 49k vocabulary of
    logits at once and were killed for memory; a budget on kept logits runs fewer rows per batch,
    with the same scores."""
    model = tiny_model()
    texts = [" ".join(CORPUS[i : i + 3]) for i in range(3)]
    ref = HFLM(model, tok, batch_size=8, max_length=16, progress=False).loglikelihood_rolling(texts)
    vocab = model.get_output_embeddings().weight.shape[0]
    lm = HFLM(model, tok, batch_size=8, max_length=16, progress=False, max_logit_elements=2 * 16 * vocab)
    sizes = []
    original = lm._score_batch
    monkeypatch.setattr(lm, "_score_batch", lambda batch: (sizes.append(len(batch)), original(batch))[1])
    shared = []
    monkeypatch.setattr(lm, "_score_shared", lambda groups, pairs: shared.append(groups) or iter(()))
    got = lm.loglikelihood_rolling(texts)
    assert got == pytest.approx(ref, abs=1e-4)
    assert max(sizes) == 2 and sum(sizes) > 2  # windows of 16 kept positions: two rows fit the budget
    # the texts' first windows share the one-token [prefix] context; as one shared group their
    # logits (3 x 16 x vocabulary) would exceed the budget (all 62 WikiText documents: 100 GB)
    assert shared == []


def test_shared_context_groups_are_batched_within_the_logit_budget(tok, monkeypatch):
    model = tiny_model()
    pairs = [(tok.encode(CORPUS[i]), tok.encode(" " + w)) for i in range(4) for w in ("river bank", "grid power")]
    ref = HFLM(model, tok, batch_size=8, progress=False).loglikelihood_tokens(pairs)
    vocab = model.get_output_embeddings().weight.shape[0]
    longest = max(len(c) for _, c in pairs)
    lm = HFLM(model, tok, batch_size=8, progress=False, max_logit_elements=2 * longest * vocab)
    batches = []
    original = lm._score_shared
    monkeypatch.setattr(lm, "_score_shared", lambda groups, p: (batches.append(len(groups)), original(groups, p))[1])
    got = lm.loglikelihood_tokens(pairs)
    assert [g for g, _ in got] == pytest.approx([g for g, _ in ref], abs=1e-4)
    assert len(batches) >= 2 and set(batches) == {1}  # one two-choice group per batch fits, two do not


def test_shared_groups_ordered_by_continuation_pad_fewer_tokens(tok):
    """Groups run longest continuation first: the continuation pass has one row per choice, so it
    dominates; ordering by context + continuation paired long contexts with short choices and
    padded the choices' rows (PIQA: as many padded tokens as lm-eval's plain path)."""
    lm = HFLM(tiny_model(), tok, batch_size=2, progress=False)
    # equal totals pair a long context with short choices and a short context with long choices:
    # ordered by total, both batches mix them and pad both passes
    ctx_a, ctx_c, ctx_b, ctx_d = list(range(10, 40)), list(range(10, 39)), [5, 6, 7, 8], [5, 6, 9]
    pairs = [(ctx_a, [1]), (ctx_a, [2, 3]), (ctx_b, [1] * 27), (ctx_b, [2] * 28),
             (ctx_c, [1, 4]), (ctx_c, [2]), (ctx_d, [1] * 26), (ctx_d, [2] * 27)]
    groups, plain = lm._split_shared(pairs)
    assert plain == []
    longest = [max(len(pairs[i][1]) for i in members) for _, members in groups]
    assert longest == sorted(longest, reverse=True)

    def padded(order):  # context pass + continuation pass tokens, batches of two groups
        total = 0
        for b in range(0, len(order), 2):
            batch = order[b : b + 2]
            rows = sum(len(m) for _, m in batch)
            total += len(batch) * max(len(c) for c, _ in batch)
            total += rows * max(len(pairs[i][1]) - 1 for _, m in batch for i in m)
        return total

    by_total = sorted(groups, key=lambda g: -len(g[0]) - max(len(pairs[i][1]) for i in g[1]))
    assert padded(groups) < padded(by_total)
