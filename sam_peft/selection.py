"""Exact top-k selection of entries across tensors.

Every sparse method reduces to "score each eligible entry, keep the k best". These helpers
make that exact and deterministic:
- k = floor(p * m) computed in decimal, so 0.005 * 200000 is 1000, not 999;
- ties are broken by position (tensor order, then flat index), so a selection never depends
  on the sort algorithm;
- global top-k over ~125M entries takes well under the 5-6 s of torch.topk on a CPU: a random
  sample gives a threshold that keeps a little more than k candidates, and the exact top-k
  is taken among those (falling back to a lower threshold if the sample was unlucky).
"""

from __future__ import annotations

import math
from decimal import Decimal

import torch


def budget(density: float, m: int) -> int:
    """floor(density * m), exact for the decimal value the user wrote."""
    return int(math.floor(Decimal(repr(float(density))) * m))


def zero_budget(key: str, density: float, m: int, model_name: str) -> str | None:
    """The error message for a density that selects nothing (floor(p*m) = 0), else None: such a
    run would train only its head. The same words from the CLI, the library and the HF Trainer."""
    if m and budget(density, m) == 0:
        return (f"{key} {density}: floor(p*m) is 0 for the m = {m:,} eligible entries of '{model_name}', "
                f"so no entry would train; use at least {1 / m:.3g}")
    return None


def per_tensor_quotas(sizes: list[int], k: int) -> list[int]:
    """Split k over tensors in proportion to their sizes, summing to exactly k.

    Each tensor gets floor(k * n_t / m); the leftover entries go to the tensors with the
    largest remainders (ties: earlier tensor first). The authors' code used int(p * n_t) per
    tensor, which can fall short of floor(p * m) by up to one entry per tensor.
    """
    m = sum(sizes)
    if m == 0:
        return [0] * len(sizes)
    base = [k * n // m for n in sizes]
    rem = [(k * n % m, -i) for i, n in enumerate(sizes)]
    left = k - sum(base)
    for _, neg_i in sorted(rem, reverse=True)[:left]:
        base[-neg_i] += 1
    return base


def topk_flat(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k largest entries of x (NaN counts as -inf); ties by index."""
    x = x.reshape(-1)
    n = x.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if k >= n:
        return torch.arange(n, device=x.device)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    cand = None
    if n > 4_000_000 and k < n // 8:
        # Threshold from a sample: keep ~1.5k + margin candidates, then be exact among them.
        # (NaN >= thr is False, so NaNs never become candidates: no full nan_to_num pass.)
        g = torch.Generator(device="cpu").manual_seed(0)
        sample = x[torch.randint(0, n, (1_000_000,), generator=g).to(x.device)]
        sample = sample[~torch.isnan(sample)]
        q = 1.0 - min(1.0, (1.5 * k + 10_000) / n)
        if sample.numel():
            thr = torch.quantile(sample.double(), q).to(x.dtype)
            idx = torch.nonzero(x >= thr).squeeze(1)
            if idx.numel() >= k:
                cand = idx
    if cand is None:
        cand = torch.arange(n, device=x.device)
    vals = torch.nan_to_num(x[cand], nan=float("-inf"))
    kth = torch.topk(vals, k, sorted=False).values.min()  # the k-th largest value
    above = cand[vals > kth]
    ties = cand[vals == kth][: k - above.numel()]  # cand is in index order
    return torch.sort(torch.cat([above, ties])).values


def topk_entries(scores: dict[str, torch.Tensor], k: int, mode: str = "global") -> dict[str, torch.Tensor]:
    """{name: sorted flat indices} of the k best entries over all tensors (or per tensor)."""
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    if mode == "per_tensor":
        quotas = per_tensor_quotas(sizes, k)
        return {n: topk_flat(scores[n], q) for n, q in zip(names, quotas)}
    if mode != "global":
        raise ValueError(f"unknown top-k mode {mode!r}")
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    idx = topk_flat(flat, k)
    out, start = {}, 0
    for n, size in zip(names, sizes):
        lo = torch.searchsorted(idx, start)
        hi = torch.searchsorted(idx, start + size)
        out[n] = idx[lo:hi] - start
        start += size
    return out


def random_scores(shapes: dict[str, torch.Size], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniform scores, one per entry: top-k of these is a uniformly random k-subset."""
    return {n: torch.rand(s, generator=generator) for n, s in shapes.items()}


def tie_report(scores: dict[str, torch.Tensor], chosen: dict[str, torch.Tensor]) -> dict:
    """How much of a selection its scores decided: k, how many entries scored above 0, and how
    many chosen entries did not (ties at zero, filled by position: heavy gate collapse, or a
    tensor that got no gradient under per-tensor top-k)."""
    n_positive = sum(int((s > 0).sum()) for s in scores.values())
    unscored = sum(int((~(scores[n].reshape(-1)[idx] > 0)).sum()) for n, idx in chosen.items() if idx.numel())
    return {"k": sum(int(idx.numel()) for idx in chosen.values()), "n_positive_scores": n_positive,
            "n_chosen_without_positive_score": unscored}
