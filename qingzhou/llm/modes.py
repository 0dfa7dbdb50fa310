"""Train/eval mode as a context: measuring a model must not depend on (or change) its mode."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Switch off dropout for the block, then restore every submodule's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
