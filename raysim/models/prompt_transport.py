"""How a prompted CLIP host scores an image against a class: the image's patch features and the
class's N prompt features, matched by optimal transport (FedOTP, Li et al., CVPR 2024;
FairFedMed's `GLP_OT_SVLoRA` head).

For each (image, class) pair the cost of matching patch m with prompt n is `1 − cos(m, n)`.
The plan T (M patches x N prompts) is computed without gradient, and the class score is
`Σ T ⊙ cos`, scaled by CLIP's logit scale; gradients reach the prompts and the image tower
through the cosine similarities only, as in both reference codes.

- `cot` (FedOTP's default, "unbalanced" OT): each prompt receives exactly `top_percent / N`
  of mass, each patch gives at most `1 / M`, so only the `top_percent` best-matching share of
  the image is transported (the rest of the patches, e.g. background, can be left out). This
  is entropic partial transport (Benamou et al. 2015), the problem POT's
  `ot.partial.entropic_partial_wasserstein(a, b, M, reg=eps, m=top_percent)` solves; POT solves
  one problem per call and a batch holds batch x classes problems every step, so raysim runs
  the same Bregman projections batched, in the log domain (stable at FedOTP's ε = 0.01, where
  `exp(−cost/ε)` underflows float32), and its tests compare the plans with POT's.
- `sinkhorn`: balanced entropic OT (uniform marginals 1/M and 1/N), POT's batched
  `ot.solve_batch` (log-domain Sinkhorn).
- `mean`: no transport, the mean similarity over patches and prompts (FairFedMed's shipped
  FairLoRA scripts run `OT=None`, which is this).
- `pooled`: CoOp / PromptFL's rule: the pooled image feature against the mean prompt feature.

A `cot` problem stops on its own (when its log column scalings move less than `thresh` in one
sweep, or after `max_iter` sweeps; FedOTP checks the batch's mean change of the scalings
themselves), so an image's score does not depend on the batch it is in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRANSPORTS = ("cot", "sinkhorn", "mean", "pooled")


@dataclass(frozen=True)
class Transport:
    kind: str = "cot"
    eps: float = 0.01  # entropic regularisation ε (FedOTP's scripts 0.01 / 0.1; FairFedMed's 0.1)
    top_percent: float = 0.8  # COT's transported mass (FedOTP's and FairFedMed's scripts)
    max_iter: int = 100
    thresh: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in TRANSPORTS:
            raise ValueError(f"algorithm.ot must be one of {', '.join(TRANSPORTS)}, got {self.kind!r}")
        if not 0 < self.eps < float("inf"):
            raise ValueError(f"algorithm.ot_eps must be > 0, got {self.eps}")
        if not 0 < self.top_percent <= 1:
            raise ValueError(f"algorithm.top_percent must be in (0, 1], got {self.top_percent}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"algorithm.ot_iters must be an integer >= 1, got {self.max_iter!r}")
        if not self.thresh > 0:
            raise ValueError(f"algorithm.ot_thresh must be > 0, got {self.thresh}")

    @property
    def uses_patches(self) -> bool:
        return self.kind != "pooled"


def class_scores(transport: Transport, patches: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """(B, C) scores from L2-normalised patch features (B, M, D) and prompt features (N, C, D)."""
    sim = torch.einsum("bmd,ncd->bcmn", patches, prompts)  # (B, C, M, N)
    if transport.kind == "mean":
        return sim.mean(dim=(2, 3))
    batch, classes, m, n = sim.shape
    with torch.no_grad():
        cost = (1.0 - sim).reshape(batch * classes, m, n).float()
        plan = partial_plan(cost, transport) if transport.kind == "cot" else balanced_plan(cost, transport)
    return (plan.view(batch, classes, m, n).to(sim.dtype) * sim).sum(dim=(2, 3))


def partial_plan(cost: torch.Tensor, transport: Transport) -> torch.Tensor:
    """Entropic partial OT, batched: rows (patches) sum to at most 1/M, columns (prompts) to
    exactly top_percent/N. Alternating KL projections on T = diag(u) K diag(v), K = exp(−cost/ε):
    u ← min(a / Kv, 1), v ← b / Kᵀu (FedOTP's `entropic_COT_fast`), in logs."""
    _, m, n = cost.shape
    log_k = -cost / transport.eps
    log_a = torch.full((m,), -torch.log(torch.tensor(float(m))).item(), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((n,), torch.log(torch.tensor(transport.top_percent / n)).item(), dtype=cost.dtype, device=cost.device)
    log_u = torch.zeros(cost.shape[:2], dtype=cost.dtype, device=cost.device)
    log_v = torch.zeros((cost.shape[0], n), dtype=cost.dtype, device=cost.device)
    live = torch.ones(cost.shape[0], dtype=torch.bool, device=cost.device)
    for _ in range(transport.max_iter):
        new_u = torch.clamp(log_a - torch.logsumexp(log_k + log_v[:, None, :], dim=2), max=0.0)
        new_v = log_b - torch.logsumexp(log_k + new_u[:, :, None], dim=1)
        moved = (new_v - log_v).abs().mean(dim=1)
        log_u = torch.where(live[:, None], new_u, log_u)  # a converged problem keeps its plan
        log_v = torch.where(live[:, None], new_v, log_v)
        live = live & (moved >= transport.thresh)
        if not bool(live.any()):
            break
    return torch.exp(log_u[:, :, None] + log_k + log_v[:, None, :])


def balanced_plan(cost: torch.Tensor, transport: Transport) -> torch.Tensor:
    """Entropic OT with uniform marginals (1/M per patch, 1/N per prompt): POT's batched
    log-domain Sinkhorn, `max_iter` sweeps each (tol 0: POT stops a batch as a whole, which
    would make an image's score depend on the images beside it)."""
    import ot  # POT: only the `sinkhorn` transport needs it

    result = ot.solve_batch(cost, reg=transport.eps, max_iter=transport.max_iter, tol=0.0, method="log_sinkhorn", grad="detach")
    return result.plan
