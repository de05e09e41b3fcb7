"""User-level DP (DP-FedAvg) on top of fedrec's strategy, through Flower's own DP wrapper.

``user-dp=true`` wraps :class:`fedrec.server.strategy.FedRecStrategy` in
:class:`UserLevelDP`, a subclass of Flower's
``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping``. Per round, Flower's
wrapper clips every client's whole update (all travelling tensors together) to L2 norm
``user-clip`` around the global model it sent and lets the inner strategy aggregate; Gaussian
noise of standard deviation ``z * user-clip / n`` (Flower's own ``compute_stdv``; the draw from
:func:`os_gaussian`), ``n`` being the round's fixed sample size, is added to the
clipped mean change **before** the server optimizer takes its step. That is the Gaussian
mechanism on the clipped sum divided by ``n``:
replacing one client's update by zeros (the client present with no data: zero-out adjacency)
changes that sum by at most ``user-clip``. Swapping one client's data for another's (the number
of clients unchanged, replace-one) swaps one update for another: up to twice that, and the
statement gives the epsilon for that adjacency beside the claimed one. Adding or removing a
client is not claimed: ``n`` is computed from the number of clients
(:func:`fedrec.shared.privacy.user_level.sample_size`), so it can change with it, and with it the
divisor and the noise's scale.

Three things make that true here and are what this module adds around the wrapper:

- **Noise before the server step.** Flower's wrapper adds its noise to the model the inner
  strategy returns, i.e. after the server optimizer: with a server learning rate ``lr`` that is
  noise of ``z * C / (n * lr)`` on the mean (too little for ``lr > 1``), and with momentum or Adam
  not a noised mean at all. Here the wrapper adds none; the inner strategy calls
  :meth:`UserLevelDP.noise_mean` on the clipped mean and gives the noisy mean to the optimizer,
  so any ``server-opt`` and ``server-lr`` is post-processing of the one Gaussian release.

- **A fixed denominator.** The inner strategy divides the sum of accepted changes by ``n``,
  the number of clients the round sampled, not by the number that replied: a client that
  refused (its local budget), failed, timed out or was rejected adds a zero change. Averaging
  over the replies instead would make the sensitivity ``user-clip / replies``, larger than the
  noise was calibrated for (McMahan et al. 2018 use the same fixed-denominator estimator).
- **A round that goes on.** Flower's wrapper skips aggregation when any reply carries an error;
  fedrec must not stop a round for one failed client (and must still write the ledger lines of
  the clients that trained). Failed replies are taken out before the wrapper sees them, and
  updates with wrong keys or shapes, which would make the wrapper's clipping raise, are taken
  out of their messages so the inner strategy rejects them and logs why.

Accounting. ``z`` is calibrated with Opacus' RDP so that ``num-rounds`` releases spend
(``user-epsilon``, ``user-delta``) with **no amplification** from client sampling: Flower samples
a fixed number of clients without replacement, which is not the Poisson sampling the standard
amplification bound assumes, so no amplification is claimed. The amplified value under a
Poisson assumption (q = n / clients) is reported beside it, marked as not claimed. A round that
is not aggregated releases nothing; resumed runs count every round before the checkpoint as a
release (an over-count, never an under-count).

Unit and adjacency: one client's whole data set, zero-out (user-level with ``partition=user``;
a whole silo with ``partition=silo``). The noise comes from the operating system's CSPRNG
(:func:`os_gaussian`: ``os.urandom`` and Box-Muller in float64), not from Flower's helper, which
draws from NumPy's global MT19937: seeded with 32 bits (:func:`reseed_numpy`, kept for anything
else that uses NumPy's global generator), its noise could be found by a 2^32 search and removed.
The noise is a floating-point Gaussian (Mironov 2012: float arithmetic can leak through the low
bits); the accounting is that of the ideal Gaussian mechanism.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.serverapp.strategy import dp_fixed_clipping as _dp_fixed_clipping

from fedrec.server.strategy import FedRecStrategy
from fedrec.shared.federation import contract
from fedrec.shared.federation.params import UpdateError, check_update, from_record
from fedrec.shared.privacy.user_level import (
    sample_size,
    user_level_summary,
    user_noise_multiplier,
)

__all__ = [
    "UserLevelDP",
    "reseed_numpy",
    "sample_size",
    "user_level_summary",
    "user_noise_multiplier",
]

log = logging.getLogger("fedrec.server")

_PER_REPLY = "aggregate_fit: parameters are clipped by value"


class _OncePerRound(logging.Filter):
    """Drops the line Flower's DP wrapper logs for every reply it clips (the same text, 471
    times a round in the default federation, each one formatted, uploaded to the SuperLink and
    streamed to ``RUN/flower.log``); :meth:`UserLevelDP.aggregate_train` logs one line a round
    instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_PER_REPLY)


logging.getLogger("flwr").addFilter(_OncePerRound())


