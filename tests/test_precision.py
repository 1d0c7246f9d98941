"""train.precision: what `auto`, `fp32` and `bf16` resolve to on a CPU, and the native-bf16 probe."""

import warnings

import pytest
import torch

from sam_peft import engine
from sam_peft.config import build_config
from sam_peft.engine import cpu_has_native_bf16

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma vaes\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n"
COOPER_LAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert not cpu_has_native_bf16(ZEN3)
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert cpu_has_native_bf16(COOPER_LAKE)
    assert not cpu_has_native_bf16("")  # no flags line (not Linux-like): no
    # a flag name inside another word does not count
    assert not cpu_has_native_bf16("flags\t: avx512_bf16x fancy_amx_bf16\n")


def _dtype(precision: str, native: bool, monkeypatch) -> torch.dtype | None:
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    cfg = build_config({"task": "rte", "model": "tiny", "train": {"precision": precision}})
    return engine.autocast_dtype(cfg.train.precision, torch.device("cpu"))


@pytest.mark.parametrize("native", [False, True])
def test_auto_is_fp32_on_every_cpu(native, monkeypatch):
    # bf16 has not been shown to leave accuracy unchanged on a CPU, native or not (README).
    assert _dtype("auto", native, monkeypatch) is None
    assert _dtype("fp32", native, monkeypatch) is None


def test_bf16_on_a_cpu_is_taken_as_asked_and_warned_about_where_emulated(monkeypatch):
    with pytest.warns(UserWarning, match="emulated"):
        assert _dtype("bf16", False, monkeypatch) is torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dtype("bf16", True, monkeypatch) is torch.bfloat16
