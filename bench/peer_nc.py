"""The per-batch Neural Collapse accumulators of a multi-pass peer, for benchmarks.

A re-implementation (no code copied) of the method of rhubarbwu/neural-collapse
(``neural_collapse/accumulate.py`` and ``measure.py``), the most used open NC library: the
baseline ncfast is timed against (``bench/bench_precision.py``, ``bench/end_to_end.py``; the
language-model benchmarks reuse it). What it does per batch, as the peer does it:

- :class:`PeerMeans` (its ``MeanAccumulator``): a one-hot [B, C] class-membership matrix from
  comparing the labels with ``arange(C)``, per-class counts as its column sums, and
  ``totals += onehotᵀ @ X`` in ``dtype`` (an O(B·C·P) product). Means = totals / (n + eps).
- :class:`PeerCovariance` (its ``CovarAccumulator``): needs the means of a previous pass; per
  batch it hashes the means (sha256 of their bytes on the host, the peer's guard that they did
  not change between batches), rebuilds the one-hot counts, and adds ``(X − M[y])ᵀ(X − M[y])``
  in ``dtype``. Σ_W = totals / (N + eps).
- :class:`PeerDecisions` (its ``DecAccumulator``, without the optional FAISS index): hashes
  means and classifier per batch, nearest class mean by ``|x|² + |μ|² − 2 x·μ``, linear
  decision ``argmax x Wᵀ`` (no bias, as the peer), and per-class agreement counts.

So the peer reads the data three times (means, covariance, decisions: one forward pass each),
against ncfast's one. The final NC numbers (:func:`nc1_pinv`, :func:`nc2_etf_error`,
:func:`nc3_duality_error`, :func:`nc4_agreement`) follow the peer's ``measure.py`` definitions,
which differ from HPD22/SPEC in scaling (NC1's Σ_B is divided by P, not C); they are here for
timing the whole measurement, not as reference values.

API (every class): ``update(features [B, P], labels [B])`` then ``compute()``; ``dtype`` is the
accumulation dtype (the peer's default float32, or float64), ``device`` where the state lives.

Example::

    means = PeerMeans(num_classes, dim)
    for x, y in batches: means.update(x, y)
    mu, mu_global = means.compute()
    cov = PeerCovariance(num_classes, dim, mu)
    for x, y in batches: cov.update(x, y)
    sigma_w = cov.compute()
    dec = PeerDecisions(num_classes, dim, mu, weight)
    for x, y in batches: dec.update(x, y)
    agreement = dec.compute()
"""

from __future__ import annotations

import hashlib
import math

import torch


