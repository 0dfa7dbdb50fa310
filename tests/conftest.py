"""Shared fixtures: offline mode, few threads, tiny random models saved as HF folders, SmolLM2."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels (llm/quantized/triton_gemv.py) run in Triton's CPU interpreter here: it must be on
# before triton is first imported (tests/test_triton_gemv.py). TRITON_INTERPRET=0 on a GPU machine.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


def pytest_configure(config):
    import signal

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: the
    # tests that stop a run with SIGINT need Ctrl-C to raise KeyboardInterrupt as it does for users.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Llama and Qwen2 models with a byte tokenizer (chat template included), saved
    as plain HF folders with qingzhou's own save_model."""
    from qingzhou.finetune.testing import byte_tokenizer, tiny_model
    from qingzhou.llm import save_model

    out = {}
    for arch in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        save_model(tiny_model(arch), byte_tokenizer(), folder / "model")
        out[arch] = folder / "model"
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF), loaded once per test session in fp32 on CPU."""
    from qingzhou.llm import load_model

    return load_model("smollm2", dtype="float32", device="cpu")


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread, above all on a shared 2-core machine (opt in per file:
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DISTILL_WORDS = "the river boat carries rice and salt past the old stone bridge at dawn while herons fish".split()
DISTILL_ROWS = [{"text": f"day {i}: " + " ".join(DISTILL_WORDS[(i * 3 + j * 7) % len(DISTILL_WORDS)] for j in range(12 + i % 9))}
                for i in range(44)]


@pytest.fixture(scope="module")
def distill_data():
    """(byte tokenizer, 44 short text rows prepared with 10% held out): the distillation tests' data."""
    from qingzhou.data import DataConfig, prepare_data
    from qingzhou.finetune.testing import byte_tokenizer

    tok = byte_tokenizer()
    return tok, prepare_data(DataConfig(source="<records>", format="text", max_length=96, eval_fraction=0.1,
                                        cache=False), tok, records=DISTILL_ROWS)
