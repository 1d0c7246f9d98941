"""sam-peft's native adapters reproduce the `adapters` library's (1.3.0) stored outputs and gradients.

tests/golden/adapter_golden.safetensors (written by tests/golden/make_adapter_golden.py, with
transformers 4.57.6 and adapters 1.3.0) holds tiny BERT and RoBERTa encoders' weights, inputs, and
for Pfeiffer and Houlsby the adapter weights and the library's last hidden state and gradients
(w.r.t. the input embeddings and every adapter parameter), in eval mode and in train mode with
dropout. Here a plain Hugging Face encoder is rebuilt from the stored weights, wrapped with the
native adapters, given the stored adapter weights and checked against those numbers: in every
environment, including those without the library (transformers 5.x).

Tolerance: the library runs its own copy of the attention code, transformers 5.x its own, and
CPUs differ in their float32 kernels (vector width, fused multiply-add, summation order), so the
numbers may differ from the stored ones by round-off. Gradients span 1e-3 to 1e2 within one
tensor, so an elementwise tolerance is either too loose for the large entries or too tight for the
small ones; the check is instead per tensor, relative to its largest entry:
max |got - stored| <= SCALED_TOL * max |stored|. Measured with torch 2.13.0 (transformers 4.57.6):
at most 6.4e-7 on a 2-core Intel Xeon with AVX512/AMX (2026-12-01), a few float32 epsilons; on an
AMD EPYC bit-identical in 15 of 16 cases. The last test shows the tolerance still catches a
0.1% error in one adapter matrix.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapter_reference import (
    FAMILIES,
    LIBRARY_CONFIGS,
    build_base,
    forward_backward,
    native_adapter_params,
    native_wrap,
)

GOLDEN = Path(__file__).resolve().parent / "golden" / "adapter_golden.safetensors"
SCALED_TOL = 1e-5


def golden() -> tuple[dict, dict]:
    with safe_open(str(GOLDEN), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["spec"])


def section(tensors: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def native_results(family: str, config: str, train: bool, scale_up: float = 1.0) -> tuple[dict, dict]:
    """The native adapters' outputs and gradients on the stored case, and the library's stored ones.

    scale_up multiplies layer 0's first up-projection, to show that the check catches an error.
    """
    tensors, spec = golden()
    assert spec["versions"]["adapters"] == "1.3.0"
    encoder = build_base(family, spec["configs"][family], seed=123)  # the architecture; weights follow
    base = section(tensors, f"base/{family}/")
    params = dict(encoder.named_parameters())
    assert set(base) == set(params)
    with torch.no_grad():
        for name, value in base.items():
            params[name].copy_(value)
    native_wrap(encoder, config, seed=0, reduction=spec["reduction"])
    adapter = native_adapter_params(encoder)
    stored = section(tensors, f"{family}-{config}/adapter/")
    assert set(adapter) == set(stored) and len(stored) == 4 * (1 if config == "pfeiffer" else 2) * 2
    with torch.no_grad():
        for name, value in stored.items():
            adapter[name].copy_(value)
        first_up = sorted(n for n in adapter if n.startswith("encoder.layer.0.") and n.endswith("up.weight"))[0]
        adapter[first_up].mul_(scale_up)

    mode = "train" if train else "eval"
    ref = section(tensors, f"{family}-{config}/{mode}/")
    got = forward_backward(encoder, section(tensors, f"inputs/{family}/"), train, adapter)
    assert set(got) == set(ref)
    return got, ref


def scaled_errors(got: dict, ref: dict) -> dict:
    """Per tensor: max |got - ref| / max |ref|."""
    return {key: ((got[key] - ref[key]).abs().max() / ref[key].abs().max()).item() for key in ref}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("config", list(LIBRARY_CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_native_adapters_reproduce_the_library_s_stored_results(family, config, train):
    got, ref = native_results(family, config, train)
    assert all(ref[key].abs().max() > 0 for key in ref)
    errors = scaled_errors(got, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= SCALED_TOL, f"{worst}: {errors[worst]:.2e} of its largest entry"


@pytest.mark.parametrize("config", list(LIBRARY_CONFIGS))
def test_the_tolerance_catches_a_tenth_of_a_percent_error_in_one_adapter_matrix(config):
    got, ref = native_results("bert", config, train=False, scale_up=1.001)
    assert max(scaled_errors(got, ref).values()) > 10 * SCALED_TOL
