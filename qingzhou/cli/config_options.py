"""CLI flags generated from a pydantic config, so a default lives in one place (the config).

`@config_options(QuantizeConfig, exclude={"overrides"})` adds one `--flag` per simple field of the
config to a Typer command (as LitGPT's CLI derives its flags from the config signature). Every
generated flag defaults to "not given"; the command receives only the flags the user set, in a
`settings` dict, and the method's own config fills in the rest, so the command's help text
shows the config's defaults and descriptions and can never disagree with the Python API.
Fields a flag cannot express (nested models, lists of models) stay reachable through
`-s key=value` / `--set key=value`.
"""
from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, Optional

import typer
from pydantic import BaseModel

SCALARS = (int, float, str, bool)


def _flag_type(annotation: Any) -> tuple[type | None, bool, tuple[str, ...]]:
    """(scalar type, is a list, choices) for annotations a flag can carry, else (None, False, ())."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else (None, False, ())
    if origin is Literal:
        values = typing.get_args(annotation)
        kinds = {type(v) for v in values}
        return (kinds.pop(), False, tuple(str(v) for v in values)) if len(kinds) == 1 else (None, False, ())
    if origin is list:
        (item,) = typing.get_args(annotation) or (None,)
        return (item, True, ()) if item in SCALARS else (None, False, ())
    return (annotation, False, ()) if annotation in SCALARS else (None, False, ())


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "none" if value in ([], {}) else str(value)
    return "none" if field.default is None else str(field.default).lower() if isinstance(field.default, bool) \
        else str(field.default)


def _other_defaults(name: str, first: Any, configs: list[type[BaseModel]]) -> str:
    """'; ia3: 0.003, full: 2e-05' where a method's own config changes the default of `name`."""
    shown = _default_text(first)
    others = []
    for config in configs:
        field = config.model_fields.get(name)
        method = config.model_fields.get("method")
        if field is not None and method is not None and isinstance(method.default, str) \
                and _default_text(field) != shown:
            others.append(f"{method.default}: {_default_text(field)}")
    return "; " + ", ".join(others) if others else ""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def flag_parameters(configs: Iterable[type[BaseModel]], exclude: Iterable[str] = (),
                    names: dict[str, str | tuple[str, ...]] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter (a Typer option defaulting to None) per flag-able field of the
    `configs` (a field several configs share gets one flag, described by the first). `names`
    overrides a flag's spelling (`{"sym": "--sym/--asym"}`)."""
    params = []
    seen = set(exclude)
    configs = list(configs)
    fields = [(n, f) for config in configs for n, f in config.model_fields.items()]
    for name, field in fields:
        if name in seen:
            continue
        seen.add(name)
        scalar, is_list, choices = _flag_type(field.annotation)
        if scalar is None:
            continue
        flag = flag_name(name)
        help_text = (field.description or "").rstrip(".")
        if choices:
            help_text = f"{' | '.join(choices)}" + (f": {help_text}" if help_text else "")
            scalar = str
        help_text += f" (default: {_default_text(field)}{_other_defaults(name, field, configs)})"
        if names and name in names:
            decls = (names[name],) if isinstance(names[name], str) else tuple(names[name])
        elif scalar is bool:
            decls = (f"{flag}/--no-{name.replace('_', '-')}",)
        else:
            decls = (flag,)
        annotation = Optional[list[scalar]] if is_list else Optional[scalar]  # type: ignore[valid-type]
        option = typer.Option(None, *decls, help=help_text.strip(), show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def config_options(*configs: type[BaseModel], exclude: Iterable[str] = (),
                   names: dict[str, str | tuple[str, ...]] | None = None,
                   target: str = "settings") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a Typer command `fn(..., settings: dict)`: adds the configs' flags and passes
    the ones the user gave as `settings` (field name -> value). Stack it with another `target`
    (`data_settings`) to fill a second config from its own flags."""
    exclude = set(exclude)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != target]
        taken = {p.name for p in own}
        extra = flag_parameters(configs, exclude | taken, names)

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            settings = {p.name: kwargs.pop(p.name) for p in extra}
            settings = {k: v for k, v in settings.items() if v is not None and v != []}
            return fn(*args, **{target: settings}, **kwargs)

        command.__signature__ = signature.replace(parameters=own + extra)  # type: ignore[attr-defined]
        command.__annotations__ = {**{p.name: p.annotation for p in own}, **{p.name: p.annotation for p in extra}}
        return command

    return decorate


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """`-s key=value` pairs (dotted keys nest: calibration.num_samples=16), values read as YAML."""
    from qingzhou import yamlfile
    from qingzhou.errors import RecipeError

    out: dict[str, Any] = {}
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"bad --set '{item}'.", hint="Expected KEY=VALUE, e.g. --set dropout=0.1.")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yamlfile.scalar(raw)
    return out


def calibration_help() -> dict[str, str]:
    """Help texts of the --calibration / --num-samples / --seq-len flags, defaults read from
    `CalibrationConfig` (those three flags map into the nested `calibration:` block)."""
    from qingzhou.data.calibration import CalibrationConfig

    f = CalibrationConfig.model_fields
    return {"calibration": f"builtin:NAME or a .jsonl/.json/.txt (default: {f['source'].default})",
            "num_samples": f"calibration samples (default: {f['num_samples'].default})",
            "seq_len": f"tokens per calibration sample (default: {f['seq_len'].default})"}


def method_config(registry: Any, method: str, flags: dict[str, Any], calibration: dict[str, Any],
                  *, names: dict[str, str] | None = None, where: str) -> Any:
    """The validated config of `method` from the flags a user gave (generated flags, `-s` pairs and
    the three calibration flags, kept only when the method calibrates): every bad setting, and a
    missing calibration file, fails here, before any model loads, naming the flag."""
    cfg = {"method": method, **flags}
    calibration = {k: v for k, v in calibration.items() if v is not None}
    if calibration and "calibration" in registry.get(method, where="--method").config.model_fields:
        cfg["calibration"] = {**calibration, **cfg.get("calibration", {})}
    flag_names = {**{k: flag_name(k) for k in cfg}, **CALIBRATION_FLAGS, **(names or {})}
    return validate_flags(registry.validate, cfg, flag_names, f"{where} --method {method}")


def validate_flags(parse: Callable[[dict[str, Any]], Any], cfg: dict[str, Any], flag_names: dict[str, str],
                   where: str) -> Any:
    """`parse(cfg)` (a method registry's parse_config) with pydantic errors turned into one
    RecipeError that names the offending flags (`flag_names`: config key path -> flag), and the
    calibration source, if the config has one, resolved: a missing file fails before the model
    loads, not after."""
    from pydantic import ValidationError

    from qingzhou.errors import RecipeError

    try:
        settings = parse(cfg)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(map(str, err["loc"]))
            if err["type"] == "extra_forbidden":
                problems.append(f"{flag_names.get(key, key)} does not apply to --method {cfg.get('method')}")
                continue
            msg = err["msg"].removeprefix("Value error, ")
            if not key:  # a rule across settings (e.g. top_k <= num_experts): the message names them
                problems.append(msg)
                continue
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            problems.append(f"{flag_names.get(key, key)}: {msg}{got}")
        raise RecipeError("; ".join(problems) + ".", where=where) from None
    calibration = getattr(settings, "calibration", None)
    if calibration is not None:
        from qingzhou.data.calibration import resolve_source
        from qingzhou.errors import QingzhouError

        try:
            resolve_source(calibration.source)
        except QingzhouError as e:
            raise type(e)(e.message, where=flag_names.get("calibration.source", e.where), hint=e.hint) from None
    return settings


CALIBRATION_FLAGS = {"calibration.source": "--calibration", "calibration.num_samples": "--num-samples",
                     "calibration.seq_len": "--seq-len"}
