"""Bad input through the CLI: every case is one paragraph naming the file/key/stage, exit code 2,
no traceback. Plus a property-based fuzz of recipe and task files ("exit 0 or 2, never a traceback")
and the malicious task file that must run nothing.

Every case fails before heavy work (validation, or right after loading a 2-layer random model), so
the whole table runs in seconds.
"""
from __future__ import annotations

import json
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qingzhou.cli.main import app

runner = CliRunner()
ERROR_LINE = re.compile(r"^[a-z][a-z ]* error: ", re.MULTILINE)


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # {name} is replaced by the path of fixture file `name`
    expect: tuple[str, ...]  # substrings of the error paragraph (file, key, stage, what was expected)
    usage: bool = False  # refused by the command-line parser itself (click's "Invalid value" box)
    absent: str = ""  # a device type the case needs to be missing (skipped on machines that have it)


def _recipe(body: str) -> str:
    return "name: bad\nstages:\n" + textwrap.dedent(body)


LOAD = "  - kind: load\n    model: {tiny}\n    device: cpu\n"
FILES: dict[str, str | bytes] = {
    # recipes (the line numbers the cases expect are those of these texts)
    "malformed.yaml": "name: x\nstages:\n  - kind: load\n    model: [smollm2\n",
    "bad_escape.yaml": "name: x\nstages:\n  - kind: \"\\U00110000\"\n",  # PyYAML raises a bare ValueError
    "bad_date.yaml": "name: x\ncreated: 2024-13-01\nstages:\n  - kind: load\n",
    "typo_key.yaml": _recipe("  - kind: load\n    modle: smollm2\n"),
    "typo_kind.yaml": _recipe("  - kind: load\n  - kind: evl\n"),
    "no_kind.yaml": _recipe("  - kind: load\n  - perplexity: {}\n"),
    "wrong_type.yaml": _recipe(LOAD + "  - kind: eval\n    perplexity:\n      seq_len: abc\n"),
    "negative.yaml": _recipe(LOAD + "  - kind: eval\n    perplexity:\n      max_windows: -3\n"),
    "group_size.yaml": _recipe(LOAD + "  - kind: quantize\n    method: rtn\n    group_size: 0\n"),
    "quant_method.yaml": _recipe(LOAD + "  - kind: quantize\n    method: gptqq\n"),
    "prune_method.yaml": _recipe(LOAD + "  - kind: prune\n    method: wandaa\n"),
    "sparsity.yaml": _recipe(LOAD + "  - kind: prune\n    method: magnitude\n    sparsity: 1.5\n"),
    "nonutf8.yaml": b"name: x\nstages:\n  - kind: load\n    model: caf\xe9\n",
    "empty.yaml": "",
    "a_list.yaml": "- kind: load\n",
    "no_stages.yaml": "name: x\nstages: []\n",
    "top_typo.yaml": "name: x\nseeed: 1\nstages:\n  - kind: load\n",
    "missing_data.yaml": _recipe(LOAD + "  - kind: finetune\n    method: lora\n    data: nothere/train.jsonl\n"),
    "missing_data_cfg.yaml": _recipe(LOAD + "  - kind: finetune\n    data:\n      source: {rows.jsonl}\n      eval_source: gone.jsonl\n"),
    "missing_text.yaml": _recipe(LOAD + "  - kind: eval\n    perplexity:\n      data: no/such/wiki.txt\n"),
    "missing_calib.yaml": _recipe(LOAD + "  - kind: quantize\n    method: gptq\n    group_size: 32\n"
                                  "    calibration: {source: calib/missing.jsonl}\n"),
    "calib_suffix.yaml": _recipe(LOAD + "  - kind: prune\n    method: wanda\n    calibration: {source: {weird}}\n"),
    "unknown_builtin.yaml": _recipe(LOAD + "  - kind: finetune\n    data: builtin:industry-qaa\n"),
    "data_suffix.yaml": _recipe(LOAD + "  - kind: finetune\n    data: {weird}\n"),
    "data_folder.yaml": _recipe(LOAD + "  - kind: finetune\n    data: {folder}\n"),
    "data_not_hub.yaml": _recipe(LOAD + "  - kind: finetune\n    data: mydata\n"),
    "bad_task.yaml": _recipe(LOAD + "  - kind: eval\n    perplexity: null\n    tasks: [arc_easyy]\n"),
    "task_file_missing.yaml": _recipe(LOAD + "  - kind: eval\n    tasks: [tasks/mine.yaml]\n"),
    "data_dir.yaml": _recipe(LOAD + "  - kind: eval\n    tasks: [corpus_cloze]\n    data_dir: no/such/folder\n"),
    "stage_npu.yaml": _recipe(LOAD + "  - kind: quantize\n    method: gptq\n    group_size: 32\n    device: npu\n"),
    "load_cuda.yaml": _recipe("  - kind: load\n    model: {tiny}\n    device: cuda\n"),
    "load_unknown_device.yaml": _recipe("  - kind: load\n    model: {tiny}\n    device: tpu\n"),
    "model_missing.yaml": _recipe("  - kind: load\n    model: ./models/nope\n"),
    "model_suffix.yaml": _recipe("  - kind: load\n    model: org/weights.safetensors\n"),
    "model_pickle.yaml": _recipe("  - kind: load\n    model: {pickle_only}\n"),
    "teacher.yaml": _recipe(LOAD + "  - kind: distill\n    teacher: teachers/big.gguf\n"),
    "export_adapter.yaml": _recipe(LOAD + "  - kind: export\n    adapter: runs/none/adapter\n"),
    "three_layers.yaml": _recipe("  - kind: load\n    model: {three_layers}\n    device: cpu\n"
                                 "  - kind: eval\n    perplexity: {data: {text.txt}, seq_len: 16, max_windows: 1}\n"),
    "ok.yaml": _recipe(LOAD + "  - kind: eval\n    perplexity: {data: {text.txt}, seq_len: 16, max_windows: 1}\n"),
    "[red]markup[/b].yaml": "name: x\nstages:\n  - kind: load\n    model: [smollm2\n",
    # data
    "rows.jsonl": '{"instruction": "a", "output": "b"}\n' * 4,
    "rows_missing_field.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
    "rows_bad_json.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "c", \n',
    "rows_not_objects.json": "[1, 2, 3]",
    "text.txt": "Contracts allocate risk between the parties to a transaction. " * 8,
    "latin1.txt": b"caf\xe9 au lait\n" * 4,
    "data.weird": "some text\n",
    "[red]x[/b].txt": "markup in a file name\n",
    # task files
    "task_syntax.yaml": "task: t\nkind: multiple_choice\ndoc_to_text: \"Q: {{ query \"\nmetrics: [acc]\nheadline: acc\n"
                        "local: {path: rows.jsonl}\n",
    "task_field_syntax.yaml": "task: t\nkind: multiple_choice\nmetrics: [acc]\nheadline: acc\n"
                              "local:\n  path: rows.jsonl\n  fields:\n    gold: \"answer ==\"\n",
    "task_no_metrics.yaml": "task: t\nkind: multiple_choice\nheadline: acc\nlocal: {path: rows.jsonl}\n",
    "task_bad_escape.yaml": "task: t\nkind: \"\\U00110000\"\n",
    "task_kind.yaml": "task: t\nkind: multiple_choise\nmetrics: [acc]\nheadline: acc\nlocal: {path: rows.jsonl}\n",
    "task_undefined.yaml": "task: t\nkind: multiple_choice\ndoc_to_text: \"{{ quer }}\\nAnswer:\"\nmetrics: [acc]\n"
                           "headline: acc\nlocal: {path: mc.jsonl}\n",
    "mc.jsonl": '{"query": "1 + 1 =", "choices": ["2", "3"], "gold": 0}\n' * 3,
}


