"""The accumulator state of the streamed statistics (SPEC §1): its layout, in one place.

All tensors on one device:

- ``counts``  int64   [C]     samples seen per class
- ``shift``   float64 [C, P]  per-class shift s_c: the class mean of the first batch holding class c
- ``sums``    float64 [C, P]  d_c = Σ_{i in c} (h_i − s_c)
- ``scatter`` float64 [P, P]  S = Σ_i (h_i − s_{y_i})(h_i − s_{y_i})ᵀ
- ``invalid`` int64   [2]     samples dropped: [label out of range, non-finite features]

Then μ_c = s_c + d_c / n_c and N Σ_W = S − Σ_c d_c d_cᵀ / n_c. Because s_c lies within the
within-class spread of μ_c, every subtraction above involves numbers of the size of that spread,
not of the means: this is what keeps the statistics exact near collapse (SPEC §1).
:func:`new_state` allocates this layout; :data:`STATE_KEYS` is the order the update ops take.
"""

from __future__ import annotations

import torch

# The accumulator state's tensors, in the order update_stats_ takes them.
STATE_KEYS = ("counts", "shift", "sums", "scatter", "invalid")
# The entries of ``invalid``.
INVALID_LABEL = 0
INVALID_NONFINITE = 1


def new_state(
    num_classes: int, dim: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """An empty accumulator state (the layout of the module docstring) on ``device``."""
    float64 = torch.float64
    return {
        "counts": torch.zeros(num_classes, dtype=torch.int64, device=device),
        "shift": torch.zeros(num_classes, dim, dtype=float64, device=device),
        "sums": torch.zeros(num_classes, dim, dtype=float64, device=device),
        "scatter": torch.zeros(dim, dim, dtype=float64, device=device),
        "invalid": torch.zeros(2, dtype=torch.int64, device=device),
    }
