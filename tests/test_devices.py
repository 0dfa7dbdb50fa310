"""The device layer, with accelerator availability simulated through accelerate's helpers."""
from __future__ import annotations

import accelerate.utils
import pytest
import torch

from qingzhou.errors import DeviceError
from qingzhou.llm import devices


@pytest.fixture
def only(monkeypatch):
    """Pretend exactly the given device types are present (the CPU always is)."""

    def set_available(*present: str):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: "cuda" in present)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
        for name in ("npu", "mlu", "musa", "xpu", "mps"):
            monkeypatch.setattr(accelerate.utils, f"is_{name}_available", (lambda n=name: (lambda *a, **k: n in present))())

    return set_available


@pytest.mark.parametrize("present,expected", [((), "cpu"), (("npu",), "npu"), (("mlu",), "mlu"), (("musa",), "musa"), (("xpu",), "xpu"), (("mps",), "mps"), (("cuda", "npu"), "cuda")])
def test_auto_picks_the_detected_accelerator(only, present, expected):
    only(*present)
    assert devices.resolve_device("auto") == expected
    assert devices.available_devices()[-1] == "cpu"


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("npu", torch.bfloat16), ("mlu", torch.bfloat16), ("cuda", torch.bfloat16), ("mps", torch.float16)])
def test_auto_dtype_follows_the_capability_table(only, device, dtype):
    only(device)
    assert devices.resolve_dtype("auto", devices.resolve_device(device)) == dtype


def test_unsupported_combinations_are_clear_errors(only):
    only("mps", "npu")
    with pytest.raises(DeviceError, match="bfloat16 is not supported on device 'mps'"):
        devices.resolve_dtype("bf16", "mps")
    with pytest.raises(DeviceError, match="float16 is not supported on device 'cpu'"):
        devices.resolve_dtype("float16", "cpu")
    with pytest.raises(DeviceError, match="bitsandbytes is not supported on device 'npu'"):
        devices.require("bitsandbytes", "npu")
    with pytest.raises(DeviceError, match="'cuda' was requested but is not available") as e:
        devices.resolve_device("cuda")
    assert "cpu" in str(e.value) and "npu" in str(e.value)
    with pytest.raises(DeviceError, match="Did you mean 'cuda'"):
        devices.resolve_device("cdua")
    with pytest.raises(DeviceError, match="unknown dtype"):
        devices.resolve_dtype("float8", "cpu")


def test_device_index_is_kept(only):
    only("npu")
    assert devices.resolve_device("npu:1") == "npu:1"
    with pytest.raises(DeviceError, match="bad device index"):
        devices.resolve_device("npu:x")


def test_env_info_reports_device_memory_versions():
    info = devices.env_info("cpu")
    assert info["device"] == "cpu"
    assert info["memory"]["total_gib"] > 0
    assert info["versions"]["torch"] == torch.__version__
    assert info["capabilities"]["bitsandbytes"] is False
