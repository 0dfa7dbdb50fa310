"""A multiple-choice cloze task generated from shipped text, so the quickstart can score a task offline.

From each sentence of the text, up to `per_sentence` lower-case content words (spread over the
sentence, never among its first `min_context` words) become items: the words before it are the
context, the word and `choices - 1` distractors are the choices. Distractors come from the same
text's content words with the same ending class (-ing, -ed, -ly, -s, other) and a similar length,
so grammar alone does not give the answer away; the model has to know which word fits. Everything
is drawn from `random.Random(seed)`, so the shipped file `builtin/data/corpus_cloze.jsonl` is exactly
`cloze_items(builtin corpus)` (a test regenerates it).

    python -m qingzhou.eval.tasks.cloze   # rewrite the shipped file after editing the corpus
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "builtin" / "data"
CORPUS_CLOZE = DATA_DIR / "corpus_cloze.jsonl"

STOPWORDS = frozenset("""
a about above after again against all also although among an and any are as at be because been before
being below between both but by can could did does doing down during each either every few for from
further had has have having here how however into is it its itself just many may might more most much
must near neither nor not now of off often on once only onto or other others our out over own same
shall should since so some such than that the their them then there therefore these they this those
though through thus too under until upon very was were what when where whether which while who whom
whose why will with within without would yet your
""".split())
_WORD = re.compile(r"^[a-z]+$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str, min_words: int = 8) -> list[str]:
    """Sentences of the paragraphs of `text` (a one-line title paragraph is skipped)."""
    out = []
    for para in (p.strip() for p in text.split("\n")):
        if not para or not para.endswith((".", "!", "?")):
            continue
        out += [s for s in _SENTENCE_END.split(para) if len(s.split()) >= min_words]
    return out


def _content(word: str) -> str | None:
    """The bare word if it is a lower-case content word of 4+ letters, else None."""
    bare = word.strip(".,;:!?\"'()")
    return bare if _WORD.match(bare) and len(bare) >= 4 and bare not in STOPWORDS else None


def _ending(word: str) -> str:
    return next((e for e in ("ing", "ed", "ly", "s") if word.endswith(e)), "")


def _distractors(target: str, vocab: list[str], k: int, rng: random.Random) -> list[str]:
    same = [w for w in vocab if w != target and _ending(w) == _ending(target) and abs(len(w) - len(target)) <= 3]
    pool = same if len(same) >= k else [w for w in vocab if w != target]
    return rng.sample(pool, k)


def cloze_items(text: str, *, per_sentence: int = 5, min_context: int = 3, choices: int = 4,
                seed: int = 0) -> list[dict[str, Any]]:
    """Multiple-choice cloze rows (`query`, `choices`, `gold`) in the canonical multiple_choice layout."""
    rng = random.Random(seed)
    sents = sentences(text)
    vocab = sorted({c for s in sents for w in s.split() if (c := _content(w))})
    rows = []
    for s_index, sentence in enumerate(sents):
        words = sentence.split()
        slots = [i for i in range(min_context, len(words)) if _content(words[i])]
        if len(slots) > per_sentence:  # spread the blanks over the sentence
            slots = [slots[round(j * (len(slots) - 1) / (per_sentence - 1))] for j in range(per_sentence)]
        for i in slots:
            target = _content(words[i])
            options = [target, *_distractors(target, vocab, choices - 1, rng)]
            rng.shuffle(options)
            rows.append({"query": " ".join(words[:i]), "choices": options, "gold": options.index(target),
                         "sentence": s_index})
    return rows


def write_corpus_cloze(path: Path = CORPUS_CLOZE) -> Path:
    """Regenerate the shipped task file from the built-in corpus."""
    from qingzhou.data.corpus import load_text
    from qingzhou.io import atomic_write_text
    import json

    rows = cloze_items(load_text("builtin:corpus"))
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    print(write_corpus_cloze())