def _clip_update_zero_safe(param1: Any, param2: Any, clipping_norm: float) -> None:
    """Flower's ``compute_clip_model_update``, except that a zero update is left as it is.

    Flower's clipping divides the clip norm by the update's norm, so a client that returns the
    global adapter unchanged (no example drawn by Poisson sampling in any of its steps, for
    instance) raises ZeroDivisionError and stops the whole run. A zero update needs no clipping.
    """
    if all(np.array_equal(a, b) for a, b in zip(param1, param2, strict=True)):
        return
    _flower_clip(param1=param1, param2=param2, clipping_norm=clipping_norm)


# The wrapper calls the clipping function through its own module's namespace; point that name
# at the zero-safe version (checked by tests/test_strategy.py with a zero update).
_flower_clip = _dp_fixed_clipping.compute_clip_model_update
if _flower_clip is not _clip_update_zero_safe:
    _dp_fixed_clipping.compute_clip_model_update = _clip_update_zero_safe


def add_os_noise(tensors: dict[str, torch.Tensor], std: float) -> dict[str, torch.Tensor]:
    """Every tensor plus :func:`os_gaussian` noise of standard deviation ``std``, added in
    float64 and returned as float32 tensors."""
    out = {}
    for k, t in tensors.items():
        x = t.detach().cpu().double().numpy()
        out[k] = torch.from_numpy((x + os_gaussian(x.shape, std)).astype(np.float32))
    return out


def os_gaussian(shape: tuple[int, ...], std: float) -> np.ndarray:
    """Gaussian noise (float64) of standard deviation ``std`` from the operating system's
    CSPRNG (``os.urandom``, 53-bit uniforms, Box-Muller). Flower's helper draws from NumPy's
    global MT19937, which fedrec could seed with only 32 bits: anyone holding a released model
    could search those 2^32 seeds for the one that explains the noise and remove it from every
    round. Here there is no seed to search."""
    n = int(np.prod(shape)) if shape else 1
    m = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * m), dtype="<u8").reshape(2, m)
    u = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    r = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]: finite
    theta = 2.0 * np.pi * u[1]
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
    return (std * z).reshape(shape)


def reseed_numpy() -> None:
    """Seed NumPy's global generator (Flower's DP noise) from OS entropy."""
    np.random.seed(secrets.randbits(32))


class UserLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper, made safe for fedrec's round semantics."""

    def __init__(self, inner: FedRecStrategy, *, num_sampled: int, noise_multiplier: float):
        super().__init__(
            inner,
            noise_multiplier=noise_multiplier,
            clipping_norm=inner.cfg.user_clip,
            num_sampled_clients=num_sampled,
        )
        self.inner = inner
        inner.fixed_denominator = num_sampled
        inner.mean_noise = self.noise_mean
        self._noised = False  # noise_mean ran for the model about to be released

    def noise_std(self) -> float:
        """The noise's standard deviation on the mean change: ``z * user-clip / n``."""
        return _dp_fixed_clipping.compute_stdv(
            self.noise_multiplier, self.clipping_norm, self.num_sampled_clients
        )

    def noise_mean(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Gaussian mechanism on the clipped mean change (all travelling tensors), called
        by the inner strategy before its server optimizer."""
        std = self.noise_std()
        out = add_os_noise(mean, std)
        self._noised = True
        log.info("central DP noise of std %.4g added to the mean change", std)
        return out

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """No noise here: it went on the mean change before the server step (noise_mean). A
        model about to be released without that noise is refused."""
        if not self._noised:
            raise RuntimeError(
                "user-level DP: a round's model was about to be released without the noise on "
                "its mean change; nothing is released"
            )
        self._noised = False
        return aggregated_arrays

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if len(messages) != self.num_sampled_clients:
            raise RuntimeError(
                f"user-level DP: round {server_round} sampled {len(messages)} clients, but the "
                f"noise was calibrated for {self.num_sampled_clients}; the number of connected "
                "clients changed. Stop the run and restart it with the right fraction-train."
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        clean: list[Message] = []
        failures: list[str] = []
        for msg in replies:
            if msg.has_error():
                failures.append(msg.error.reason or "")
                log.warning(
                    "round %d: client node %d failed: %s (counts as a zero update)",
                    server_round + self.inner.round_offset,
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            if contract.ARRAYS in msg.content.array_records:
                try:
                    check_update(
                        from_record(msg.content.array_records[contract.ARRAYS]), self.inner.template
                    )
                except UpdateError as err:
                    log.warning(
                        "round %d: update from node %d removed before clipping: %s",
                        server_round + self.inner.round_offset,
                        msg.metadata.src_node_id,
                        err,
                    )
                    del msg.content[contract.ARRAYS]
            clean.append(msg)
        self.inner.extra_failures = failures
        out = super().aggregate_train(server_round, clean)
        log.info(
            "round %d: %d updates clipped to L2 norm %g",
            server_round + self.inner.round_offset,
            sum(contract.ARRAYS in m.content.array_records for m in clean),
            self.clipping_norm,
        )
        return out
