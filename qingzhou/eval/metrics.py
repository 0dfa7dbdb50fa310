"""Per-example metrics and their aggregation, as lm-evaluation-harness defines them.

Kept free of torch so they can be unit-tested on plain numbers and reused by the report code.
Standard errors use the sample standard deviation (ddof=1) over sqrt(n), lm-eval's `mean_stderr`;
where a standard error is undefined (n < 2) it is `None`, never NaN.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

LN2 = math.log(2)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the first, like numpy.argmax."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def choice_acc(logprobs: Sequence[float], gold: int) -> float:
    """1.0 when the choice with the highest summed log-probability is the gold one."""
    return float(argmax(logprobs) == gold)


def choice_acc_norm(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> float:
    """acc with each log-probability divided by the choice's length in characters (lm-eval acc_norm).

    The length is that of the choice text without the target delimiter, as in lm-eval.
    """
    normed = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices)]
    return float(argmax(normed) == gold)


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean with the sample standard deviation; None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def perplexity(logprobs: Sequence[float]) -> float:
    """LAMBADA-style perplexity: exp of minus the mean per-example log-likelihood."""
    return math.exp(-mean(logprobs))


def perplexity_stderr(logprobs: Sequence[float]) -> float | None:
    """Delta-method standard error of `perplexity`: ppl * stderr(mean log-likelihood)."""
    se = mean_stderr(logprobs)
    return None if se is None else perplexity(logprobs) * se


def weighted_perplexity(logprobs: Sequence[float], weights: Sequence[int]) -> float:
    """exp(-sum(ll) / sum(units)): word or byte perplexity over a corpus of documents."""
    total = sum(weights)
    if total <= 0:
        raise ValueError("weighted perplexity needs a positive number of units")
    return math.exp(-sum(logprobs) / total)


def bits_per_byte(logprobs: Sequence[float], n_bytes: Sequence[int]) -> float:
    total = sum(n_bytes)
    if total <= 0:
        raise ValueError("bits per byte needs a positive number of bytes")
    return -sum(logprobs) / total / LN2


def count_words(text: str) -> int:
    """Whitespace-split word count (lm-eval's default for word perplexity)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def extract_answer(text: str, regex: str | None, group_select: int = 0) -> str:
    """The answer inside a generation: a regex's first group (or whole match), else the text.

    `group_select` picks which match when the regex matches several times (0 first, -1 last), as
    lm-eval's regex filter does; with no match the result is "[invalid]" so it never equals a target.
    """
    if regex is None:
        return text
    matches = re.findall(regex, text)
    if not matches:
        return "[invalid]"
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), match[0])
    return match


def normalize_answer(text: str, ignore: Sequence[str] = (), ignore_case: bool = False) -> str:
    """Strip, drop every regex in `ignore`, optionally lower-case: lm-eval's exact_match options."""
    for pattern in ignore:
        text = re.sub(pattern, "", text)
    text = text.strip()
    return text.lower() if ignore_case else text


def exact_match(prediction: str, target: str) -> float:
    return float(prediction == target)


# ---------------------------------------------------------------------------- aggregation
# Each task kind returns one dict of raw numbers per example; these turn a list of them into
# (value, stderr). A new metric = one function + one line here.


def _mean_of(key: str):
    def aggregate(rows: Sequence[dict]) -> tuple[float, float | None]:
        values = [r[key] for r in rows]
        return mean(values), mean_stderr(values)

    return aggregate


def _ppl(rows: Sequence[dict]) -> tuple[float, float | None]:
    lls = [r["ll"] for r in rows]
    return perplexity(lls), perplexity_stderr(lls)


def _weighted(unit: str):
    def aggregate(rows: Sequence[dict]) -> tuple[float, float | None]:
        return weighted_perplexity([r["ll"] for r in rows], [r[unit] for r in rows]), None

    return aggregate


def _bpb(rows: Sequence[dict]) -> tuple[float, float | None]:
    return bits_per_byte([r["ll"] for r in rows], [r["bytes"] for r in rows]), None


AGGREGATIONS = {
    "acc": _mean_of("acc"),
    "acc_norm": _mean_of("acc_norm"),
    "exact_match": _mean_of("exact_match"),
    "perplexity": _ppl,
    "word_perplexity": _weighted("words"),
    "byte_perplexity": _weighted("bytes"),
    "token_perplexity": _weighted("tokens"),
    "bits_per_byte": _bpb,
}

LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "token_perplexity", "bits_per_byte"}


def aggregate(metric: str, rows: Sequence[dict]) -> tuple[float, float | None]:
    """(value, stderr) of `metric` over per-example rows."""
    return AGGREGATIONS[metric](rows)
