"""Bootstrap confidence intervals for evaluation metrics, and paired comparisons between models.

Where it sits: below :mod:`pipeline.evaluation` (which turns generations and log-probs into per-item
values) and the ``eval`` stage (which reports them). It knows nothing about models or constraints: a metric
is a ratio of sums over *items* (``sum(num) / sum(den)``), and items belong to *clusters* (an eval prompt
and its instructions; or several prompts built from one held-out question). Resampling is over clusters,
so instruction-level accuracy is resampled by prompt, not by instruction.

Pairing: :class:`Resamples` draws the cluster indices once; every model's metric is computed on the same
draws, so the difference between two models is a paired bootstrap (the prompt-to-prompt variation that both
models share cancels out). Seeded and deterministic: the draws use Python's ``random.Random(seed)``,
whose output is fixed across Python versions, and numpy only for the arithmetic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError

N_RESAMPLES = 2000  # percentile bounds of a 95 % interval move by < 0.5 point between seeds at this size
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its percentile bootstrap interval (``low``/``high`` at ``LEVEL``)."""

    value: float
    low: float
    high: float

    def rounded(self, digits: int = 4) -> dict[str, float]:
        return {"value": round(self.value, digits), "low": round(self.low, digits), "high": round(self.high, digits)}

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def verdict(difference: Estimate, higher_is_better: bool | None = True) -> str:
    """Words for a paired difference ``later − earlier``: ``"within noise"`` when its interval holds zero, else
    ``"better"``/``"worse"`` (or ``"higher"``/``"lower"`` for a metric with no better direction)."""
    if not difference.excludes_zero():
        return "within noise"
    if higher_is_better is None:
        return "higher" if difference.low > 0 else "lower"
    return "better" if (difference.low > 0) == higher_is_better else "worse"


class Resamples:
    """``n_resamples`` bootstrap draws of ``n_clusters`` cluster indices, made once and shared by every model.

    Stored as a count matrix (draw × cluster: how often the cluster was drawn), so a statistic on all draws
    is one matrix product.
    """

    def __init__(self, n_clusters: int, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> None:
        if n_clusters < 1:
            raise PipelineError("Cannot bootstrap an empty evaluation set; check the eval prompt and pair files.")
        rng, clusters = random.Random(seed), range(n_clusters)
        drawn = np.array([rng.choices(clusters, k=n_clusters) for _ in range(n_resamples)], dtype=np.int64)
        flat = (drawn + np.arange(n_resamples)[:, None] * n_clusters).ravel()
        self.counts = np.bincount(flat, minlength=n_resamples * n_clusters).reshape(n_resamples, n_clusters)
        self.n_clusters = n_clusters

    def _check(self, values: Sequence[float]) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (self.n_clusters,):
            raise PipelineError(f"Got {array.shape[0]} per-cluster values for {self.n_clusters} clusters.")
        return array

    def _draws(self, num: Sequence[float], den: Sequence[float]) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):  # a draw without any item of a subgroup: NaN
            return (self.counts @ self._check(num)) / (self.counts @ self._check(den))

    def ratio(self, num: Sequence[float], den: Sequence[float]) -> Estimate:
        """``sum(num) / sum(den)`` over clusters, with its interval (NaN if ``den`` sums to zero)."""
        total = float(np.sum(self._check(den)))
        value = float(np.sum(self._check(num))) / total if total else math.nan
        return _estimate(value, self._draws(num, den))

    def difference(self, earlier: tuple[Sequence[float], Sequence[float]],
                   later: tuple[Sequence[float], Sequence[float]]) -> Estimate:
        """Paired ``later − earlier`` of two ratios computed on the same clusters and the same draws."""
        first, second = self.ratio(*earlier), self.ratio(*later)
        return _estimate(second.value - first.value, self._draws(*later) - self._draws(*earlier))


def _estimate(value: float, draws: np.ndarray) -> Estimate:
    finite = draws[np.isfinite(draws)]
    if math.isnan(value) or finite.size == 0:
        return Estimate(math.nan, math.nan, math.nan)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Estimate(value, float(low), float(high))


def cluster_index(keys: Sequence[Hashable]) -> tuple[list[int], int]:
    """The cluster number of each item (clusters numbered in order of first appearance) and the cluster count."""
    numbers: dict[Hashable, int] = {}
    index = [numbers.setdefault(key, len(numbers)) for key in keys]
    return index, len(numbers)


def per_cluster(values: Sequence[float], index: Sequence[int], n_clusters: int) -> list[float]:
    """Per-item values summed per cluster (the unit the bootstrap resamples)."""
    sums = [0.0] * n_clusters
    for value, cluster in zip(values, index, strict=True):
        sums[cluster] += float(value)
    return sums
