"""The `qingzhou` command: a thin Typer app over the public Python API.

Each command builds arguments from its flags and calls the same function a notebook would.
Extra commands live one per file in `qingzhou/cli/commands/` and register themselves.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from qingzhou._version import __version__
from qingzhou.cli.common import (STATE, AllowPickleOpt, MaxMemoryOpt, OffloadFolderOpt, StrictOpt, TrustRemoteCodeOpt, check_device, check_out_dir, err,
                                 guarded, kv_table, load_options, out, print_json, table)

app = typer.Typer(help="轻舟 qingzhou: pretrain, adapt, compress and measure LLMs on modest hardware.", no_args_is_help=True, add_completion=False)
recipes_app = typer.Typer(help="Built-in recipes: list, show, copy.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate a model.", no_args_is_help=True)
models_app = typer.Typer(help="Model aliases qingzhou knows.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(eval_app, name="eval")
app.add_typer(models_app, name="models")

ModelOpt = typer.Option("smollm2", "--model", "-m", help="alias, local HF folder, .gguf file or hub id")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda[:N] | npu | mlu | xpu | musa | mps")
DtypeOpt = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16")
JsonOpt = typer.Option(False, "--json", help="print a JSON object instead of tables")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qingzhou {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks for errors"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    STATE["debug"] = debug


# ------------------------------------------------------------------------------------------ run


@app.command()
@guarded
def run(
    recipe: str = typer.Argument(..., help="recipe YAML file or built-in recipe name"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/NAME-TIMESTAMP)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key: -s stages.1.perplexity.seq_len=256"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out: unchanged complete stages are "
                                                        "kept, an interrupted fine-tune continues from its checkpoint"),
    force: bool = typer.Option(False, "--force", help="start the run in --out over (only a folder qingzhou wrote)"),
    as_json: bool = JsonOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Run a recipe: every stage in order, artifacts and run.json in the run directory."""
    from qingzhou.recipes.runner import run_recipe

    check_out_dir(out_dir, "--out")
    result = run_recipe(recipe, out_dir, overrides=set_, resume=resume, progress=progress, overwrite=force)
    if as_json:
        print_json(result.to_dict())
        return
    rows = [{"stage": s["label"], "kind": s["kind"], "seconds": s["seconds"], "resumed": s["resumed"]} for s in result.stages]
    out.print(table(escape(f"run {result.status}: {result.run_dir}"), rows))
    report = result.run_dir / "report.md"
    if report.exists():
        out.print(f"report: {escape(str(report))}")


