"""What a running stage sees: its folder, the seed, and the current model as an artifact reference.

Stages pass models as *references* (a path or alias plus load options), not as live objects, so a
resumed run can rebuild the state from disk alone. The runner keeps the last loaded model in memory
so consecutive stages on the same model do not reload it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelRef:
    """Where the current model lives and how to load it (all `qingzhou.load_model` arguments)."""

    source: str
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    strict: bool = True
    max_memory: str | None = None  # a budget: layers that do not fit stream from disk (llm/bigload.py)
    offload_folder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRef:
        return cls(**d)


@dataclass
class ModelCache:
    """Holds at most one live (model, tokenizer) pair, keyed by its ModelRef."""

    ref: ModelRef | None = None
    model: Any = None
    tokenizer: Any = None

    def get(self, ref: ModelRef):
        if self.ref != ref or self.model is None:
            from qingzhou.llm import load_model

            self.clear()
            self.model, self.tokenizer = load_model(
                ref.source,
                dtype=ref.dtype,
                device=ref.device,
                trust_remote_code=ref.trust_remote_code,
                allow_pickle=ref.allow_pickle,
                strict=ref.strict,
                max_memory=ref.max_memory,
                offload_folder=ref.offload_folder,
            )
            self.ref = ref
        return self.model, self.tokenizer

    def put(self, ref: ModelRef, model: Any, tokenizer: Any) -> None:
        self.ref, self.model, self.tokenizer = ref, model, tokenizer

    def clear(self) -> None:
        self.ref = self.model = self.tokenizer = None


@dataclass
class StageContext:
    """Passed to every stage function.

    `work_dir` is a temp folder that becomes `final_dir` only once the stage has finished, so
    stages write artifacts into `work_dir` and refer to them by their `final_dir` path. A crash
    removes `work_dir`; what must survive one (training checkpoints) goes to `checkpoint_dir`,
    beside it, which the runner keeps until the stage has completed.
    """

    run_dir: Path
    work_dir: Path
    final_dir: Path
    index: int
    seed: int
    model_ref: ModelRef | None
    history: list[dict[str, Any]] = field(default_factory=list)
    cache: ModelCache = field(default_factory=ModelCache)
    new_model_ref: ModelRef | None = None
    checkpoint_dir: Path | None = None
    checkpoint_identity: dict[str, Any] = field(default_factory=dict)

    CHECKPOINT_OWNER = "owner.json"  # in checkpoint_dir: the inputs the checkpoints were made from

    def checkpoints(self) -> Path:
        """The folder for this stage's training checkpoints, created on first use with a record of
        the stage's inputs (the runner discards checkpoints made from other inputs)."""
        if self.checkpoint_dir is None:
            return self.work_dir / "checkpoints"
        owner = self.checkpoint_dir / self.CHECKPOINT_OWNER
        if not owner.is_file():
            from qingzhou.io import atomic_write_json

            atomic_write_json(owner, self.checkpoint_identity)
        return self.checkpoint_dir

    def get_model(self):
        """The current (model, tokenizer), loaded or taken from memory."""
        from qingzhou.errors import RecipeError

        if self.model_ref is None:
            raise RecipeError(
                "this stage needs a model but none is loaded yet.",
                where=f"stages.{self.index}",
                hint="Add a `kind: load` stage before it.",
            )
        return self.cache.get(self.model_ref)

    def set_model(self, ref: ModelRef, model: Any = None, tokenizer: Any = None) -> None:
        """Declare the model this stage produced; later stages start from it."""
        self.new_model_ref = ref
        if model is not None:
            self.cache.put(ref, model, tokenizer)

    def set_model_artifact(self, name: str, model: Any = None, tokenizer: Any = None) -> None:
        """Declare `work_dir / name` (a saved model) as the stage's model, keeping the current
        model's dtype and device, and keep the in-memory copy for the next stage."""
        ref = self.model_ref
        self.set_model(ModelRef(source=self.artifact_path(name), dtype=ref.dtype if ref else "auto",
                                device=ref.device if ref else "auto"), model, tokenizer)

    def artifact_path(self, name: str) -> str:
        """Final path of an artifact written at `work_dir / name`."""
        return str(self.final_dir / name)
