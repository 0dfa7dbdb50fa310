"""The task harness on the real SmolLM2-135M-Instruct (few rows: the full runs are in bench/)."""
from __future__ import annotations

from pathlib import Path

import pytest

from qingzhou.eval.harness import build_requests, evaluate
from qingzhou.eval.lm import HFLM
from qingzhou.eval.tasks import load_task
from qingzhou.eval.tasks.data import load_groups

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="shared data not present")


@needs_data
def test_arc_easy_well_above_chance(smollm2):
    model, tok = smollm2
    res = evaluate(model, tok, ["arc_easy"], limit=40, data_dir=DATA, progress=False)["results"]["arc_easy"]
    # 4 choices: chance is 0.25; SmolLM2-135M scores ~0.6 acc on ARC-Easy
    assert res["metrics"]["acc"] > 0.45 and res["n"] == 40


@needs_data
def test_shared_context_path_matches_plain_path_on_smollm2(smollm2):
    model, tok = smollm2
    spec = load_task("hellaswag")
    (group,) = load_groups(spec, DATA)
    _, requests = build_requests(spec, group, num_fewshot=0, seed=0, limit=6)
    flat = [r for reqs in requests for r in reqs]
    shared = HFLM(model, tok, batch_size=4, progress=False).loglikelihood(flat)
    plain = HFLM(model, tok, batch_size=4, progress=False, share_context=False).loglikelihood(flat)
    assert max(abs(a[0] - b[0]) for a, b in zip(shared, plain)) < 1e-3
    assert [a[1] for a in shared] == [b[1] for b in plain]
