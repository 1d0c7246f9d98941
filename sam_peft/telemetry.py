"""What a run measures about itself while it trains, beside its metrics: the peak memory of
the run (result.json's peak_mem_bytes) and, when asked, tensorboard curves under <run_dir>/tb.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch


class PeakMemory:
    """Peak memory of one run: CUDA's max allocated bytes, or on a CPU the peak resident set of
    the process sampled every 20 ms while the run trains (per run, also inside a sweep process)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    def report(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "peak_mem_kind": "cuda_max_allocated"}
        if self._thread is not None:
            return {"peak_mem_bytes": int(self.peak), "peak_mem_kind": "process_rss_peak_during_run"}
        import resource

        return {"peak_mem_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
                "peak_mem_kind": "process_max_rss"}


class Curves:
    """Optional tensorboard scalars (train loss, lr, val major) under <run_dir>/tb."""

    def __init__(self, logdir: Path | None):
        self.writer = None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir))

    def add(self, scalars: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
