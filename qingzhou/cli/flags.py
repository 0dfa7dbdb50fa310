"""Method settings from command-line flags: only the flags a user gave are passed on (the method's
config supplies every default, so a command never repeats, or contradicts, a config default), and
the whole config is validated before any model loads, with errors naming the flags."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def given(**flags: Any) -> dict[str, Any]:
    """The flags that were set (not None; empty lists and dicts count as unset)."""
    return {k: v for k, v in flags.items() if v is not None and v != [] and v != {}}


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