@pytest.fixture(scope="module")
def paths(tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    """Every fixture file plus broken copies of the tiny model; name -> path."""
    root = tmp_path_factory.mktemp("bad")
    out = {"tiny": str(tiny_llama_dir), "folder": str(root), "root": str(root)}

    def model_copy(name: str, edit_config=None) -> Path:
        dest = root / name
        shutil.copytree(tiny_llama_dir, dest)
        if edit_config:
            cfg = json.loads((dest / "config.json").read_text())
            edit_config(cfg)
            (dest / "config.json").write_text(json.dumps(cfg))
        out[name] = str(dest)
        return dest

    def three_layers(cfg):
        cfg["num_hidden_layers"] = 3
        cfg.pop("layer_types", None)

    model_copy("three_layers", three_layers)
    model_copy("wide_mlp", lambda cfg: cfg.update(intermediate_size=96))
    model_copy("remote_code", lambda cfg: cfg.update(auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"}))
    truncated = model_copy("truncated") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    pickle_only = model_copy("pickle_only")
    (pickle_only / "model.safetensors").unlink()
    (pickle_only / "pytorch_model.bin").write_bytes(b"never unpickled")
    no_config = model_copy("no_config")
    (no_config / "config.json").unlink()
    no_weights = model_copy("no_weights")
    (no_weights / "model.safetensors").unlink()
    adapter = root / "adapter_pickle"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tiny_llama_dir)}))
    (adapter / "adapter_model.bin").write_bytes(b"never unpickled")
    (root / "not_an_adapter").mkdir()
    out["adapter_pickle"], out["not_an_adapter"] = str(adapter), str(root / "not_an_adapter")
    (root / "a_file").write_text("I am a file, not a folder")
    out["a_file"] = str(root / "a_file")
    out["weird"] = str(root / "data.weird")
    out.update({name: str(root / name) for name in FILES})
    for name, content in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)  # "[red]x[/b].txt" lies in a folder "[red]x["
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(_fmt(content, out))
    return out


def _fmt(text: str, paths: dict[str, str]) -> str:
    return re.sub(r"\{([\w\[][\w.\[\]/-]*)\}", lambda m: paths.get(m.group(1), m.group(0)), text)


def run_cli(args: list[str]):
    return runner.invoke(app, args)


def assert_one_paragraph(r, expect=()) -> str:
    """Exit 2, no traceback, exactly one `... error:` line, naming everything in `expect`."""
    output = r.output + (r.stderr if r.stderr_bytes is not None else "")
    assert r.exit_code == 2, (r.exit_code, output, r.exception)
    assert "Traceback" not in output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    errors = ERROR_LINE.findall(r.stderr)
    assert len(errors) == 1, r.stderr
    message = r.stderr[r.stderr.index(errors[0]):].strip()
    assert "\n" not in message, message  # one paragraph (soft-wrapped: a single line)
    for piece in expect:
        assert piece in message, (piece, message)
    return message


