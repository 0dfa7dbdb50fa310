"""Task kinds: how a canonical row becomes LM requests, and how the answers become metrics.

One registry entry per kind, filled by `@register_kind` next to its functions. Each kind has
* `shot(spec, doc)`: the solved example text used in few-shot prompts (without the delimiter after);
* `requests(spec, doc, prefix)`: the request arguments for one row, given the description + shots;
* `score(spec, doc, answers, lm)`: one dict of raw numbers per row, aggregated by `metrics.AGGREGATIONS`.
The prompt layout is lm-eval's: description + (text + target_delimiter + answer + fewshot_delimiter)
per shot + text, and each multiple-choice continuation is target_delimiter + choice.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qingzhou.eval import metrics as M
from qingzhou.eval.tasks.spec import TaskSpec
from qingzhou.eval.tasks.templating import render
from qingzhou.registry import Registry


@dataclass(frozen=True)
class Kind:
    request_type: str  # "loglikelihood" | "generate_until" | "loglikelihood_rolling"
    shot: Callable[[TaskSpec, dict], str]
    requests: Callable[[TaskSpec, dict, str], list]
    score: Callable[[TaskSpec, dict, list, Any], dict[str, float]]


KINDS: Registry[Kind] = Registry("task kind")


def register_kind(name: str, request_type: str, shot, requests):
    """Decorator on the score function of a kind."""

    def decorate(score):
        KINDS.add(name, Kind(request_type, shot, requests, score))
        return score

    return decorate


def text(spec: TaskSpec, doc: dict) -> str:
    return render(spec.doc_to_text, doc, where=spec.where("doc_to_text"))


# ---------------------------------------------------------------- multiple choice (ARC, PIQA ...)
def _mc_shot(spec, doc):
    return text(spec, doc) + spec.target_delimiter + doc["choices"][doc["gold"]]


def _mc_requests(spec, doc, prefix):
    context = prefix + text(spec, doc)
    return [(context, spec.target_delimiter + choice) for choice in doc["choices"]]


@register_kind("multiple_choice", "loglikelihood", _mc_shot, _mc_requests)
def _mc_score(spec, doc, answers, lm):
    logprobs = [lp for lp, _ in answers]
    return {
        "acc": M.choice_acc(logprobs, doc["gold"]),
        "acc_norm": M.choice_acc_norm(logprobs, doc["choices"], doc["gold"]),
    }


# ---------------------------------------------------------------- partial evaluation (WinoGrande)
def _partial_shot(spec, doc):
    return doc["context_options"][doc["gold"]] + spec.target_delimiter + doc["continuation"]


def _partial_requests(spec, doc, prefix):
    cont = spec.target_delimiter + doc["continuation"]
    return [(prefix + option, cont) for option in doc["context_options"]]


@register_kind("partial_choice", "loglikelihood", _partial_shot, _partial_requests)
def _partial_score(spec, doc, answers, lm):
    return {"acc": M.choice_acc([lp for lp, _ in answers], doc["gold"])}


# ---------------------------------------------------------------- continuation likelihood (LAMBADA)
def _ll_shot(spec, doc):
    return text(spec, doc) + spec.target_delimiter + doc["continuation"]


def _ll_requests(spec, doc, prefix):
    return [(prefix + text(spec, doc), spec.target_delimiter + doc["continuation"])]


@register_kind("loglikelihood", "loglikelihood", _ll_shot, _ll_requests)
def _ll_score(spec, doc, answers, lm):
    (logprob, greedy), = answers
    return {"acc": float(greedy), "ll": logprob}


# ---------------------------------------------------------------- generation + exact match
def _gen_shot(spec, doc):
    return text(spec, doc) + spec.target_delimiter + str(doc.get("fewshot_answer", doc["target"]))


def _gen_requests(spec, doc, prefix):
    gen = spec.generation
    return [(prefix + text(spec, doc), {"until": list(gen.until), "max_gen_toks": gen.max_gen_toks})]


@register_kind("generate_until", "generate_until", _gen_shot, _gen_requests)
def _gen_score(spec, doc, answers, lm):
    (generated,) = answers
    a = spec.answer
    pred = M.normalize_answer(M.extract_answer(generated, a.regex, a.group_select), a.ignore, a.ignore_case)
    gold = M.normalize_answer(str(doc["target"]), a.ignore, a.ignore_case)
    return {"exact_match": M.exact_match(pred, gold)}


# ---------------------------------------------------------------- corpus perplexity
def _rolling_shot(spec, doc):
    return doc["text"]


def _rolling_requests(spec, doc, prefix):
    return [doc["text"]]


@register_kind("rolling", "loglikelihood_rolling", _rolling_shot, _rolling_requests)
def _rolling_score(spec, doc, answers, lm):
    (logprob,) = answers
    original = doc.get("original", doc["text"])
    return {
        "ll": logprob,
        "words": M.count_words(original),
        "bytes": M.count_bytes(original),
        "tokens": len(lm.tok_encode(doc["text"])),
    }
