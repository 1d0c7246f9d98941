"""train.precision: what `auto`, `fp32` and `bf16` resolve to on a CPU, the native-bf16 probe, and
how `auto` enters a run id."""

import warnings

import pytest
import torch

from sam_peft import device as device_lib
from sam_peft.device import cpu_has_native_bf16
from sam_peft.loader import build_config
from util import tiny_run

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
    monkeypatch.setattr(device_lib, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    cfg = build_config(tiny_run("rte", "sam", train={"precision": precision}, data_dir="data"))
    return device_lib.autocast_dtype(cfg.train.precision, torch.device("cpu"))


def test_auto_is_bf16_on_a_cpu_with_native_bf16_and_fp32_on_others(monkeypatch):
    # bf16 left the stand-in's means over seeds unchanged on an AMX CPU (docs/results.md, "bf16 on a CPU").
    assert _dtype("auto", True, monkeypatch) is torch.bfloat16
    assert _dtype("auto", False, monkeypatch) is None
    for native in (False, True):
        assert _dtype("fp32", native, monkeypatch) is None


@pytest.mark.parametrize("native", [False, True])
def test_an_auto_run_s_id_says_what_it_computes(native, monkeypatch):
    from sam_peft.identity import run_id

    monkeypatch.setattr(device_lib, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = tiny_run("cb", "full")
    ids = {p: run_id(build_config(base, [f"train.precision={p}"])) for p in ("auto", "fp32", "bf16")}
    assert ids["fp32"] != ids["bf16"]
    if native:  # auto computes what bf16 does here: one id, never taken for an fp32 run
        assert ids["auto"] == ids["bf16"]
    else:  # auto is fp32 here, and keeps the id it had before auto chose bf16 anywhere
        assert ids["auto"] not in (ids["fp32"], ids["bf16"])
    # A run meant for a GPU is not hashed by this machine's CPU.
    on_gpu = run_id(build_config(base, ["train.precision=auto", "device=cuda"]))
    assert on_gpu != ids["bf16"]
    # The device never enters the id by itself: explicit precisions hash the same everywhere.
    assert run_id(build_config(base, ["train.precision=fp32", "device=cuda"])) == ids["fp32"]


def test_bf16_on_a_cpu_is_taken_as_asked_and_warned_about_where_emulated(monkeypatch):
    with pytest.warns(UserWarning, match="emulated"):
        assert _dtype("bf16", False, monkeypatch) is torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dtype("bf16", True, monkeypatch) is torch.bfloat16


def test_a_run_records_its_precision_and_is_evaluated_in_it_on_any_cpu(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from sam_peft.run import evaluate_run, run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_run("cb", "full", tmp_path, {"max_steps": 6, "eval_every": 3, "min_steps": 0, "max_seq_len": 32,
                                            "lr": 5e-3, "precision": "auto"}, device="cpu")
    results = {}
    for native in (True, False):
        monkeypatch.setattr(device_lib, "cpu_has_native_bf16", lambda cpuinfo=None: native)
        results[native] = run(build_config(cfg), progress=False, log=lambda *a: None)
    assert results[True]["precision"] == "bf16" and results[False]["precision"] == "fp32"
    assert results[True]["run_id"] != results[False]["run_id"]
    deltas = [load_file(str(tmp_path / results[native]["run_id"] / "delta.safetensors")) for native in (True, False)]
    assert any(not torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])  # bf16 did compute

    # The bf16 run evaluated on a CPU where `auto` means fp32 (and the other way round): the
    # numbers it recorded, to the last bit, because evaluation follows result.json's precision.
    for native in (True, False):
        monkeypatch.setattr(device_lib, "cpu_has_native_bf16", lambda cpuinfo=None: not native)
        # the bf16 run, on a CPU that only emulates bf16, warns that it is slow there
        with pytest.warns(UserWarning, match="emulated") if native else warnings.catch_warnings():
            metrics, _ = evaluate_run(tmp_path / results[native]["run_id"])
        assert metrics == results[native]["metrics"]["test"]
