"""Write tests/golden/adapter_golden.safetensors: the `adapters` library's (1.3.0) bottleneck
adapters on tiny BERT and RoBERTa encoders, for tests/test_adapter_golden.py to check sam-peft's
native adapters against in environments without the library (e.g. transformers 5.x).

Run in the environment with transformers 4.57.6 and adapters 1.3.0, from the repository root:

    python tests/golden/make_adapter_golden.py

The file holds, for each family (bert, roberta): the base encoder's weights (random, but stored, so
that no transformers version has to rebuild them from a seed), the inputs, and for each config
(pfeiffer, houlsby): the adapter weights (under sam-peft's names) and the library's last hidden
state and gradients (w.r.t. the input embeddings and the adapter parameters), in eval mode and in
train mode (dropout drawn after seeding with DROPOUT_SEED). The metadata records the encoder
configs and the library versions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for adapter_reference

from adapter_reference import (  # noqa: E402
    FAMILIES,
    LIBRARY_CONFIGS,
    REDUCTION,
    build_base,
    config_kwargs,
    forward_backward,
    library_adapter_params,
    library_wrap,
    make_inputs,
)

OUT = HERE / "adapter_golden.safetensors"
ADAPTER_SEED = 5


def main() -> None:
    import adapters
    import transformers

    tensors: dict[str, torch.Tensor] = {}
    for family in FAMILIES:
        base = build_base(family)
        for name, p in base.named_parameters():
            tensors[f"base/{family}/{name}"] = p.detach().clone()
        inputs = make_inputs(family)
        for key, value in inputs.items():
            tensors[f"inputs/{family}/{key}"] = value
        for config in LIBRARY_CONFIGS:
            encoder = build_base(family)
            library_wrap(encoder, config, ADAPTER_SEED)
            params = library_adapter_params(encoder)
            with torch.no_grad():  # random biases too, so that every term of the adapter counts
                for p in params.values():
                    p.normal_(0.0, 0.3)
            case = f"{family}-{config}"
            for name, p in params.items():
                tensors[f"{case}/adapter/{name}"] = p.detach().clone()
            for mode, train in (("eval", False), ("train", True)):
                for key, value in forward_backward(encoder, inputs, train, params).items():
                    tensors[f"{case}/{mode}/{key}"] = value
    meta = {
        "configs": {family: config_kwargs(family) for family in FAMILIES},
        "adapter_configs": LIBRARY_CONFIGS,
        "reduction": REDUCTION,
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT), metadata={"spec": json.dumps(meta)})
    print(f"{OUT}: {len(tensors)} tensors, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
