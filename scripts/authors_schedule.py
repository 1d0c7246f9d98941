"""The learning rate that the paper authors' schedule gave, task by task, against sam-peft's default.

Their jiant script warmed up over 10% of a 10,000-epoch horizon and decayed linearly to 0 at its
end; sam-peft's default warms up over 10% of max_steps (40,000) and decays to 0 there. Prints a
Markdown table (docs/fidelity.md quotes it): each task's train examples and batches of 16 per
epoch, the authors' warmup length, and the lr of both schedules at steps 4,000, 20,000 (the
earliest early stop) and 40,000 (the cap), for a peak lr of 1e-4.

    python scripts/authors_schedule.py [--data DIR]   (default data: `sam-peft data prepare --out data`)
"""

from __future__ import annotations

import argparse
import sys
from sam_peft.data import load_splits
from sam_peft.engine import learning_rate, schedule
from sam_peft.errors import UserError
from sam_peft.loader import build_config
from sam_peft.tasks import TASKS

STEPS = (4000, 20000, 40000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data", help="the authors' splits (default data: `sam-peft data prepare --out data`)")
    args = parser.parse_args(argv)
    ours = build_config({"task": "cb"}).train
    authors = build_config({"task": "cb", "train": {"schedule_epochs": 10000}}).train
    print("| task | train | batches/epoch | authors' warmup (steps) | "
          + " | ".join(f"lr at {s:,}: authors' / sam-peft" for s in STEPS) + " |")
    print("|:--|--:|--:|--:|" + "--:|" * len(STEPS))
    for name in TASKS:
        try:
            n_train = len(load_splits(args.data, name, "train")["train"])
        except UserError as e:
            print(f"authors_schedule.py: {e}", file=sys.stderr)
            return 2
        per_epoch = -(-n_train // authors.batch_size)
        a_horizon, a_warmup = schedule(authors, per_epoch)
        o_horizon, o_warmup = schedule(ours, per_epoch)
        lrs = [f"{learning_rate(s, 1e-4, a_horizon, a_warmup):.2g} / {learning_rate(s, 1e-4, o_horizon, o_warmup):.2g}"
               for s in STEPS]
        print(f"| {name} | {n_train:,} | {per_epoch:,} | {a_warmup:,} | " + " | ".join(lrs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
