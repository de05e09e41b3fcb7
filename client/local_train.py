"""One client's round of local training with Opacus DP-SGD, and its privacy budget.

Privacy unit: ONE INTERACTION (user, item, timestamp) of the client's data, add/remove adjacency.
Examples are built by :func:`fedrec.shared.model.examples.disjoint_examples`: each interaction is
hashed into exactly one example (as its target or as context), independently of every other
interaction, so adding or removing one interaction changes exactly one example and per-example
DP-SGD is DP for the interaction with no group-privacy factor (``tests/test_dp_training.py``
checks this on the example builder). Negatives are public catalog items drawn independently of
the data (:mod:`fedrec.shared.model.candidates`).

``examples=sequence`` builds central training's sliding-window examples instead: about four
times as many, with the most recent history as context. Without local DP (no DP, or user-level
DP only) that is all. With local DP one interaction changes up to ``k = 1 + 2 * history-len``
examples (its own, removed, and the next ``history-len``, whose contexts hold it: each a
replacement, two add/remove steps), so the guarantee per interaction is group privacy over k:
:func:`fedrec.shared.privacy.accounting.group_epsilon` turns the example-level RDP curve into
the interaction-level epsilon, the noise is calibrated for that, and every reported epsilon is
the interaction-level one (``FedConfig.dp_group``; the ledger records ``group_size``). At the
default ``history-len`` 20 (k = 41) the noise this needs is prohibitive (sigma 7.4 against 0.6
for disjoint examples at the full suite's epsilon-8 settings); with ``history-len=4`` (k = 9) it
is 2.0. Measured at the same interaction-level epsilon 8 (ML-100K protocol A, 10 silos, 10
rounds of 10 steps at q 0.025): sliding windows with ``history-len=4`` under group privacy reach
test NDCG@10 0.0657 and 0.0623 in two runs (ablations suite ``A-fed-eps8-seq-h4`` and ``-r2``,
RDP), against 0.0569 and 0.0591 in two runs of disjoint examples (``A-fed-eps8``, PRV,
``history-len`` 20). About four times the examples, each with its most recent history,
outweigh 3.5x the noise multiplier: the batch per noise draw grows 4x too. It costs 4x the
compute per step. The default stays ``disjoint`` (no group factor, any accountant, what every
other run here uses); the README has the numbers.

Mechanism: Poisson sampling at ``sample-rate`` q (Opacus ``DPDataLoader``), per-example clipping
to ``max-grad-norm`` C, Gaussian noise ``sigma * C`` on the clipped sum (Opacus ``DPOptimizer``),
``local-steps`` steps per round. The accountant's history ``[(sigma, q, steps), ...]`` persists
across rounds in a :class:`BudgetStore`; epsilon is always the whole history's. sigma is
calibrated ONCE from the budget over the planned rounds (``FedConfig.rounds_planned``); a round
that would take epsilon over the budget is refused before any data is touched.

Randomness: Poisson sampling and the Gaussian noise use a generator seeded from OS entropy
(``secrets``), never from the run config, which the server knows. It is PyTorch's Mersenne
Twister, not a cryptographic generator (Opacus' ``secure_mode`` needs torchcsprng, not installed):
the privacy statement says so.

What this does NOT protect (stated in the run's privacy statement): the number of examples and the
mean loss reported in the reply metrics, and profile text (used as a feature of every example of
that user when ``use-profile`` is on).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import TensorDataset

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.model.candidates import CandidateScorer, candidate_loss, sample_candidates
from fedrec.shared.model.examples import disjoint_examples, sequence_examples
from fedrec.shared.privacy.accounting import Run, epsilon_spent, noise_for_budget


@dataclass
class ClientExamples:
    """A client's training examples: ``targets`` (n,), ``context`` (n, L), ``profile`` (n, dim)."""

    targets: np.ndarray
    context: np.ndarray
    profile: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def build_examples(
    users: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    slots: int,
    history_len: int,
    key: int,
    profiles: Sequence[torch.Tensor | None] | None = None,
    sequence: bool = False,
) -> ClientExamples:
    """Per user ``(items, timestamps)`` in time order -> disjoint examples (see module doc), or
    with ``sequence=True`` central training's sliding-window examples (under local DP: group
    privacy, ``FedConfig.dp_group``)."""
    targets, contexts, profs = [], [], []
    for u, (items, times) in enumerate(users):
        if sequence:
            _, t, c = sequence_examples([items], history_len)
        else:
            t, c = disjoint_examples(items, times, slots=slots, history_len=history_len, key=key)
        targets.append(t)
        contexts.append(c)
        if profiles is not None:
            p = profiles[u]
            profs.extend([p] * t.shape[0]) if p is not None else None
    prof = torch.stack(profs) if profiles is not None and profs else None
    if not targets:
        return ClientExamples(np.zeros(0, np.int64), np.zeros((0, history_len), np.int64))
    return ClientExamples(np.concatenate(targets), np.concatenate(contexts), prof)