T = "--device", "cpu"
CASES = [
    # ------------------------------------------------------------------ recipes (validate / run)
    Case("malformed-yaml", ("validate", "{malformed.yaml}"), ("malformed.yaml:5:1", "malformed YAML", "started at line 4")),
    Case("escape-past-unicode", ("validate", "{bad_escape.yaml}"), ("bad_escape.yaml:3", "malformed YAML", "\\U0010FFFF")),
    Case("impossible-date", ("validate", "{bad_date.yaml}"), ("bad_date.yaml", "malformed YAML", "month must be in 1..12")),
    Case("unknown-key", ("validate", "{typo_key.yaml}"), ("typo_key.yaml:4", "stages.0.modle", "did you mean 'model'")),
    Case("unknown-stage-kind", ("validate", "{typo_kind.yaml}"), ("typo_kind.yaml:4", "stages.1.kind", "Did you mean 'eval'")),
    Case("stage-without-kind", ("validate", "{no_kind.yaml}"), ("no_kind.yaml:4", "stages.1", "no 'kind'")),
    Case("wrong-type", ("validate", "{wrong_type.yaml}"), ("wrong_type.yaml:8", "stages.1.perplexity.seq_len", "'abc'")),
    Case("negative-number", ("validate", "{negative.yaml}"), ("negative.yaml:8", "stages.1.perplexity.max_windows", "-3")),
    Case("bad-group-size", ("validate", "{group_size.yaml}"), ("group_size.yaml", "stages.1", "group_size")),
    Case("unknown-quant-method", ("validate", "{quant_method.yaml}"), ("quant_method.yaml", "stages.1", "gptqq", "'gptq'")),
    Case("unknown-prune-method", ("validate", "{prune_method.yaml}"), ("prune_method.yaml", "stages.1", "wandaa", "'wanda'")),
    Case("sparsity-above-1", ("validate", "{sparsity.yaml}"), ("sparsity.yaml:8", "stages.1.sparsity", "1.5")),
    Case("non-utf8-recipe", ("validate", "{nonutf8.yaml}"), ("nonutf8.yaml:4", "not UTF-8", "line 4")),
    Case("empty-recipe", ("validate", "{empty.yaml}"), ("empty.yaml", "empty")),
    Case("recipe-not-a-mapping", ("validate", "{a_list.yaml}"), ("a_list.yaml", "mapping")),
    Case("no-stages", ("validate", "{no_stages.yaml}"), ("no_stages.yaml:2", "stages")),
    Case("top-level-typo", ("validate", "{top_typo.yaml}"), ("top_typo.yaml:2", "seeed", "did you mean 'seed'")),
    Case("recipe-file-missing", ("validate", "{root}/nope.yaml"), ("recipe file not found", "nope.yaml")),
    Case("unknown-builtin-recipe", ("validate", "quikstart"), ("quikstart", "Did you mean 'quickstart'")),
    Case("bad-override", ("validate", "{ok.yaml}", "-s", "seed"), ("override 'seed'", "KEY.PATH=VALUE")),
    Case("override-impossible-date", ("validate", "{ok.yaml}", "-s", "seed=2024-13-01"), ("seed", "integer")),
    Case("override-bad-index", ("validate", "{ok.yaml}", "-s", "stages.7.seq_len=1"), ("stages.7", "not an index")),
    Case("markup-in-recipe-path", ("validate", "{[red]markup[/b].yaml}"), ("[red]markup[/b].yaml:5:1", "malformed YAML")),
    # every file a recipe names is checked before any model loads
    Case("recipe-missing-data-file", ("validate", "{missing_data.yaml}"),
         ("missing_data.yaml:8", "stages.1.data", "finetune stage", "nothere/train.jsonl", "not found")),
    Case("recipe-missing-eval-source", ("validate", "{missing_data_cfg.yaml}"),
         ("missing_data_cfg.yaml:9", "stages.1.data.eval_source", "gone.jsonl")),
    Case("recipe-missing-text", ("validate", "{missing_text.yaml}"),
         ("missing_text.yaml:8", "stages.1.perplexity.data", "eval stage", "no/such/wiki.txt")),
    Case("recipe-missing-calibration", ("validate", "{missing_calib.yaml}"),
         ("missing_calib.yaml:9", "stages.1.calibration.source", "quantize stage", "calib/missing.jsonl")),
    Case("recipe-calibration-suffix", ("validate", "{calib_suffix.yaml}"),
         ("calib_suffix.yaml:8", "stages.1.calibration.source", "unsupported calibration file type '.weird'")),
    Case("recipe-unknown-builtin-data", ("validate", "{unknown_builtin.yaml}"),
         ("unknown_builtin.yaml:7", "stages.1.data", "industry-qaa", "Did you mean 'industry-qa'")),
    Case("recipe-data-unknown-suffix", ("validate", "{data_suffix.yaml}"),
         ("data_suffix.yaml:7", "stages.1.data", "unsupported data file type '.weird'")),
    Case("recipe-data-is-a-folder", ("validate", "{data_folder.yaml}"), ("data_folder.yaml:7", "stages.1.data", "is a folder")),
    Case("recipe-data-not-a-hub-id", ("validate", "{data_not_hub.yaml}"), ("data_not_hub.yaml:7", "stages.1.data", "mydata", "not found")),
    Case("recipe-unknown-task", ("validate", "{bad_task.yaml}"), ("bad_task.yaml:8", "stages.1.tasks.0", "arc_easyy", "Did you mean 'arc_easy'")),
    Case("recipe-task-file-missing", ("validate", "{task_file_missing.yaml}"), ("task_file_missing.yaml:7", "stages.1.tasks.0", "tasks/mine.yaml")),
    Case("recipe-data-dir-missing", ("validate", "{data_dir.yaml}"), ("data_dir.yaml:8", "stages.1.data_dir", "no/such/folder")),
    Case("recipe-stage-device-npu", ("validate", "{stage_npu.yaml}"), ("stage_npu.yaml:9", "stages.1.device", "quantize stage", "'npu'", "not available"), absent="npu"),
    Case("recipe-load-device-cuda", ("run", "{load_cuda.yaml}", "--out", "{root}/run-cuda"), ("load_cuda.yaml:5", "stages.0.device", "'cuda'", "not available"), absent="cuda"),
    Case("recipe-unknown-device", ("validate", "{load_unknown_device.yaml}"), ("stages.0.device", "unknown device 'tpu'")),
    Case("recipe-model-missing", ("validate", "{model_missing.yaml}"), ("model_missing.yaml:4", "stages.0.model", "./models/nope")),
    Case("recipe-model-file-suffix-not-hub", ("validate", "{model_suffix.yaml}"), ("stages.0.model", "org/weights.safetensors", "no model found")),
    Case("recipe-model-pickle", ("validate", "{model_pickle.yaml}"), ("stages.0.model", "pickle", "--allow-pickle")),
    Case("recipe-teacher-missing", ("validate", "{teacher.yaml}"), ("teacher.yaml:7", "stages.1.teacher", "distill stage", "teachers/big.gguf")),
    Case("recipe-export-adapter-missing", ("validate", "{export_adapter.yaml}"), ("stages.1.adapter", "runs/none/adapter")),
    Case("run-weights-do-not-match-config", ("run", "{three_layers.yaml}", "--out", "{root}/run-3"),
         ("three_layers", "missing from the checkpoint", "model.layers.2.", "strict: false")),
    Case("run-out-is-a-file", ("run", "{ok.yaml}", "--out", "{a_file}"), ("--out", "a_file", "is a file")),
    Case("run-out-under-a-file", ("run", "{ok.yaml}", "--out", "{a_file}/run"), ("--out", "a_file", "is a file")),
    Case("recipes-cp-exists", ("recipes", "cp", "quickstart", "{ok.yaml}"), ("already exists", "--force")),
    # ------------------------------------------------------------------ models
    Case("model-path-missing", ("generate", "hi", "-m", "{root}/models/none", *T), ("no model found", "models/none")),
    Case("model-suffix-not-sent-to-hub", ("generate", "hi", "-m", "org/model.gguf", *T), ("GGUF file not found", "org/model.gguf")),
    Case("model-json-not-sent-to-hub", ("generate", "hi", "-m", "someone/config.json", *T), ("no model found", "someone/config.json")),
    Case("model-no-config", ("generate", "hi", "-m", "{no_config}", *T), ("no_config", "no config.json")),
    Case("model-no-weights", ("generate", "hi", "-m", "{no_weights}", *T), ("no_weights", "no weight files")),
    Case("model-pickle-weights", ("generate", "hi", "-m", "{pickle_only}", *T), ("pytorch_model.bin", "pickle", "--allow-pickle")),
    Case("model-truncated-safetensors", ("eval", "ppl", "{text.txt}", "-m", "{truncated}", *T), ("truncated", "could not load the model")),
    Case("model-missing-layer", ("generate", "hi", "-m", "{three_layers}", *T), ("three_layers", "missing", "model.layers.2.", "--no-strict")),
    Case("model-wrong-shapes", ("generate", "hi", "-m", "{wide_mlp}", *T), ("wide_mlp", "wrong shape", "mlp.down_proj.weight", "[64, 128]")),
    Case("model-remote-code", ("generate", "hi", "-m", "{remote_code}", *T), ("auto_map", "--trust-remote-code")),
    Case("device-cuda-generate", ("generate", "hi", "-m", "{tiny}", "--device", "cuda"), ("--device", "'cuda'", "not available"), absent="cuda"),
    Case("device-unknown", ("eval", "ppl", "{text.txt}", "-m", "{tiny}", "--device", "tpu"), ("--device", "unknown device 'tpu'")),
    Case("dtype-unknown", ("generate", "hi", "-m", "{tiny}", *T, "--dtype", "float64"), ("unknown dtype 'float64'",)),
    Case("device-cuda-quantize", ("quantize", "{tiny}", "{root}/q-out", "--device", "cuda"), ("--device", "'cuda'", "not available"), absent="cuda"),
    Case("device-npu-prune", ("prune", "{tiny}", "{root}/p-out", "--device", "npu"), ("--device", "'npu'", "not available"), absent="npu"),
    Case("device-cuda-moefy", ("moefy", "{tiny}", "{root}/m-out", "--device", "cuda:0"), ("--device", "'cuda:0'", "not available"), absent="cuda"),
    Case("device-cuda-finetune", ("finetune", "{rows.jsonl}", "-m", "{tiny}", "--device", "cuda", "-o", "{root}/ft"), ("--device", "not available"), absent="cuda"),
    Case("device-cuda-bench", ("bench", "-m", "{tiny}", "--device", "cuda"), ("--device", "not available"), absent="cuda"),
    Case("quantize-out-is-a-file", ("quantize", "{tiny}", "{a_file}", "--method", "rtn"), ("OUT_DIR", "a_file", "is a file")),
    Case("prune-out-is-a-file", ("prune", "{tiny}", "{a_file}"), ("OUT_DIR", "a_file", "is a file")),
    Case("quantize-bad-group-size", ("quantize", "{tiny}", "{root}/q2", "--method", "rtn", "--group-size", "0"), ("group_size", "got 0")),
    Case("quantize-unknown-method", ("quantize", "{tiny}", "{root}/q3", "--method", "gptqq"), ("gptqq", "'gptq'")),
    Case("export-pickle-adapter", ("export", "merge", "{adapter_pickle}", "{root}/merged"), ("adapter_model.bin", "pickle", "--allow-pickle")),
    Case("export-not-an-adapter", ("export", "merge", "{not_an_adapter}", "{root}/merged2"), ("not_an_adapter", "adapter_config.json")),
    Case("export-out-is-a-file", ("export", "merge", "{adapter_pickle}", "{a_file}"), ("a_file", "is a file")),
    # ------------------------------------------------------------------ data
    Case("ppl-text-missing-with-markup", ("eval", "ppl", "{root}/[red]gone[/b].txt", "-m", "{tiny}", *T), ("[red]gone[/b].txt", "not found")),
    Case("ppl-text-not-utf8", ("eval", "ppl", "{latin1.txt}", "-m", "{tiny}", *T), ("latin1.txt", "not UTF-8")),
    Case("finetune-data-missing", ("finetune", "{root}/nothere.jsonl", "-m", "{tiny}", *T, "-o", "{root}/ft1"), ("nothere.jsonl", "not found")),
    Case("finetune-data-not-hub", ("finetune", "my_corpus.weird", "-m", "{tiny}", *T, "-o", "{root}/ft2"), ("my_corpus.weird", "not found")),
    Case("finetune-row-missing-field", ("finetune", "{rows_missing_field.jsonl}", "-m", "{tiny}", *T, "-o", "{root}/ft3", "--max-steps", "1"),
         ("rows_missing_field.jsonl, row 2", "output")),
    Case("finetune-row-bad-json", ("finetune", "{rows_bad_json.jsonl}", "-m", "{tiny}", *T, "-o", "{root}/ft4"), ("rows_bad_json.jsonl:2", "invalid JSON")),
    Case("finetune-rows-not-objects", ("finetune", "{rows_not_objects.json}", "-m", "{tiny}", *T, "-o", "{root}/ft5"), ("rows_not_objects.json, row 1", "JSON object")),
    Case("finetune-unknown-method", ("finetune", "{rows.jsonl}", "-m", "{tiny}", *T, "--method", "loraa", "-o", "{root}/ft6"), ("loraa", "'lora'")),
    Case("finetune-bad-set", ("finetune", "{rows.jsonl}", "-m", "{tiny}", *T, "--set", "dropout", "-o", "{root}/ft7"), ("--set 'dropout'", "KEY=VALUE")),
    Case("finetune-set-impossible-date", ("finetune", "{rows.jsonl}", "-m", "{tiny}", *T, "--set", "dropout=2024-13-01",
                                          "-o", "{root}/ft8"), ("dropout", "number")),
    Case("finetune-out-is-a-file", ("finetune", "{rows.jsonl}", "-m", "{tiny}", *T, "-o", "{a_file}"), ("--out", "a_file", "is a file")),
    # ------------------------------------------------------------------ task files
    Case("unknown-task", ("eval", "tasks", "arc_easyy", "-m", "{tiny}", *T), ("arc_easyy", "Did you mean 'arc_easy'")),
    Case("task-template-syntax", ("eval", "tasks", "{task_syntax.yaml}", "-m", "{tiny}", *T), ("task_syntax.yaml:3", "doc_to_text", "syntax error")),
    Case("task-expression-syntax", ("eval", "tasks", "{task_field_syntax.yaml}", "-m", "{tiny}", *T),
         ("task_field_syntax.yaml:8", "local.fields.gold", "syntax error")),
    Case("task-missing-key", ("eval", "tasks", "{task_no_metrics.yaml}", "-m", "{tiny}", *T), ("task_no_metrics.yaml", "metrics", "required")),
    Case("task-escape-past-unicode", ("eval", "tasks", "{task_bad_escape.yaml}", "-m", "{tiny}", *T),
         ("task_bad_escape.yaml:2", "malformed YAML", "\\U0010FFFF")),
    Case("task-bad-kind", ("eval", "tasks", "{task_kind.yaml}", "-m", "{tiny}", *T), ("task_kind.yaml:2", "kind", "multiple_choise")),
    Case("task-undefined-field", ("eval", "tasks", "{task_undefined.yaml}", "-m", "{tiny}", *T, "--data-dir", "{root}"),
         ("task_undefined.yaml:3", "doc_to_text", "template line 1", "'quer' is undefined")),
    Case("task-data-dir-missing", ("eval", "tasks", "corpus_cloze", "-m", "{tiny}", *T, "--data-dir", "{root}/nodata"), ("--data-dir", "nodata")),
    Case("tasks-out-is-a-folder", ("eval", "tasks", "corpus_cloze", "-m", "{tiny}", *T, "--out", "{root}"), ("--out", "is a folder")),
    Case("bench-bad-fast", ("bench", "-m", "{tiny}", "--fast", "maybe"), ("--fast", "'maybe'")),
    # ------------------------------------------------------------------ numbers out of range
    Case("generate-negative-tokens", ("generate", "hi", "-m", "{tiny}", *T, "-n", "-1"), ("--max-new-tokens",), usage=True),
    Case("ppl-zero-seq-len", ("eval", "ppl", "{text.txt}", "-m", "{tiny}", *T, "--seq-len", "0"), ("--seq-len",), usage=True),
    Case("bench-zero-batch", ("bench", "-m", "{tiny}", *T, "-b", "0"), ("--batch-size",), usage=True),
    Case("moefy-top-k-above-experts", ("moefy", "{tiny}", "{root}/m2", "--experts", "4", "--top-k", "8"), ("top_k=8", "num_experts=4")),
    Case("prune-bad-nm", ("prune", "{tiny}", "{root}/p2", "--nm", "2-4"), ("nm", "2:4", "got '2-4'")),
    Case("quantize-bits-9", ("quantize", "{tiny}", "{root}/q4", "--method", "rtn", "--bits", "9"), ("--bits", "less than or equal to 8", "got 9")),
    Case("finetune-negative-steps", ("finetune", "{rows.jsonl}", "-m", "{tiny}", *T, "--max-steps", "-1", "-o", "{root}/ft8"), ("max_steps", "greater than 0")),
    Case("tasks-negative-fewshot", ("eval", "tasks", "corpus_cloze", "-m", "{tiny}", *T, "-k", "-1"), ("num_fewshot",)),
]


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_paragraph_exit_2(case: Case, paths, monkeypatch):
    if case.absent:
        from qingzhou.llm.devices import is_available

        if is_available(case.absent):
            pytest.skip(f"this machine has {case.absent}")
    monkeypatch.chdir(paths["root"])  # relative paths in the recipes resolve inside the fixture folder
    args = [_fmt(a, paths) for a in case.args]
    r = run_cli(args)
    if case.usage:
        assert r.exit_code == 2 and "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.output
        assert "Invalid value" in r.stderr and all(e in r.stderr for e in case.expect), r.stderr
    else:
        assert_one_paragraph(r, [_fmt(e, paths) for e in case.expect])


