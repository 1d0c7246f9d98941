"""sam-peft's native adapters reproduce the `adapters` library's (1.3.0) stored outputs and gradients.

tests/golden/adapter_golden.safetensors (written by tests/golden/make_adapter_golden.py, with
transformers 4.57.6 and adapters 1.3.0) holds tiny BERT and RoBERTa encoders' weights, inputs, and
for Pfeiffer and Houlsby the adapter weights and the library's last hidden state and gradients
(w.r.t. the input embeddings and every adapter parameter), in eval mode and in train mode with
dropout. Here a plain Hugging Face encoder is rebuilt from the stored weights, wrapped with the
native adapters, given the stored adapter weights and checked against those numbers: in every
environment, including those without the library (transformers 5.x).

Tolerances: the library runs its own copy of the attention code, and transformers 5.x its own, so
results may differ from the stored ones by float32 round-off; RTOL / ATOL allow that and no more
(values are O(1) to O(100)). Measured with torch 2.13.0 and both transformers 4.57.6 and 5.24.0:
bit-identical in 15 of the 16 cases, and at most 9.3e-10 apart in bert-houlsby-train.
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
RTOL, ATOL = 1e-6, 1e-7


def golden() -> tuple[dict, dict]:
    with safe_open(str(GOLDEN), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["spec"])


def section(tensors: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("config", list(LIBRARY_CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_native_adapters_reproduce_the_library_s_stored_results(family, config, train):
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

    mode = "train" if train else "eval"
    ref = section(tensors, f"{family}-{config}/{mode}/")
    got = forward_backward(encoder, section(tensors, f"inputs/{family}/"), train, adapter)
    assert set(got) == set(ref)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
