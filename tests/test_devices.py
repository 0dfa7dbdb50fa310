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
    installed = devices.bitsandbytes_version()
    assert info["capabilities"]["bitsandbytes"] is (installed is not None and installed >= (0, 46))


@pytest.mark.parametrize("version,cpu_ok,cuda_ok", [(None, False, False), ((0, 45, 5), False, True), ((0, 46, 0), True, True), ((0, 50, 2), True, True)])
def test_bitsandbytes_needs_the_multi_backend_release_on_cpu(only, monkeypatch, version, cpu_ok, cuda_ok):
    """bitsandbytes < 0.46 is CUDA-only; from 0.46 its CPU backend runs; never on NPU/MLU/MUSA."""
    only("cuda", "npu")
    monkeypatch.setattr(devices, "bitsandbytes_version", lambda: version)
    assert devices.capabilities("cpu").bitsandbytes is cpu_ok
    assert devices.capabilities("cuda").bitsandbytes is cuda_ok
    assert devices.capabilities("npu").bitsandbytes is False
    if cpu_ok:
        devices.require("bitsandbytes", "cpu")
    else:
        with pytest.raises(DeviceError, match="bitsandbytes is not supported on device 'cpu'") as e:
            devices.require("bitsandbytes", "cpu")
        assert ("not installed" if version is None else "needs >= 0.46") in e.value.hint
    with pytest.raises(DeviceError, match="'npu'") as e:
        devices.require("bitsandbytes", "npu")
    assert "cuda, cpu" in e.value.hint


def test_bitsandbytes_version_reads_package_metadata():
    from importlib.metadata import PackageNotFoundError, version

    try:
        expected = tuple(int(p) for p in version("bitsandbytes").split("+")[0].split(".")[:3])
    except PackageNotFoundError:
        expected = None
    assert devices.bitsandbytes_version() == expected