def test_bad_inputs_leave_no_output_behind(paths):
    """The cases that fail on an output path, a device or a model did not create their outputs."""
    root = Path(paths["root"])
    for name in ("q-out", "p-out", "m-out", "merged", "run-cuda"):
        assert not (root / name).exists(), name
    assert Path(paths["a_file"]).read_text() == "I am a file, not a folder"


def test_strict_can_be_switched_off(paths):
    """`--no-strict` is the documented way out of the strict-loading error: the model loads (with the
    missing layer freshly initialised)."""
    r = run_cli(["generate", "hi", "-m", paths["three_layers"], "--device", "cpu", "-n", "2", "--no-stream", "--no-strict"])
    assert r.exit_code == 0, r.output


def test_strict_false_in_a_load_stage_opts_in(paths, tmp_path):
    recipe = yaml.safe_load(Path(paths["three_layers.yaml"]).read_text())
    recipe["stages"][0]["strict"] = False
    path = tmp_path / "loose.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = run_cli(["run", str(path), "--out", str(tmp_path / "run"), "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stages"][0]["metrics"]["layers"] == 3


def test_the_bitsandbytes_hint_survives_printing(capsys):
    """Error text is printed as text: `[bnb]` in a pip hint and `[red]` in a path are not markup."""
    import typer

    from qingzhou.cli.common import guarded
    from qingzhou.errors import DeviceError

    @guarded
    def fails():
        raise DeviceError("bitsandbytes is not supported on device 'cpu' in /tmp/[red]x[/b].",
                          hint="bitsandbytes is not installed (pip install 'qingzhou[bnb]').")

    with pytest.raises(typer.Exit) as e:
        fails()
    assert e.value.exit_code == 2
    err = capsys.readouterr().err
    assert "pip install 'qingzhou[bnb]'" in err and "/tmp/[red]x[/b]" in err