@app.command()
@guarded
def validate(
    recipe: str = typer.Argument(..., help="recipe YAML file or built-in recipe name"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key"),
) -> None:
    """Check a recipe (keys, values, stage kinds) without running it."""
    from qingzhou.recipes.schema import load_recipe

    r = load_recipe(recipe, set_)
    out.print(f"[green]ok[/]: {escape(str(r.source))} ({len(r.stages)} stages: {', '.join(s.kind for s in r.stages)})")


# -------------------------------------------------------------------------------------- recipes


@recipes_app.command("ls")
@guarded
def recipes_ls(as_json: bool = JsonOpt) -> None:
    """List the built-in recipes."""
    import yaml

    from qingzhou.recipes.schema import builtin_recipes

    rows = []
    for name, path in builtin_recipes().items():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        rows.append({"name": name, "stages": " > ".join(s.get("kind", "?") for s in data.get("stages", [])), "description": data.get("description", "")})
    print_json(rows) if as_json else out.print(table("built-in recipes", rows))


@recipes_app.command("show")
@guarded
def recipes_show(name: str) -> None:
    """Print a built-in recipe."""
    from qingzhou.recipes.schema import find_recipe

    typer.echo(find_recipe(name).read_text(encoding="utf-8"), nl=False)


@recipes_app.command("cp")
@guarded
def recipes_cp(name: str, dest: Path, force: bool = typer.Option(False, "--force", help="overwrite dest")) -> None:
    """Copy a built-in recipe to DEST to edit it."""
    from qingzhou.errors import RecipeError
    from qingzhou.recipes.schema import builtin_recipes, find_recipe

    src = find_recipe(name)
    if name not in builtin_recipes():
        raise RecipeError(f"'{name}' is not a built-in recipe.")
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise RecipeError(f"{dest} already exists.", hint="Pass --force to overwrite it.")
    if dest.is_dir():
        raise RecipeError(f"{dest} is a folder.", hint="Name a file to copy the recipe to.")
    from qingzhou.io import atomic_write_text

    atomic_write_text(dest, src.read_text(encoding="utf-8"))
    out.print(escape(f"copied {name} -> {dest}"))


# ---------------------------------------------------------------------------------- env, models


@app.command()
@guarded
def env(device: str = DeviceOpt, as_json: bool = JsonOpt) -> None:
    """Print the device, its memory and capabilities, and library versions."""
    from qingzhou.llm.devices import env_info

    info = env_info(device)
    if as_json:
        print_json(info)
        return
    versions = info.pop("versions")
    out.print(kv_table("environment", info))
    out.print(kv_table("versions", versions))


@models_app.command("ls")
@guarded
def models_ls(as_json: bool = JsonOpt) -> None:
    """List model aliases."""
    from qingzhou.llm.aliases import ALIASES

    rows = [{"alias": a.name, "description": a.meta["description"]} for a in ALIASES.entries()]
    print_json(rows) if as_json else out.print(table("model aliases", rows))


# ------------------------------------------------------------------------------------- generate


@app.command()
@guarded
def generate(
    prompt: str = typer.Argument(..., help="the prompt (the chat template is applied for chat models)"),
    model: str = ModelOpt,
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy"),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="apply the chat template (default: when the tokenizer has one)"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt (chat models)"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    seed: int = typer.Option(0, "--seed"),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="print tokens as they come"),
    allow_pickle: bool = AllowPickleOpt,
    trust_remote_code: bool = TrustRemoteCodeOpt,
    strict: bool = StrictOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_folder: Optional[str] = OffloadFolderOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Generate a reply to PROMPT with a model."""
    from qingzhou.llm import generate as generate_fn
    from qingzhou.llm import load_model

    check_device(device)
    m, tok = load_model(model, dtype=dtype, device=device, **load_options(allow_pickle, trust_remote_code, strict, max_memory, offload_folder))
    printer = (lambda s: out.print(s, end="", highlight=False, markup=False)) if stream and not as_json else None
    res = generate_fn(m, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, chat="auto" if chat is None else chat, system=system, seed=seed, stream=printer)
    if as_json:
        print_json(res.to_dict())
    elif printer:
        out.print()
        err.print(f"[dim]{res.new_tokens} tokens, {res.tokens_per_s:.1f} tok/s[/]")
    else:
        out.print(res.text, highlight=False, markup=False)


# ----------------------------------------------------------------------------------------- eval


@eval_app.command("ppl")
@guarded
def eval_ppl(
    data: str = typer.Argument(..., help="text file, builtin:corpus, or hf:DATASET:SPLIT"),
    model: str = ModelOpt,
    seq_len: int = typer.Option(2048, "--seq-len", min=2, help="window length in tokens"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="evaluate only the first N windows"),
    batch_size: int = typer.Option(1, "--batch-size", min=1),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    allow_pickle: bool = AllowPickleOpt,
    trust_remote_code: bool = TrustRemoteCodeOpt,
    strict: bool = StrictOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_folder: Optional[str] = OffloadFolderOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Perplexity of a model on a text: non-overlapping windows, token-level NLL."""
    from qingzhou.data.corpus import load_text
    from qingzhou.eval.perplexity import perplexity
    from qingzhou.llm import load_model

    check_device(device)
    text = load_text(data)
    m, tok = load_model(model, dtype=dtype, device=device, **load_options(allow_pickle, trust_remote_code, strict, max_memory, offload_folder))
    res = perplexity(m, tok, text, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, progress=not as_json)
    if as_json:
        print_json({"model": model, "data": data, **res.to_dict()})
    else:
        out.print(kv_table(f"perplexity of {model} on {data}", res.to_dict()))


# ------------------------------------------------------------------------------ plug-in commands


def _register_plugins() -> None:
    import qingzhou.cli.commands as pkg

    for info in pkgutil.iter_modules(pkg.__path__, prefix=pkg.__name__ + "."):
        module = importlib.import_module(info.name)
        if hasattr(module, "register"):
            module.register(app)
        if hasattr(module, "register_eval"):
            module.register_eval(eval_app)


_register_plugins()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
