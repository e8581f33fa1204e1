"""Kernel density estimate of scalar weights: its modes and their basins.

RED's hashing (stage 1) replaces every scalar weight of a layer by the mode
of the weights' density whose basin of attraction contains it. The density
is a Gaussian kernel density estimate (KDE)

    f(x) = 1 / (n h) * sum_i phi((x - w_i) / h),    phi = standard normal,

with bandwidth ``h``. Its local maxima are the modes ``m_1 < ... < m_K``;
between two consecutive modes the density has a minimum ``b_k``, the basin
boundary. A weight ``w`` with ``b_{k-1} < w <= b_k`` belongs to basin ``k``
and is snapped to ``m_k`` (RED's hashing; ``snap(values, to="mean")``
snaps it to the mean of its basin instead). The number of modes ``K`` is not chosen: it comes
from the weights and ``h`` (small ``h``: many modes; large ``h``: few).

The density is evaluated on a regular grid (step ``h / 8``, at most 65,536
points) by linear binning and a discrete Gaussian convolution, the standard
binned KDE; maxima are refined by a parabola through the three grid points
around them. Basin boundaries lie on grid points and the refined modes lie
within half a step of their grid maximum, so a snapped weight never leaves
its basin.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_STEPS_PER_BANDWIDTH = 8
_MAX_GRID = 65_536
_TRUNCATE = 5.0  # kernel truncated at 5 bandwidths


def silverman_bandwidth(values: np.ndarray) -> float:
    """Silverman's rule of thumb, ``h = 0.9 · min(σ, IQR / 1.34) · n^(−1/5)``.

    Falls back to σ when the inter-quartile range is 0 (more than half of the
    values equal); returns 0 for fewer than two distinct values.

    Example:

    >>> round(silverman_bandwidth(np.array([0.0, 1.0, 2.0, 3.0])), 4)  # 0.9 · min(1.118, 1.5/1.34) · 4^(−1/5)
    0.7626
    """
    values = np.asarray(values, np.float64).ravel()
    if values.size < 2:
        return 0.0
    sigma = float(values.std())
    q25, q75 = np.percentile(values, [25, 75])
    spread = min(sigma, float(q75 - q25) / 1.34) if q75 > q25 else sigma
    return 0.9 * spread * values.size ** (-0.2)


@dataclasses.dataclass(frozen=True)
class DensityModes:
    """Modes of a 1-D density and the boundaries of their basins.

    Attributes:
        modes: sorted mode locations, shape ``(K,)``.
        boundaries: density minima between consecutive modes, shape
            ``(K - 1,)``; basin ``k`` is ``(boundaries[k-1], boundaries[k]]``.
        bandwidth: the KDE bandwidth ``h`` used.
    """

    modes: np.ndarray
    boundaries: np.ndarray
    bandwidth: float

    def basin(self, values: np.ndarray) -> np.ndarray:
        """Index of the basin holding each value (same shape as ``values``)."""
        return np.searchsorted(self.boundaries, np.asarray(values), side="left")

    def snap(self, values: np.ndarray, to: str = "mode") -> np.ndarray:
        """Each value replaced by its basin's representative (same shape and dtype).

        ``to="mode"``: the mode ``m_k`` of its basin. ``to="mean"``: the mean
        of the ``values`` in its basin, ``v_k = mean{w_i : w_i in basin k}``,
        the constant per basin closest to ``values`` in least squares
        (``sum_i (w_i - v_k(i))²`` is smallest). Both keep one value per basin,
        so equal basins give equal outputs either way; a basin holding none of
        ``values`` keeps its mode.
        """
        values = np.asarray(values)
        basin = self.basin(values)
        if to == "mode":
            return self.modes[basin].astype(values.dtype)
        if to != "mean":
            raise ValueError(f"Expected `to` to be 'mode' or 'mean'. Received: to={to!r}")
        sums = np.bincount(basin.ravel(), weights=values.astype(np.float64).ravel(), minlength=self.modes.size)
        counts = np.bincount(basin.ravel(), minlength=self.modes.size)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), self.modes)
        return means[basin].astype(values.dtype)


def density_modes(values: np.ndarray, bandwidth: float) -> DensityModes:
    """Modes and basins of the Gaussian KDE of ``values`` with ``bandwidth``.

    Args:
        values: scalar samples (any shape; flattened).
        bandwidth: ``h > 0``; ``h = 0`` (or a single distinct value) gives
            one mode per distinct value, i.e. nothing changes.

    Returns:
        A `DensityModes`.

    Example:

    >>> d = density_modes(np.array([-1.0, -0.9, 1.0, 1.1]), bandwidth=0.1)
    >>> np.round(d.modes, 2).tolist(), np.round(d.snap(np.array([-0.9, 1.0])), 2).tolist()
    ([-0.95, 1.05], [-0.95, 1.05])
    """
    values = np.asarray(values, np.float64).ravel()
    distinct = np.unique(values)
    if bandwidth <= 0 or distinct.size < 2:
        return DensityModes(distinct, (distinct[1:] + distinct[:-1]) / 2, float(bandwidth))
    low, high = distinct[0] - _TRUNCATE * bandwidth, distinct[-1] + _TRUNCATE * bandwidth
    step = max(bandwidth / _STEPS_PER_BANDWIDTH, (high - low) / (_MAX_GRID - 1))
    size = int(np.ceil((high - low) / step)) + 2
    density = _binned_kde(values, low, step, size, bandwidth)

    interior = density[1:-1]
    peaks = np.flatnonzero((interior > density[:-2]) & (interior >= density[2:])) + 1
    if peaks.size == 0:  # cannot happen for a proper density; be safe
        peaks = np.array([int(np.argmax(density))])
    modes = low + step * (peaks + _parabola_offset(density, peaks))
    troughs = np.array([a + int(np.argmin(density[a : b + 1])) for a, b in zip(peaks[:-1], peaks[1:])], np.int64)
    boundaries = low + step * troughs.astype(np.float64)
    return DensityModes(modes, boundaries, float(bandwidth))


def _binned_kde(values: np.ndarray, low: float, step: float, size: int, bandwidth: float) -> np.ndarray:
    """Linear binning of ``values`` on the grid, convolved with a Gaussian."""
    position = (values - low) / step
    left = np.floor(position).astype(np.int64)
    fraction = position - left
    counts = np.bincount(left, 1.0 - fraction, minlength=size) + np.bincount(left + 1, fraction, minlength=size)
    counts = counts[:size]
    sigma = bandwidth / step
    half = max(1, int(np.ceil(_TRUNCATE * sigma)))
    taps = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    return np.convolve(counts, kernel / kernel.sum(), mode="same")


def _parabola_offset(density: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Vertex of the parabola through the grid maximum and its neighbours, in steps (|offset| <= 1/2)."""
    left, centre, right = density[peaks - 1], density[peaks], density[peaks + 1]
    curvature = left - 2 * centre + right
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
    return np.clip(offset, -0.5, 0.5)