@pytest.mark.parametrize("signum, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_a_library_turns_into_another_error_exits_as_interrupted(signum, code, capsys):
    """Ctrl-C (or a scheduler's SIGTERM) during any command ends as "interrupted" with the shell's
    code, even when a library catches the interrupt and raises its own error (transformers' lazy
    import turns a failed import into `ModuleNotFoundError`); any other error still propagates."""
    import os
    import signal

    import typer

    from qingzhou.cli.common import guarded

    @guarded
    def command(kill: bool):
        try:
            if kill:
                os.kill(os.getpid(), getattr(signal, signum))
            for _ in range(1000):
                pass
        except KeyboardInterrupt as e:
            raise ModuleNotFoundError("Could not import module 'LlamaForCausalLM'.") from e
        raise ModuleNotFoundError("no signal: a real error")

    with pytest.raises(typer.Exit) as e:
        command(True)
    assert e.value.exit_code == code
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handlers are gone
    with pytest.raises(ModuleNotFoundError, match="a real error"):
        command(False)


# ---------------------------------------------------------------------- malicious task files

EVIL_TEMPLATES = {
    "globals-via-cycler": "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "joiner": "{{ joiner.__init__.__globals__['os'].system('touch PWNED') }}",
    "namespace": "{{ namespace.__init__.__globals__.os.popen('touch PWNED').read() }}",
    "mro-walk": "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
                "{{ c(['touch', 'PWNED']) }}{% endif %}{% endfor %}",
    "attr-filter": "{{ (lipsum|attr('__globals__'))['os'].system('touch PWNED') }}",
    "getitem": "{{ cycler['__init__']['__globals__']['os'].system('touch PWNED') }}",
}
# private names built at render time: invisible to the load-time check, refused by the sandbox
EVIL_DYNAMIC = {
    "dynamic-attr": "{{ (query|attr('_' ~ '_class_' ~ '_'))|attr('_' ~ '_mro_' ~ '_') }}",
    "dynamic-format": "{{ ('{0._' ~ '_class__}').format(query) }}",
    "huge-repeat": "{{ query * 1000000000 }}",
    "huge-power": "{{ 99 ** 9999999 }}",
}


def _task_file(folder: Path, name: str, template: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"task": name, "kind": "multiple_choice", "doc_to_text": template,
                                    "metrics": ["acc"], "headline": "acc", "local": {"path": "mc.jsonl"}}))
    return path