def _digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes on the host (the peer's check that M and W are unchanged)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class _PeerAccumulator:
    """Per-class sample counts from a one-hot membership matrix, as the peer keeps them."""

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_classes, self.dim = num_classes, dim
        self.device, self.dtype = torch.device(device), dtype
        self.counts = torch.zeros(num_classes, dtype=torch.int32, device=self.device)
        self._digests: dict[str, str] = {}

    def _one_hot(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, C] bool membership; adds its column sums to the counts."""
        labels = labels.reshape(-1)
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)}")
        classes = torch.arange(self.num_classes, dtype=torch.int32, device=labels.device)
        member = (labels[:, None] == classes).to(self.device)
        self.counts += member.sum(dim=0, dtype=torch.int32)
        return member

    def _check_unchanged(self, name: str, tensor: torch.Tensor) -> None:
        """The peer hashes M (and W) on every batch and refuses a change between batches."""
        digest = _digest(tensor)
        if self._digests.setdefault(name, digest) != digest:
            raise ValueError(f"{name} changed between batches")


class PeerMeans(_PeerAccumulator):
    """Pass 1: class sums by a one-hot product (the peer's ``MeanAccumulator``)."""

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_classes, dim, device, dtype)
        self.totals = torch.zeros(num_classes, dim, dtype=dtype, device=self.device)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        member = self._one_hot(features, labels).T.to(self.dtype)  # [C, B]
        self.totals += member @ features.to(device=self.device, dtype=self.dtype)

    def compute(self, weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(class means [C, P], global mean [P]: the plain mean of the class means, or the
        sample-weighted one)."""
        eps = torch.finfo(self.dtype).eps
        n = self.counts[:, None]
        means = self.totals / (n + eps).to(self.dtype)
        if weighted:
            return means, n.reshape(-1).to(self.dtype) @ means / (n.sum() + eps)
        return means, means.mean(dim=0)


class PeerCovariance(_PeerAccumulator):
    """Pass 2: the within-class scatter about the means of pass 1 (``CovarAccumulator``)."""

    def __init__(
        self,
        num_classes: int,
        dim: int,
        means: torch.Tensor,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_classes, dim, device, dtype)
        self.means = means
        self.totals = torch.zeros(dim, dim, dtype=dtype, device=self.device)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self._check_unchanged("means", self.means)
        means = self.means.to(self.device, self.dtype)
        self._one_hot(features, labels)
        diff = features.to(self.device) - means[labels.to(self.device)]
        self.totals += diff.T @ diff

    def compute(self) -> torch.Tensor:
        """Σ_W [P, P] = scatter / (N + eps)."""
        eps = torch.finfo(self.dtype).eps
        return self.totals / (self.counts.sum() + eps).to(self.dtype)


class PeerDecisions(_PeerAccumulator):
    """Pass 3: agreement of the nearest-class-mean and the linear decisions (``DecAccumulator``
    without FAISS). ``bias`` is not the peer's (it ignores the classifier's bias); pass one to
    compare its count with ncfast's NC4."""

    def __init__(
        self,
        num_classes: int,
        dim: int,
        means: torch.Tensor,
        weight: torch.Tensor,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_classes, dim, device, dtype)
        self.means, self.weight, self.bias = means, weight, bias
        self.hits = torch.zeros(num_classes, dtype=torch.int32, device=self.device)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self._check_unchanged("means", self.means)
        self._check_unchanged("weight", self.weight)
        x = features.to(self.device, self.dtype)
        means = self.means.to(self.device, self.dtype)
        weight = self.weight.to(self.device, self.dtype)
        dists = x.norm(dim=-1)[:, None] ** 2 + means.norm(dim=-1)[None, :] ** 2 - 2 * (x @ means.T)
        nearest = dists.argmin(dim=-1)
        logits = x @ weight.T
        if self.bias is not None:
            logits += self.bias.to(self.device, self.dtype)
        agree = (logits.argmax(dim=-1) == nearest).to(torch.int32)
        self._one_hot(features, labels)
        self.hits.scatter_add_(0, labels.to(self.device).long(), agree)

    def compute(self) -> float:
        """The sample-weighted agreement rate (1 − NC4's mismatch rate)."""
        return float(self.hits.sum()) / max(1, int(self.counts.sum()))


# ------------------------------------------------------------- the peer's final NC numbers
def nc1_pinv(means: torch.Tensor, sigma_w: torch.Tensor, mean_global: torch.Tensor) -> float:
    """tr(Σ_W pinv(Σ_B)) / C with the peer's Σ_B = M̃ᵀM̃ / P (``covariance_pinv``)."""
    centred = means - mean_global
    sigma_b = centred.T @ centred / means.shape[1]
    return float(torch.trace(torch.linalg.pinv(sigma_b) @ sigma_w)) / means.shape[0]


def _etf_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖B Aᵀ / ‖B Aᵀ‖_F − (I − 11ᵀ/C)/√(C−1)‖_F (the peer's ``structure_error``)."""
    c = a.shape[0]
    gram = b @ a.T
    gram = gram / torch.linalg.matrix_norm(gram)
    gram = gram + 1.0 / c / math.sqrt(c - 1)
    gram.diagonal().sub_(1.0 / math.sqrt(c - 1))
    return float(torch.linalg.matrix_norm(gram))


def nc2_etf_error(means: torch.Tensor, mean_global: torch.Tensor) -> float:
    """Distance of the centred means' normalised Gram matrix from the simplex ETF's."""
    centred = means - mean_global
    return _etf_distance(centred, centred)


def nc3_duality_error(
    means: torch.Tensor, weight: torch.Tensor, mean_global: torch.Tensor
) -> float:
    """The same distance for the cross Gram matrix of classifier and centred means."""
    return _etf_distance(means - mean_global, weight.to(means.dtype))


def nc4_agreement(decisions: PeerDecisions) -> float:
    """The peer's ``clf_ncc_agreement``: the sample-weighted agreement rate."""
    return decisions.compute()
