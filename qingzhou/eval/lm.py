"""One LM interface for every evaluation task, over any Hugging Face causal LM.

The three request types are lm-evaluation-harness's, and so is the tokenisation, so that scores are
comparable with the numbers the field quotes:

* `loglikelihood([(context, continuation)])` -> `[(logprob, is_greedy)]`. Trailing whitespace of the
  context moves to the continuation, then `context + continuation` is encoded *whole* and split at the
  length of the encoded context (lm-eval's `_encode_pair`), so a BPE merge across the boundary is
  scored the way the model would see it.
* `loglikelihood_rolling([text])` -> `[logprob]`: disjoint windows of at most `max_length` tokens that
  score every token exactly once, the first one conditioned on the prefix (BOS/EOS) token and later
  ones on as much preceding text as fits.
* `generate_until([(context, {"until": [...], "max_gen_toks": n})])` -> `[str]`: greedy decoding,
  cut at the first stop string.

Only `model(input_ids=..., attention_mask=...)` (and `generate` for generation) is called, so a dense,
peft-wrapped, quantized or sparse model all go through the same code.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from qingzhou.llm.forward_args import accepts, cache_argument
from qingzhou.progress import progress_bar

_DEFAULT_MAX_LENGTH = 2048
_HUGE = 10**9  # tokenizers report "no limit" as 1e30


@dataclass
class _Scored:
    """One unique model input and every request that reads its logits."""

    inputs: list[int]
    members: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, cont tokens)


def resolve_max_length(model: Any, tokenizer: Any, default: int = _DEFAULT_MAX_LENGTH) -> int:
    """The context length lm-eval would use: config positions, then tokenizer limit, then 2048."""
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        if cfg is None:
            continue
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _HUGE:
        return limit
    return default


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Split `tokens` into (context, continuation) windows that predict each token exactly once.

    The first window predicts the first `max_length` tokens from `[prefix] + tokens[:max_length-1]`;
    every later window predicts the next `max_length` tokens (fewer at the end) and keeps as much of
    the preceding text as fits as context, so the last tokens are not scored with a short context.
    Same windows as lm-eval's `get_rolling_token_windows(..., context_len=1)` + `make_disjoint_window`.
    """
    tokens = list(tokens)
    if max_length < 1:
        raise ValueError("max_length must be >= 1")
    windows: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return windows
    first = min(max_length, len(tokens))
    windows.append(([prefix_token], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_length)
        end = predicted + n_pred
        inputs = tokens[max(0, end - max_length - 1) : end - 1]
        context = inputs[: len(inputs) - (n_pred - 1)]
        windows.append((context, tokens[end - n_pred : end]))
        predicted = end
    return windows


@dataclass
class HFLM:
    """An HF causal LM + tokenizer answering lm-eval's three request types.

    `add_special_tokens=None` encodes with the tokenizer's own default (lm-eval's behaviour: Llama-2
    style tokenizers add BOS, SmolLM2/Qwen ones add nothing). `max_length=None` reads it from the
    model config like lm-eval does.
    """

    model: Any
    tokenizer: Any
    batch_size: int = 8
    max_length: int | None = None
    add_special_tokens: bool | None = None
    progress: bool = True
    max_gen_toks: int = 256
    share_context: bool = True
    label: str = ""  # shown on the progress bar (the harness sets the task name)
    # logits kept per forward pass (rows x positions x vocabulary) at most: rolling windows of a
    # long-context model (8192 positions x 49k vocabulary = 1.6 GB per row in fp32) then run fewer
    # rows per batch instead of running out of memory; 2**28 elements = 1 GiB of fp32 logits
    max_logit_elements: int = 2**28

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.max_length is None:
            self.max_length = resolve_max_length(self.model, self.tokenizer)
        self._accepts_logits_to_keep = accepts(self.model, "logits_to_keep")
        # transformers >= 5.24 names the KV-cache argument and output field `cache`; earlier `past_key_values`
        self._cache_arg = cache_argument(self.model)
        self._can_share = self.share_context and self._cache_arg is not None and accepts(self.model, "position_ids")
        self._vocab = _vocab_size(self.model)  # sizes the logits each batch keeps (max_logit_elements)

    # ------------------------------------------------------------------ tokenisation
    @property
    def device(self) -> torch.device:
        emb = self.model.get_input_embeddings()
        if emb.weight.device.type == "meta":  # an offloaded model streams its embedding in
            from qingzhou.llm.devices import model_device

            return model_device(self.model)
        return emb.weight.device

    @property
    def prefix_token_id(self) -> int:
        """Token that conditions an empty context: BOS if the tokenizer has one, else EOS."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, text: str) -> list[int]:
        if self.add_special_tokens is None:
            return list(self.tokenizer.encode(text))
        return list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's `_encode_pair`: move trailing spaces, encode whole, split at the context length."""
        if context == "":
            cont = list(self.tokenizer.encode(continuation, add_special_tokens=False))
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------ request types
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Sum of log P(continuation | context) and whether greedy decoding would produce it."""
        pairs = [self.encode_pair(c, x) for c, x in requests]
        return self.loglikelihood_tokens(pairs, desc="loglikelihood")

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Total log-likelihood of each text, every token scored once (for perplexity)."""
        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            for window in rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length):
                pairs.append(window)
                owner.append(i)
        scores = self.loglikelihood_tokens(pairs, desc="rolling loglikelihood")
        totals = [0.0] * len(texts)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Greedy continuation of each context, cut at the first of its stop strings."""
        results: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(self.tok_encode(requests[i][0])))
        with progress_bar(len(requests), self._desc("generate_until"), enabled=self.progress) as advance:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                # requests in one batch must share generation settings; split otherwise
                groups: dict[tuple, list[int]] = {}
                for i in chunk:
                    until, max_new = self._gen_settings(requests[i][1])
                    groups.setdefault((tuple(until), max_new), []).append(i)
                for (until, max_new), idx in groups.items():
                    outs = self._generate_batch([requests[i][0] for i in idx], list(until), max_new)
                    for i, text in zip(idx, outs):
                        results[i] = text
                advance(len(chunk))
        return [r if r is not None else "" for r in results]

    # ------------------------------------------------------------------ internals
    def _desc(self, request_type: str) -> str:
        return f"{self.label} ({request_type})" if self.label else request_type

    def _gen_settings(self, kwargs: dict[str, Any]) -> tuple[list[str], int]:
        until = kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        eos = self.tokenizer.eos_token
        until = list(until) + ([eos] if eos and eos not in until else [])
        return until, int(kwargs.get("max_gen_toks", self.max_gen_toks))

    @torch.inference_mode()
    def _generate_batch(self, contexts: list[str], until: list[str], max_new: int) -> list[str]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        max_ctx = max(1, self.max_length - max_new)
        encoded = [self.tok_encode(c)[-max_ctx:] for c in contexts]
        width = max(len(e) for e in encoded)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):  # left padding: the last real token sits at the end
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        tokenizer = self.tokenizer

        class _StopStrings(StoppingCriteria):
            """Stop each row once its generated text holds a stop string (saves decode steps)."""

            def __call__(self, input_ids, scores, **kwargs):
                new = input_ids[:, width:]
                texts = tokenizer.batch_decode(new, skip_special_tokens=False)
                done = [any(s in t for s in until) for t in texts]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([_StopStrings()]),
        )
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=False)
        return [_cut_at_stop(t, until) for t in texts]

    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "loglikelihood"
    ) -> list[tuple[float, bool]]:
        """Score pre-tokenised (context, continuation) pairs.

        Requests sharing a context (the choices of one question) run the context once and the
        continuations on its KV cache (`share_context`; needs a cache argument and `position_ids`
        in the model's forward, else everything takes the plain path). In the plain path requests
        whose model input is identical (continuations that differ only in their last token, e.g.
        the letters A/B/C/D) share one row of one forward pass, lm-eval's one-token cache. Both run
        longest first (shared groups: longest continuation first) in batches of `batch_size`,
        right-padded, so the first batch shows any out-of-memory at once and the ETA over- rather
        than under-estimates.
        """
        for i, (_ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"request {i} has an empty continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length")
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        shared, plain = self._split_shared(pairs)
        from qingzhou.llm.quantized.runtime import keep_dequantized

        with progress_bar(len(pairs), self._desc(desc), enabled=self.progress) as advance, keep_dequantized(self.model):
            group_cost = lambda batch: sum(self._group_logits(members, pairs) for _, members in batch)  # noqa: E731
            for batch in _budget_batches(shared, self.batch_size, self.max_logit_elements, group_cost):
                for idx, score in self._score_shared(batch, pairs):
                    results[idx] = score
                advance(sum(len(members) for _, members in batch))
            self._score_plain([(i, pairs[i]) for i in plain], results, advance)
        return results  # type: ignore[return-value]

    def _split_shared(self, pairs) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
        """Requests whose context is scored once for all their continuations, and the rest.

        A context is shared when its requests would need more than one row in the plain path
        (continuations that differ before their last token; A/B/C/D letters already share one row
        there) and nothing needs truncating. Groups come longest continuation first, then longest
        context: the continuation forward (one row per choice) is the larger one, so padding it less
        saves most (on PIQA, ARC-Easy and HellaSwag 12-30% fewer padded tokens than ordering by
        context + continuation; the biggest continuation batch still comes first).
        """
        if not self._can_share:
            return [], list(range(len(pairs)))
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _cont) in enumerate(pairs):
            by_ctx.setdefault(tuple(ctx), []).append(i)
        shared, plain = [], []
        for ctx, members in by_ctx.items():
            longest = max(len(pairs[i][1]) for i in members)
            distinct_inputs = len({tuple(pairs[i][1][:-1]) for i in members})
            fits = self._group_logits(members, pairs) <= self.max_logit_elements  # rolling windows' [prefix] groups do not
            if distinct_inputs > 1 and len(ctx) + longest <= self.max_length + 1 and fits:
                shared.append((list(ctx), members))
            else:
                plain.extend(members)
        shared.sort(key=lambda g: (-max(len(pairs[i][1]) for i in g[1]), -len(g[0]), tuple(g[0])))
        return shared, plain

    def _score_plain(self, indexed, results, advance) -> None:
        unique: dict[tuple[int, ...], _Scored] = {}
        for i, (ctx, cont) in indexed:
            inputs = (ctx + cont)[-(self.max_length + 1) :][:-1]
            key = tuple(inputs)
            unique.setdefault(key, _Scored(inputs)).members.append((i, cont))
        items = sorted(unique.values(), key=lambda s: (-len(s.inputs), tuple(s.inputs)))
        for batch in _budget_batches(items, self.batch_size, self.max_logit_elements, self._plain_logits):
            for idx, score in self._score_batch(batch):
                results[idx] = score
            advance(sum(len(s.members) for s in batch))

    @torch.inference_mode()
    def _score_shared(self, groups, pairs) -> Iterator[tuple[int, tuple[float, bool]]]:
        """Score a batch of (context, requests) groups: contexts once, then all continuations
        on top of their context's KV cache (rows of the cache repeated per continuation)."""
        lengths = [len(ctx) for ctx, _ in groups]
        width = max(lengths)
        ids = torch.zeros((len(groups), width), dtype=torch.long)
        mask = torch.zeros((len(groups), width), dtype=torch.long)
        for row, (ctx, _) in enumerate(groups):
            ids[row, : len(ctx)] = torch.tensor(ctx)
            mask[row, : len(ctx)] = 1
        dev = self.device
        kwargs = {"logits_to_keep": width - min(lengths) + 1} if self._accepts_logits_to_keep else {}
        # right-padded contexts need no mask here (causal); the continuation pass masks the pads out
        out = self.model(input_ids=ids.to(dev), use_cache=True, **kwargs)
        offset = width - out.logits.shape[1]
        first = torch.stack([out.logits[row, n - 1 - offset] for row, n in enumerate(lengths)])
        first = F.log_softmax(first.float(), dim=-1)  # [groups, vocab]: predicts every cont[0]
        rows = [(g, i) for g, (_, members) in enumerate(groups) for i in members]
        suffix = max(len(pairs[i][1]) - 1 for _, i in rows)
        rest = None
        if suffix > 0:
            sids = torch.zeros((len(rows), suffix), dtype=torch.long)
            smask = torch.zeros((len(rows), width + suffix), dtype=torch.long)
            pos = torch.zeros((len(rows), suffix), dtype=torch.long)
            for r, (g, i) in enumerate(rows):
                tail = pairs[i][1][:-1]
                sids[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                smask[r, :width] = mask[g]
                smask[r, width : width + len(tail)] = 1
                pos[r] = lengths[g] + torch.arange(suffix)
            cache = out[self._cache_arg]  # the output field carries the argument's name
            cache.reorder_cache(torch.tensor([g for g, _ in rows], device=dev))
            rest = self.model(input_ids=sids.to(dev), attention_mask=smask.to(dev), position_ids=pos.to(dev),
                              use_cache=True, **{self._cache_arg: cache}).logits
        for r, (g, i) in enumerate(rows):
            cont = pairs[i][1]
            parts = [first[g : g + 1]]
            if len(cont) > 1:
                parts.append(F.log_softmax(rest[r, : len(cont) - 1].float(), dim=-1))
            logp = torch.cat(parts)  # [len(cont), vocab]
            target = torch.tensor(cont, device=logp.device)
            logprob = logp.gather(-1, target[:, None]).sum().item()
            if not math.isfinite(logprob):
                raise FloatingPointError(f"non-finite log-likelihood {logprob} for request {i}")
            yield i, (logprob, bool((logp.argmax(-1) == target).all()))

    def _group_logits(self, members: list[int], pairs) -> int:
        """Logit elements a shared-context group keeps: members x longest continuation x vocabulary."""
        return len(members) * max(len(pairs[i][1]) for i in members) * self._vocab

    def _plain_logits(self, batch: list[_Scored]) -> int:
        """Logit elements `_score_batch` keeps for these rows."""
        return len(batch) * _kept_positions(batch) * self._vocab

    @torch.inference_mode()
    def _score_batch(self, batch: list[_Scored]) -> Iterator[tuple[int, tuple[float, bool]]]:
        width = max(len(s.inputs) for s in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, s in enumerate(batch):
            ids[row, : len(s.inputs)] = torch.tensor(s.inputs)
        # only the continuation positions need logits: with a large vocabulary the LM head over
        # every context position would cost more than the whole small model
        kwargs = {"logits_to_keep": _kept_positions(batch)} if self._accepts_logits_to_keep else {}
        # rows are right-padded and attention is causal, so no real position sees a pad: no mask (as
        # lm-eval), and SDPA runs its causal kernel instead of materialising a [rows, heads, width,
        # width] mask and scores (BoolQ's 1,000-token passages, 8,192-token rolling windows)
        logits = self.model(input_ids=ids.to(self.device), **kwargs).logits
        offset = width - logits.shape[1]  # position of logits[:, 0]
        for row, s in enumerate(batch):
            n = len(s.inputs) - offset
            longest = max(len(c) for _, c in s.members)
            tail = F.log_softmax(logits[row, n - longest : n].float(), dim=-1)  # [longest, vocab]
            greedy = tail.argmax(dim=-1)
            for idx, cont in s.members:
                part = tail[longest - len(cont) :]
                target = torch.tensor(cont, device=part.device)
                logprob = part.gather(-1, target[:, None]).sum().item()
                is_greedy = bool((greedy[longest - len(cont) :] == target).all())
                if not math.isfinite(logprob):
                    raise FloatingPointError(f"non-finite log-likelihood {logprob} for request {idx}")
                yield idx, (logprob, is_greedy)




def _budget_batches(items: list, max_items: int, budget: int, cost: Callable[[list], int]) -> Iterator[list]:
    """Consecutive batches of at most `max_items` whose `cost` (logit elements) stays within `budget`;
    an item too large on its own still forms a batch of one."""
    batch: list = []
    for item in items:
        if batch and (len(batch) == max_items or cost(batch + [item]) > budget):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _kept_positions(batch: list[_Scored]) -> int:
    """Trailing positions of a right-padded batch that cover every row's longest continuation."""
    width = max(len(s.inputs) for s in batch)
    return max(width - len(s.inputs) + max(len(c) for _, c in s.members) for s in batch)


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