@pytest.mark.parametrize("name", sorted(EVIL_TEMPLATES))
def test_malicious_task_file_is_refused_before_anything_runs(name, paths, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = _task_file(tmp_path, name, EVIL_TEMPLATES[name])
    r = run_cli(["eval", "tasks", str(task), "-m", paths["tiny"], "--device", "cpu", "--data-dir", paths["root"]])
    message = assert_one_paragraph(r, [f"{task.name}:", "doc_to_text", "private attribute"])
    assert "refused" in message
    assert not (tmp_path / "PWNED").exists() and not (Path(paths["root"]) / "PWNED").exists()


@pytest.mark.parametrize("name", sorted(EVIL_DYNAMIC))
def test_sandbox_refuses_what_the_load_check_cannot_see(name, paths, tmp_path, monkeypatch):
    """Built at render time, the private name passes the parse-time check; the sandbox refuses it
    while rendering the first row (after the model loaded), as one paragraph naming the field."""
    monkeypatch.chdir(tmp_path)
    task = _task_file(tmp_path, name, EVIL_DYNAMIC[name])
    r = run_cli(["eval", "tasks", str(task), "-m", paths["tiny"], "--device", "cpu", "--data-dir", paths["root"],
                 "--no-progress"])
    assert_one_paragraph(r, [f"{task.name}:", "doc_to_text", "template line 1"])
    assert not (tmp_path / "PWNED").exists()


def test_sandboxed_rendering_still_renders_lm_eval_prompts():
    from qingzhou.eval.tasks.templating import evaluate_expression, render

    doc = {"question": "Why?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "B"}
    assert render("Question: {{question}}\nAnswer:", doc) == "Question: Why?\nAnswer:"
    assert render("{{ question|regex_sub('\\?', '!') }} {{ choices.text|join(', ') }}", doc) == "Why! x, y"
    assert evaluate_expression("choices.label.index(answerKey)", doc) == 1
    assert evaluate_expression("'Question: ' + question", doc) == "Question: Why?"


# ---------------------------------------------------------------------- property-based fuzz


KEYS = ["kind", "name", "model", "device", "dtype", "data", "source", "method", "bits", "group_size", "sparsity",
        "perplexity", "seq_len", "max_windows", "tasks", "calibration", "teacher", "adapter", "prompts", "nm",
        "max_steps", "learning_rate", "r", "save_format", "num_experts", "top_k", "strict", "allow_pickle", "data_dir"]
KINDS = ["load", "eval", "quantize", "prune", "finetune", "distill", "export", "generate", "bench", "report", "moefy", "nope"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["smollm2", "builtin:corpus", "builtin:calib", "builtin:nope", "cpu", "cuda", "npu", "auto",
                     "gptq", "rtn", "wanda", "2:4", "a/b", "x.jsonl", "../x", "[red]", "{{ x }}", "~", "", "base",
                     "hub:x/y", "hf:wikitext:test", "arc_easy", "float32"]),
    st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=8)
stages = st.one_of(
    st.fixed_dictionaries({"kind": st.sampled_from(KINDS)}, optional={k: values for k in KEYS[1:12]}),
    values,
)
VALID_STAGES = [
    {"kind": "load", "model": "smollm2", "device": "cpu"},
    {"kind": "eval", "perplexity": {"data": "builtin:corpus", "seq_len": 64}},
    {"kind": "quantize", "method": "rtn", "bits": 4, "group_size": 32},
    {"kind": "prune", "method": "magnitude", "sparsity": 0.5},
    {"kind": "finetune", "method": "lora", "data": "builtin:industry-qa", "max_steps": 2},
    {"kind": "generate", "prompts": ["hi"]},
    {"kind": "report"},
]


@st.composite
def nearly_valid_recipes(draw):
    """A valid recipe with at most two keys changed, dropped or added: near the edge of validity."""
    stages_ = [dict(VALID_STAGES[0])] + [dict(s) for s in draw(st.lists(st.sampled_from(VALID_STAGES[1:]), max_size=4))]
    for _ in range(draw(st.integers(0, 2))):
        stage = stages_[draw(st.integers(0, len(stages_) - 1))]
        key = draw(st.sampled_from(sorted(set(KEYS) | set(stage))))
        if key in stage and draw(st.booleans()):
            del stage[key]
        else:
            stage[key] = draw(values)
    return {"name": "fuzz", "stages": stages_}


recipes = st.one_of(
    nearly_valid_recipes(),
    st.fixed_dictionaries({"stages": st.lists(stages, max_size=4)},
                          optional={"name": scalars, "seed": scalars, "description": scalars, "bogus": values}),
    values,
)


def _mutate(text: str, data) -> str:
    """Sometimes damage the YAML text: drop, repeat or insert a character."""
    if not text or not data.draw(st.booleans()):
        return text
    i = data.draw(st.integers(0, len(text) - 1))
    op = data.draw(st.sampled_from(["drop", "dup", "insert"]))
    if op == "drop":
        return text[:i] + text[i + 1:]
    if op == "dup":
        return text[:i] + text[i] * 2 + text[i:]
    return text[:i] + data.draw(st.sampled_from([":", "-", "[", "{", "'", '"', "\t", "\n  ", "&a ", "*a", "!!python/object:os.system ", "\xff"])) + text[i:]


def _never_a_traceback(r) -> None:
    assert r.exit_code in (0, 2), (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(recipe=recipes, data=st.data())
def test_fuzz_recipe_validate_exits_0_or_2(recipe, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    text = _mutate(yaml.safe_dump(recipe, allow_unicode=True), data)
    path = folder / "r.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if "\xff" not in text else text.encode("latin-1", "replace"))
    _never_a_traceback(run_cli(["validate", str(path)]))


template_parts = st.sampled_from([
    "{{ query }}", "{{ quer }}", "{{", "}}", "{%", "%}", "{% if query %}", "{% endif %}", "{% for c in choices %}",
    "{% endfor %}", "{{ c }}", "|upper", "|attr('__class__')", ".__class__", "['__globals__']", "cycler", "joiner",
    "namespace()", "lipsum", "range(10)", "* 99999999", "** 99", "1/0", "'a' + 1", "choices[5]", "gold.x",
    "\n", "Answer:", " ", "query|regex_sub('(', '')", "(", ")", "~", "'",
])
tasks = st.fixed_dictionaries(
    {"task": st.text(min_size=1, max_size=8), "kind": st.sampled_from(["multiple_choice", "loglikelihood", "rolling", "x"]),
     "metrics": st.lists(st.sampled_from(["acc", "acc_norm", "exact_match", "bogus"]), max_size=2),
     "headline": st.sampled_from(["acc", "acc_norm", "bogus"])},
    optional={"doc_to_text": st.lists(template_parts, max_size=6).map("".join), "description": st.lists(template_parts, max_size=3).map("".join),
              "local": st.fixed_dictionaries({"path": st.sampled_from(["mc.jsonl", "nope.jsonl"])},
                                             optional={"fields": st.dictionaries(st.sampled_from(["query", "gold", "choices"]),
                                                                                 st.lists(template_parts, max_size=3).map("".join), max_size=2)}),
              "bogus": values},
)


nearly_valid_tasks = st.fixed_dictionaries(
    {"task": st.just("fuzz"), "kind": st.just("multiple_choice"), "metrics": st.just(["acc"]), "headline": st.just("acc"),
     "local": st.fixed_dictionaries({"path": st.just("mc.jsonl")}, optional={"fields": st.dictionaries(
         st.sampled_from(["query", "gold"]), st.lists(template_parts, min_size=1, max_size=3).map("".join), max_size=1)}),
     "doc_to_text": st.lists(template_parts, max_size=5).map("".join)},
    optional={"description": st.lists(template_parts, max_size=2).map("".join)},
)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(task=st.one_of(nearly_valid_tasks, tasks, values), data=st.data())
def test_fuzz_task_files_exit_0_or_2(task, data, tmp_path_factory):
    """A task file that loads cleanly goes on to the (missing) model and stops there with exit 2."""
    folder = tmp_path_factory.mktemp("fuzz-task", numbered=True)
    path = folder / "task.yaml"
    path.write_text(_mutate(yaml.safe_dump(task, allow_unicode=True), data).replace("\xff", "?"), encoding="utf-8")
    _never_a_traceback(run_cli(["eval", "tasks", str(path), "-m", str(folder / "no-model"), "--device", "cpu"]))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(template=st.lists(template_parts, max_size=8).map("".join))
def test_fuzz_rendering_returns_text_or_a_task_error(template):
    """Whatever a task template does, rendering gives a string or a TaskError, never another exception."""
    from qingzhou.errors import TaskError
    from qingzhou.eval.tasks.templating import check_template, render

    doc = {"query": "2 + 2 =", "choices": ["3", "4"], "gold": 1}
    try:
        check_template(template)
        assert isinstance(render(template, doc), str)
    except TaskError:
        pass


def test_markup_in_a_path_prints_as_text(paths, tmp_path, monkeypatch):
    """A successful command's tables show user paths literally (`[red]` is no style, `[/b]` no crash)."""
    monkeypatch.chdir(tmp_path)
    r = run_cli(["quantize", paths["tiny"], "[red]q[/b]", "--method", "rtn", "--group-size", "32"])
    assert r.exit_code == 0, r.output
    assert "│ [red]q[/b] " in r.stdout and (tmp_path / "[red]q[/b]" / "config.json").is_file()


def test_every_flag_a_message_names_exists():
    """Hints must not advertise flags no command has (they once named --allow-pickle and
    --trust-remote-code before any command took them)."""
    from typer.main import get_command

    flags: set[str] = set()

    def walk(command) -> None:
        for param in getattr(command, "params", []):
            flags.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(get_command(app))
    assert {"--allow-pickle", "--trust-remote-code", "--no-strict"} <= flags
    package = Path(__file__).resolve().parents[1] / "qingzhou"
    external = {"--no-deps", "--upgrade", "--machine"}  # pip's, in install hints; accelerate launch's --machine_rank
    named = {(m.group(1), f.name) for f in package.rglob("*.py")
             for m in re.finditer(r"['\"(\s](--[a-z][a-z0-9-]*)", f.read_text(encoding="utf-8"))}
    assert sorted((flag, f) for flag, f in named if flag not in flags | external) == []
