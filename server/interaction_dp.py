"""Per-interaction DP-SGD with the noise added once, by a trusted server (``dp-noise=server``).

Under local DP-SGD (``dp-noise=client``, the default) every client noises its own clipped
gradient sum, so ten silos release ten noise draws where one central DP-SGD step over their
union releases one. With ``dp-noise=server`` each round is one central DP-SGD step over the
union of the clients' examples:

- every client (``fraction-train = 1``) Poisson-samples its own examples at the common rate
  ``sample-rate`` q (so the union is a Poisson sample at q), clips each example's gradient to
  ``max-grad-norm`` C, sums them, divides by the common public constant ``batch-divisor`` D and
  takes ONE plain SGD step at ``lr``, WITHOUT noise (:func:`fedrec.client.local_train.train_round`);
  its reply is that change;
- the server sums the changes (a client that sent none adds zero; no division by the number of
  replies), adds Gaussian noise of standard deviation ``lr * sigma * C / D`` per coordinate
  (:func:`fedrec.server.user_dp.os_gaussian`: the OS CSPRNG) and gives the noisy sum to its
  optimizer, so any server optimizer is post-processing.

One example (window) changes the sum of changes by at most ``lr * C / D`` in L2, so the released
sum is the subsampled Gaussian mechanism with noise multiplier sigma on every round: the same
mechanism, and the same accounting, as one client's local DP-SGD step
(:mod:`fedrec.shared.privacy.accounting`, group privacy for sliding windows), so each client's
budget and ledger line are what they would be under local noise (``noise_at`` in the ledger says
where the noise was added; ``tests/test_interaction_dp.py`` checks the sum and the bound on random
data). An update above ``update-norm-max`` is scaled down (a projection onto the ball, which keeps
each window's contribution within the bound), never rejected: a rejection could turn on one
window.

Trust: the server sees every client's clipped, un-noised sum. The epsilon holds against everyone
who sees the released models (other clients included), not against the server; the privacy
statement says so.
"""

from __future__ import annotations

import logging

import torch

from fedrec.server.strategy import FedRecStrategy
from fedrec.server.user_dp import add_os_noise
from fedrec.shared.privacy.calibration import server_noise_std

log = logging.getLogger("fedrec.server")


class ServerNoise:
    """Makes ``strategy`` sum its clients' changes and noise the sum before its optimizer."""

    def __init__(self, strategy: FedRecStrategy, sigma: float) -> None:
        cfg = strategy.cfg
        if cfg.dp_noise != "server":
            raise ValueError("ServerNoise needs dp-noise = server")
        self.sigma = float(sigma)
        self.std = server_noise_std(cfg, self.sigma)
        self.strategy = strategy
        strategy.fixed_denominator = 1  # the sum, not the mean
        strategy.mean_noise = self.noise_sum
        strategy.clip_only = True  # an over-norm update is scaled down, never rejected

    def noise_sum(self, total: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = add_os_noise(total, self.std)
        self.strategy.round_noise_std = self.std
        log.info("server DP-SGD noise of std %.4g added to the sum of the changes", self.std)
        return out
