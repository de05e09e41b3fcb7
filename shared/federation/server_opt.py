"""How the server applies the clients' mean change to the global tensors (post-processing).

``sgd``: ``w += lr * mean_delta`` (lr 1 = plain FedAvg). ``momentum``: FedAvgM (Hsu et al.
2019), ``m = beta1 * m + mean_delta; w += lr * m``. ``adam``: FedAdam (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021): the mean change is treated as a pseudo-gradient
with Adam's moments and ``tau`` as the adaptivity floor. Under local DP each client's change is
mostly noise; the moments average it over rounds and the per-coordinate step size lets tensors
with very different gradient scales (item bias vs LoRA B) move at a comparable rate.

``final`` < 1 decays the learning rate over the run: round ``r`` of ``rounds`` uses
``lr * (final + (1 - final) * (1 + cos(pi * (r - 1) / (rounds - 1))) / 2)``, the full ``lr`` in
round 1 and ``final * lr`` in the last round (cosine decay); ``final = 1`` keeps it constant.

Operates only on already-privatized client changes, so it costs no privacy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


class ServerOptimizer:
    def __init__(
        self,
        kind: str,
        lr: float,
        *,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        final: float = 1.0,
        rounds: int = 1,
    ) -> None:
        if kind not in ("sgd", "momentum", "adam"):
            raise ValueError(f"server optimizer {kind!r}: use sgd, momentum or adam")
        if not 0 < final <= 1:
            raise ValueError(f"server optimizer final lr fraction {final!r}: use (0, 1]")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.final, self.rounds = final, max(1, int(rounds))
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def lr_at(self, rnd: int) -> float:
        """The learning rate of round ``rnd`` (1-based; rounds past the last keep its lr)."""
        if self.final >= 1 or self.rounds <= 1:
            return self.lr
        t = min(max(rnd - 1, 0), self.rounds - 1) / (self.rounds - 1)
        return self.lr * (self.final + (1 - self.final) * (1 + math.cos(math.pi * t)) / 2)

    def step(
        self,
        current: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        rnd: int = 1,
    ) -> dict[str, torch.Tensor]:
        lr = self.lr_at(rnd)
        out = {}
        for k, w in current.items():
            d = mean_delta[k]
            if self.kind == "sgd":
                out[k] = w + lr * d
                continue
            if self.kind == "momentum":
                self.m[k] = self.m.get(k, torch.zeros_like(d)) * self.beta1 + d
                out[k] = w + lr * self.m[k]
                continue
            m = self.m.get(k, torch.zeros_like(d)) * self.beta1 + (1 - self.beta1) * d
            v = self.v.get(k, torch.zeros_like(d)) * self.beta2 + (1 - self.beta2) * d * d
            self.m[k], self.v[k] = m, v
            out[k] = w + lr * m / (v.sqrt() + self.tau)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {
            **{f"m.{k}": v for k, v in self.m.items()},
            **{f"v.{k}": v for k, v in self.v.items()},
        }

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.m = {k[2:]: v for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: v for k, v in state.items() if k.startswith("v.")}
