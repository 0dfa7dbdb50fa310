"""Recipe parsing and validation: shipped recipes, typos, bad YAML, overrides, torch-free checks."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qingzhou.errors import RecipeError
from qingzhou.recipes.schema import builtin_recipes, load_recipe


def write(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


GOOD = """
name: t
stages:
  - kind: load
    model: smollm2
  - kind: eval
    perplexity:
      data: builtin:corpus
      seq_len: 128
"""


def _inputs_here(name: str) -> bool:
    """Check a shipped recipe's inputs too, unless it reads the shared data folder (../shared/data
    from the repository root, as in CI) and that folder is not there."""
    from qingzhou.recipes.schema import find_recipe

    from conftest import SHARED_DATA

    return SHARED_DATA.is_dir() or "../shared/data" not in find_recipe(name).read_text()


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name, check_inputs=_inputs_here(name))
    # every recipe starts from a model, or (pretraining from scratch) from raw text
    assert recipe.stages and recipe.stages[0].kind in {"load", "preprocess"}


def test_typo_key_names_file_line_path_and_closest_key(tmp_path):
    path = write(tmp_path, GOOD.replace("seq_len: 128", "seq_lenn: 128"))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert f"{path}:8" in msg and "stages.1.perplexity.seq_lenn" in msg and "did you mean 'seq_len'" in msg


def test_typo_stage_key_and_kind(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml:4: stages.0.modle.*did you mean 'model'"):
        load_recipe(write(tmp_path, GOOD.replace("model: smollm2", "modle: smollm2")))
    with pytest.raises(RecipeError, match=r"r.yaml:5: stages.1.kind.*unknown stage kind 'evl'.*Did you mean 'eval'"):
        load_recipe(write(tmp_path, GOOD.replace("kind: eval", "kind: evl")))
    with pytest.raises(RecipeError, match=r"stages.1.perplexity.seq_len.*greater than 1"):
        load_recipe(write(tmp_path, GOOD.replace("seq_len: 128", "seq_len: 0")))


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, GOOD.replace("    model: smollm2", "    model: [smollm2"))
    with pytest.raises(RecipeError, match=r"r.yaml:\d+:\d+: malformed YAML"):
        load_recipe(path)


def test_missing_recipe_file_and_unknown_builtin(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="Did you mean 'quickstart'"):
        load_recipe("quikstart")


def test_overrides_set_values_and_unknown_keys_fail(tmp_path):
    path = write(tmp_path, GOOD)
    r = load_recipe(path, ["stages.1.perplexity.seq_len=64", "seed=3", "stages.0.dtype=float32"])
    assert r.stages[1].perplexity.seq_len == 64 and r.seed == 3 and r.stages[0].dtype == "float32"
    with pytest.raises(RecipeError, match="stages.1.perplexity.seqlen.*did you mean 'seq_len'"):
        load_recipe(path, ["stages.1.perplexity.seqlen=64"])
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(path, ["stages.5.seq_len=1"])
    with pytest.raises(RecipeError, match="Expected KEY.PATH=VALUE"):
        load_recipe(path, ["seed"])


def test_validation_does_not_import_torch():
    code = "import sys; from qingzhou.recipes.schema import load_recipe; load_recipe('quickstart'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_resolved_recipe_round_trips(tmp_path, name):
    r = load_recipe(name, check_inputs=_inputs_here(name))
    again = load_recipe(write(tmp_path, r.to_yaml()), check_inputs=_inputs_here(name))
    assert again.to_dict() == r.to_dict()


def test_method_settings_survive_the_resolved_recipe(tmp_path):
    text = GOOD + "  - kind: prune\n    method: sparsegpt\n    nm: '2:4'\n  - kind: quantize\n    method: rtn\n    bits: 3\n"
    r = load_recipe(write(tmp_path, text))
    again = load_recipe(write(tmp_path, r.to_yaml(), "resolved.yaml"))
    prune, quant = again.stages[2], again.stages[3]
    assert prune.settings.method == "sparsegpt" and prune.settings.nm == "2:4"
    assert quant.settings.method == "rtn" and quant.settings.bits == 3
    assert "settings" not in r.to_dict()["stages"][2]


def test_every_builtin_recipe_training_data_resolves_and_tokenizes():
    """The data of each shipped recipe's training/distillation stage loads and tokenizes (a
    recipe once named `builtin:calib`, which only the calibration loader knew, and failed after
    25 minutes of pruning and evaluation)."""
    from qingzhou.data.prepare import DataConfig, prepare_data
    from qingzhou.finetune.testing import byte_tokenizer
    from qingzhou.recipes.schema import builtin_recipes, load_recipe

    tok, checked = byte_tokenizer(), []
    for name in builtin_recipes():
        for stage in load_recipe(name, check_inputs=_inputs_here(name)).stages:
            data = getattr(stage, "data", None)
            if isinstance(data, DataConfig) and not data.source.startswith(("hub:", "/")):
                prepared = prepare_data(data, tok)
                assert len(prepared.train) > 0, (name, data.source)
                checked.append(name)
    assert {"compress_chain", "prune_structured25_distill", "quickstart"} <= set(checked)


def test_missing_inputs_fail_at_validation_naming_stage_key_and_line(tmp_path):
    """Every file a recipe names is checked before any model loads (and before torch is imported):
    a missing data file of the third stage is reported at its key, not after two stages ran."""
    recipe = write(tmp_path, GOOD + "  - kind: finetune\n    method: lora\n    data:\n      source: data/missing.jsonl\n")
    code = ("import sys\nfrom qingzhou.errors import RecipeError\nfrom qingzhou.recipes.schema import load_recipe\n"
            f"try:\n    load_recipe({str(recipe)!r})\nexcept RecipeError as e:\n    print(e)\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[-1] == "False"
    assert "r.yaml:12: stages.2.data.source (finetune stage): data file not found: data/missing.jsonl" in out[0]
    assert load_recipe(recipe, check_inputs=False).stages[2].kind == "finetune"  # the schema itself is fine


def test_non_utf8_recipe_names_the_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.lstrip().replace("seq_len: 128", "seq_len: 128  # d\xe9j\xe0 vu").encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1.yaml:8: the file is not UTF-8 text \(byte 0xe9 at line 8, column 24\)"):
        load_recipe(path)