# --- the persistent privacy state --------------------------------------------------------------
class BudgetStore(Protocol):
    """Where a client keeps its accountant history between rounds (and process restarts)."""

    def load(self) -> list[Run]: ...

    def save(self, history: list[Run]) -> None: ...


@dataclass
class MemoryStore:
    """Simulation: the history lives in Flower's ``Context.state`` (see ``client.app``)."""

    history: list[Run] = field(default_factory=list)

    def load(self) -> list[Run]:
        return list(self.history)

    def save(self, history: list[Run]) -> None:
        self.history = list(history)


@dataclass
class FileStore:
    """Deployment: a JSON file on the device, replaced atomically (never half-written)."""

    path: Path

    def load(self) -> list[Run]:
        if not self.path.exists():
            return []
        try:
            raw = json.loads(self.path.read_text())
            return [(float(s), float(q), int(n)) for s, q, n in raw["history"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"privacy state file {self.path} is unreadable ({err}); refusing to train: a "
                "lost accountant would restart epsilon from zero. Restore it from a backup."
            ) from None

    def save(self, history: list[Run]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".budget-")
        with os.fdopen(fd, "w") as f:
            json.dump({"history": [list(r) for r in history]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# --- one round ----------------------------------------------------------------------------------
@dataclass
class RoundResult:
    trained: bool
    examples: int
    steps: int
    loss: float
    epsilon: float  # after this round (whole history); 0 without DP
    noise_multiplier: float
    sample_rate: float
    reason: str = ""  # why the round was refused
    total_steps: int = 0  # DP steps in the client's whole history after this round
    history: list[Run] = field(default_factory=list)  # the accountant history after this round


_SIGMA: dict[tuple[Any, ...], float] = {}


def calibrated_noise(cfg: FedConfig) -> float:
    """sigma for the budget over the planned rounds (or the configured fixed value)."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    key = (
        cfg.epsilon,
        cfg.delta,
        cfg.sample_rate,
        cfg.local_steps,
        cfg.rounds_planned(),
        cfg.accountant,
        cfg.dp_group(),
    )
    if key not in _SIGMA:
        _SIGMA[key] = noise_for_budget(
            epsilon=cfg.epsilon,
            delta=cfg.delta,
            sample_rate=cfg.sample_rate,
            steps=cfg.local_steps * cfg.rounds_planned(),
            accountant=cfg.accountant,
            group=cfg.dp_group(),
        )
    return _SIGMA[key]


def train_round(
    scorer: CandidateScorer,
    data: ClientExamples,
    cfg: FedConfig,
    store: BudgetStore,
    *,
    seed: int,
) -> RoundResult:
    """Train ``scorer``'s parameters in place for one round; update ``store`` when DP is on."""
    q, steps = cfg.sample_rate, cfg.local_steps
    history = store.load()
    sigma = calibrated_noise(cfg) if cfg.dp else 0.0
    if cfg.dp:
        after = epsilon_spent(
            history=[*history, (sigma, q, steps)],
            delta=cfg.delta,
            accountant=cfg.accountant,
            group=cfg.dp_group(),
        )
        if after > cfg.epsilon:
            spent = epsilon_spent(
                history=history, delta=cfg.delta, accountant=cfg.accountant, group=cfg.dp_group()
            )
            return RoundResult(
                False,
                len(data),
                0,
                math.nan,
                spent,
                sigma,
                q,
                reason=f"budget: epsilon would reach {after:.3f} > {cfg.epsilon} "
                f"(spent {spent:.3f} at delta={cfg.delta})",
                total_steps=_total_steps(history),
                history=list(history),
            )
    if len(data) == 0:
        spent = epsilon_spent(
            history=history, delta=cfg.delta, accountant=cfg.accountant, group=cfg.dp_group()
        )
        return RoundResult(
            False,
            0,
            0,
            math.nan,
            spent if cfg.dp else 0.0,
            sigma,
            q,
            reason="no training examples",
            total_steps=_total_steps(history),
            history=list(history),
        )
    gen = torch.Generator().manual_seed(seed)  # negatives: public, may be reproducible
    # Sampling and noise must be unpredictable to anyone who knows the config (the server does):
    # their generator is seeded from OS entropy, never from `seed`.
    secret = torch.Generator().manual_seed(secrets.randbits(63))
    dataset = TensorDataset(
        torch.as_tensor(data.context),
        torch.as_tensor(data.targets),
        *([data.profile] if data.profile is not None else []),
    )
    loader = DPDataLoader(dataset, sample_rate=q, generator=secret)  # Poisson sampling
    id_emb = scorer.id_emb
    if cfg.dp and id_emb is not None:
        raise ValueError(
            "local DP-SGD cannot train the per-item ID table (id-residual=true): set dp=false"
        )
    params = [p for p in scorer.parameters() if p.requires_grad and p is not id_emb]
    groups: list[dict[str, Any]] = [{"params": params}]
    if id_emb is not None:
        groups.append({"params": [id_emb], "lr": cfg.id_lr()})
    # Adam's moments start fresh each round: they are computed from privatized gradients only
    # (post-processing), and nothing but the adapter travels.
    base_opt: torch.optim.Optimizer = (
        torch.optim.Adam(groups, lr=cfg.lr)
        if cfg.local_opt == "adam"
        else torch.optim.SGD(groups, lr=cfg.lr)
    )
    module: torch.nn.Module = scorer
    accountant = None
    if cfg.dp:
        module = GradSampleModule(scorer, loss_reduction="mean")
        dp_opt = DPOptimizer(
            base_opt,
            noise_multiplier=sigma,
            max_grad_norm=cfg.max_grad_norm,
            expected_batch_size=max(1, round(q * len(data))),
            loss_reduction="mean",
            generator=secret,
        )
        accountant = RDPAccountant() if cfg.accountant == "rdp" else PRVAccountant()
        accountant.history = list(history)
        dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
        opt: torch.optim.Optimizer = dp_opt
    else:
        opt = base_opt
    module.train()
    losses, done = [], 0
    try:
        while done < steps:
            for batch in loader:
                if done >= steps:
                    break
                loss = _step(module, opt, batch, scorer.n_items, cfg, gen)
                if loss is not None:
                    losses.append(loss)
                done += 1
    finally:
        if isinstance(module, GradSampleModule):
            module._close()  # remove Opacus hooks: the scorer is reused next round
    eps, runs = 0.0, list(history)
    if accountant is not None:
        runs = [(float(s), float(q), int(n)) for s, q, n in accountant.history]
        store.save(runs)
        # the same RDP maths as accountant.get_epsilon, memoized (tests/test_privacy.py)
        eps = epsilon_spent(
            history=runs, delta=cfg.delta, accountant=cfg.accountant, group=cfg.dp_group()
        )
    loss_mean = float(np.mean(losses)) if losses else math.nan
    total = _total_steps(runs)
    return RoundResult(
        True, len(data), done, loss_mean, eps, sigma, q, total_steps=total, history=runs
    )


def _total_steps(history: list[tuple[float, float, int]]) -> int:
    """Steps in an accountant history. (Opacus merges consecutive steps with the same (sigma, q)
    into one entry, so the number of entries is not the number of rounds.)"""
    return sum(int(n) for _s, _q, n in history)


def _step(
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: list[torch.Tensor],
    n_items: int,
    cfg: FedConfig,
    gen: torch.Generator,
) -> float | None:
    """One (DP-)SGD step; an empty Poisson batch still takes a step (noise only under DP)."""
    context, targets = batch[0], batch[1]
    filled = (context >= 0).any(0).nonzero()  # drop context columns empty for the whole batch
    context = context[:, int(filled[0]) :] if filled.numel() else context[:, -1:]
    profile = batch[2] if len(batch) > 2 else None
    opt.zero_grad(set_to_none=True)
    if targets.shape[0] == 0:
        for p in (p for g in opt.param_groups for p in g["params"]):
            p.grad_sample = torch.zeros((0, *p.shape))  # nothing sampled: noise only
            p.grad = torch.zeros_like(p) if not isinstance(opt, DPOptimizer) else None
        opt.step()
        return None
    cands = sample_candidates(targets, n_items, cfg.negatives, gen)  # (batch, 1 + negatives)
    as_cold = None
    if cfg.cold_dropout > 0:
        as_cold = torch.rand(cands.shape, generator=gen) < cfg.cold_dropout
    with warnings.catch_warnings():
        # Opacus' backward hooks fire on modules whose inputs need no grad (the index tensors);
        # torch says so once per module. Expected with Opacus; nothing to fix on our side.
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        logits = module(context, cands, profile, as_cold)
        loss = candidate_loss(logits, context, cands)
        loss.backward()
    for p in opt.param_groups[0]["params"]:
        if isinstance(opt, DPOptimizer) and getattr(p, "grad_sample", None) is None:
            # unused this step (e.g. the profile gate with no profile): its gradient is 0
            p.grad_sample = torch.zeros((targets.shape[0], *p.shape))
    opt.step()
    return float(loss.item())
