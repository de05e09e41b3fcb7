"""How the server applies the clients' mean change to the global tensors (post-processing).

``sgd``: ``w += lr * mean_delta`` (lr 1 = plain FedAvg). ``momentum``: FedAvgM (Hsu et al.
2019), ``m = beta1 * m + mean_delta; w += lr * m``. ``adam``: FedAdam (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021): the mean change is treated as a pseudo-gradient
with Adam's moments and ``tau`` as the adaptivity floor. Under local DP each client's change is
mostly noise; the moments average it over rounds and the per-coordinate step size lets tensors
with very different gradient scales (item bias vs LoRA B) move at a comparable rate.

Operates only on already-privatized client changes, so it costs no privacy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ServerOptimizer:
    def __init__(
        self, kind: str, lr: float, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if kind not in ("sgd", "momentum", "adam"):
            raise ValueError(f"server optimizer {kind!r}: use sgd, momentum or adam")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(
        self, current: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = {}
        for k, w in current.items():
            d = mean_delta[k]
            if self.kind == "sgd":
                out[k] = w + self.lr * d
                continue
            if self.kind == "momentum":
                self.m[k] = self.m.get(k, torch.zeros_like(d)) * self.beta1 + d
                out[k] = w + self.lr * self.m[k]
                continue
            m = self.m.get(k, torch.zeros_like(d)) * self.beta1 + (1 - self.beta1) * d
            v = self.v.get(k, torch.zeros_like(d)) * self.beta2 + (1 - self.beta2) * d * d
            self.m[k], self.v[k] = m, v
            out[k] = w + self.lr * m / (v.sqrt() + self.tau)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {
            **{f"m.{k}": v for k, v in self.m.items()},
            **{f"v.{k}": v for k, v in self.v.items()},
        }

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.m = {k[2:]: v for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: v for k, v in state.items() if k.startswith("v.")}
