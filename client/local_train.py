"""One client's round of local training with Opacus DP-SGD, spending its privacy budget.

Privacy unit: ONE INTERACTION (user, item, timestamp) of the client's data, add/remove adjacency.
Examples are built by :func:`fedrec.shared.model.examples.disjoint_examples`: each interaction is
hashed into exactly one example (as its target or as context), independently of every other
interaction. Adding or removing one interaction therefore adds or removes that example or
REPLACES it (its target or context changes): the example-level adjacency is replace-one
(``FedConfig.dp_adjacency``), and every epsilon is accounted for it
(:mod:`fedrec.shared.privacy.accounting`; ``tests/test_dp_training.py`` checks the mapping on
random histories). Each example's loss depends on that example and public data only: negatives
and cold-dropout masks are keyed on the example and a per-round secret
(:func:`fedrec.shared.model.candidates.keyed_candidates`), and the noised sum is divided by a
constant (:func:`batch_divisor`).

``examples=sequence`` builds central training's sliding-window examples instead: about four
times as many, with the most recent history as context. Without local DP (no DP, or user-level
DP only) that is all. With local DP one interaction changes up to ``k = 1 + 2 * history-len``
examples (its own, removed, and the next ``history-len``, whose contexts hold it: each a
replacement, two add/remove steps), so the guarantee per interaction is group privacy over k:
:func:`fedrec.shared.privacy.accounting.group_epsilon` turns the example-level RDP curve into
the interaction-level epsilon, the noise is calibrated for that, and every reported epsilon is
the interaction-level one (``FedConfig.dp_group``; the ledger records ``group_size``). The
ablations suite measures it against disjoint examples (results in ``simulations/results/``).

Mechanism: Poisson sampling at ``sample-rate`` q (Opacus' draws, :func:`poisson_batches`), per-
example clipping to ``max-grad-norm`` C, Gaussian noise ``sigma * C`` on the clipped sum (Opacus
``DPOptimizer``), ``local-steps`` steps per round. The client's
:class:`~fedrec.client.budget.Budget` (accountant history, mechanism, cap) persists across rounds
in a :class:`~fedrec.client.budget.BudgetStore`; epsilon is always the whole history's.
sigma is calibrated ONCE from the budget over the planned rounds (``FedConfig.rounds_planned``);
a round that would take epsilon over the budget is refused before any data is touched.

With ``dp-noise=server`` the client takes the same clipped step WITHOUT noise and the trusted
server adds ``sigma * C`` (times lr / divisor) once to the sum of all clients' changes
(:mod:`fedrec.server.interaction_dp`): the budget is charged exactly as here, for the noise the
server adds, and the statement says the server is trusted.

Randomness: Poisson sampling and the Gaussian noise use a generator seeded from OS entropy
(``secrets``), never from the run config, which the server knows. It is PyTorch's Mersenne
Twister, not a cryptographic generator (Opacus' ``secure_mode`` needs torchcsprng, not installed):
the privacy statement says so.

What this does NOT protect is listed in the run's privacy statement
(:mod:`fedrec.shared.privacy.statement`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from fedrec.client.budget import BUDGET_FAILURE, Budget, BudgetStore
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.model.candidates import (
    CandidateScorer,
    candidate_loss,
    keyed_candidates,
    shared_candidates,
    top_rows,
)
from fedrec.shared.model.examples import disjoint_examples, sequence_examples
from fedrec.shared.privacy.accounting import Run, epsilon_spent
from fedrec.shared.privacy.calibration import calibrated_noise


@dataclass
class ClientExamples:
    """A client's training examples: ``targets`` (n,), ``context`` (n, L), ``profile`` (n, dim)."""

    targets: np.ndarray
    context: np.ndarray
    profile: torch.Tensor | None = None
    users: int = 1  # how many users' data the client holds (public: it sets the divisor)

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
    return ClientExamples(np.concatenate(targets), np.concatenate(contexts), prof, len(users))


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
    # the round also paid for a release (the segment counts' run, charged with its steps)
    released: bool = False
    # dp-noise=secure: each trained parameter's step ``-lr * grad`` in float64 (the parameter
    # itself, its step), computed from the clipped, divided sum before the float32 update
    # rounds it (shared/privacy/secure_interaction.py); None otherwise
    steps64: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None


def spent(cfg: FedConfig, history: Sequence[Run]) -> float:
    """Interaction-level epsilon of ``history`` under ``cfg``'s mechanism."""
    return epsilon_spent(
        history=history,
        delta=cfg.delta,
        accountant=cfg.accountant,
        group=cfg.dp_group(),
        adjacency=cfg.dp_adjacency(),
    )


def batch_divisor(cfg: FedConfig, users: int) -> float:
    """What the clipped, noised gradient sum is divided by: a constant that does not depend on
    the client's data (the expected batch ``q * n`` would: one interaction that adds an example
    would rescale every other example's contribution, a change clipping does not bound).
    ``batch-divisor`` when set, else ``q * slots * users`` with the client's sampling rate q
    (:meth:`FedConfig.client_sample_rate`): the expected batch if each of the client's users
    filled every slot. ``users`` (how many people's data the client
    holds) is public here: the guarantee is per interaction."""
    if cfg.batch_divisor > 0:
        return cfg.batch_divisor
    return max(1.0, cfg.client_sample_rate(users) * cfg.slots * max(1, users))


_log = logging.getLogger(__name__)

# A device's local-DP round refused by its cap (with its secure per-interaction record counted):
# the figures go to its own log, not to the server.
DEVICE_BUDGET_REFUSAL = (
    "budget: this round would pass this device's per-interaction cap (the device's own log "
    "says by how much)"
)


class _Refused(Exception):
    """A round the budget cannot take: why, the epsilon spent so far, the history it holds."""

    def __init__(self, reason: str, epsilon: float, history: list[Run]) -> None:
        super().__init__(reason)
        self.reason, self.epsilon, self.history = reason, epsilon, list(history)


def with_steps(history: list[Run], sigma: float, q: float, steps: int) -> list[Run]:
    """``history`` after ``steps`` more DP-SGD steps at (``sigma``, ``q``), written as Opacus'
    ``RDPAccountant.step`` writes it (consecutive steps at the same (sigma, q) share one entry),
    so the charge made before a round equals the accountant's history after it."""
    out = [(float(s), float(r), int(n)) for s, r, n in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + steps)
    else:
        out.append((float(sigma), float(q), int(steps)))
    return out


def _refusal(
    reason: str, data: ClientExamples, eps: float, sigma: float, q: float, history: list[Run]
) -> RoundResult:
    return RoundResult(
        False,
        len(data),
        0,
        math.nan,
        eps,
        sigma,
        q,
        reason=reason,
        total_steps=_total_steps(history),
        history=list(history),
    )


def train_round(
    scorer: CandidateScorer,
    data: ClientExamples,
    cfg: FedConfig,
    store: BudgetStore,
    *,
    seed: int,
    device_cap: float | None = None,
    release: Run | None = None,
    spent_elsewhere: Callable[[], float] | None = None,
) -> RoundResult:
    """Train ``scorer``'s parameters in place for one round; update ``store`` when DP is on.

    ``seed`` is derived from the run config, which the server knows: under DP it seeds nothing
    (sampling, noise, negatives and cold-dropout masks all come from OS entropy drawn here);
    without DP it keys the negatives, so that a run without DP repeats exactly.
    ``device_cap``: the device owner's own epsilon cap (node config ``epsilon-max``); without
    it the cap stored with the budget (the first run's budget) holds. The client trains only
    while the whole history stays within ``min(epsilon, cap)``, whatever the server asks.
    Under DP the round's steps are charged to ``store`` before any data is touched (the cap
    checked again on what the store holds, under a device file's lock): a round that fails
    after that still counts. After training, the steps Opacus' accountant recorded must equal
    the charge; if they do not (a bug), they are charged on top and RuntimeError raised.
    ``spent_elsewhere``: a device's epsilon for the same unit spent outside this history (its
    secure per-interaction record, :mod:`fedrec.client.interaction_budget`), read where the cap
    is checked (for a device's file: under its lock) and added to the history's epsilon
    there (basic composition).
    ``release``: a release this round also makes (the segment counts, under local DP: the run
    it is charged as), checked against the cap and charged with the round's steps, in the same
    update; the result's ``released`` says it was charged (the caller then makes it).
    """
    q, steps = cfg.client_sample_rate(data.users), cfg.local_steps
    budget = store.load()
    history = budget.history
    sigma = calibrated_noise(cfg, q) if cfg.dp else 0.0
    mech = cfg.dp_mechanism()

    eps_after: list[float] = []  # the history's epsilon with this round, once checked
    if release is not None and not cfg.dp:
        raise ValueError("a release is charged only under local DP (dp=true)")

    def with_release(history: list[Run]) -> list[Run]:
        return [*history, release] if release is not None else history

    def over(b: Budget) -> _Refused | None:
        """Why ``b`` cannot take this round (mechanism or cap), or None."""
        if b.history and b.mechanism != mech:
            return _Refused(
                f"mechanism: this client's {_total_steps(b.history)} DP steps were spent under "
                f"{b.mechanism}, this run accounts {mech}; one history cannot mix them",
                math.nan,
                b.history,
            )
        if cfg.dp_noise == "secure" and _total_steps(b.history) + steps > cfg.num_rounds:
            # the Skellam noise is planned for num-rounds releases: count them exactly (the
            # Gaussian epsilon below is the trusted-server version's, a second, looser cap)
            return _Refused(
                f"rounds: this client has trained in {_total_steps(b.history)} rounds, the "
                f"secure noise is planned for num-rounds = {cfg.num_rounds}",
                spent(cfg, b.history),
                b.history,
            )
        cap = device_cap if device_cap is not None else b.epsilon_max
        limit = min(cfg.epsilon, cap) if cap is not None else cfg.epsilon
        after = spent(cfg, with_release(with_steps(b.history, sigma, q, steps)))
        eps_after[:] = [after]
        other = spent_elsewhere() if spent_elsewhere is not None else 0.0
        if not after + other <= limit:  # a NaN refuses
            before = spent(cfg, b.history)
            if spent_elsewhere is not None:
                # a device: the reply carries its history, from which the server would read
                # the other record's epsilon back out of a figure; the figures stay here
                _log.warning(
                    "local DP round refused: epsilon would reach %.4g (%.4g of it spent in "
                    "secure rounds) > %g",
                    after + other,
                    other,
                    limit,
                )
                return _Refused(DEVICE_BUDGET_REFUSAL, before, b.history)
            return _Refused(
                f"budget: epsilon would reach {after:.3f} > {limit} "
                f"(spent {before:.3f} at delta={cfg.delta})",
                before,
                b.history,
            )
        return None

    if cfg.dp and cfg.max_batch > 0:  # FedConfig refuses this; never cap a local-DP batch
        raise ValueError("max-batch > 0 with local DP-SGD: a capped batch is not a Poisson sample")
    if cfg.dp and scorer.id_emb is not None:
        raise ValueError(
            "local DP-SGD cannot train the per-item ID table (id-residual=true): set dp=false"
        )
    if len(data) == 0:
        if cfg.dp and (no := over(budget)) is not None:  # the budget's reason comes first
            return _refusal(no.reason, data, no.epsilon, sigma, q, no.history)
        return _refusal(
            "no training examples", data, spent(cfg, history) if cfg.dp else 0.0, sigma, q, history
        )
    charged: list[Run] = []
    if cfg.dp:
        # Charge the round's steps before any data is touched, checking the cap on what the
        # store holds now: for a device, under the lock on its file, so another run on it can
        # neither lose these steps (read before, written after this round) nor pass the cap
        # with it. A round that fails after this still counts: an over-count, never an under.
        def charge(b: Budget) -> Budget:
            if (no := over(b)) is not None:
                raise no
            # the device's cap: the owner's, else the one stored, else this (first) run's
            keep = device_cap if device_cap is not None else b.epsilon_max
            keep = cfg.epsilon if keep is None else keep
            return Budget(with_release(with_steps(b.history, sigma, q, steps)), mech, keep)

        try:
            charged = store.update(charge).history
        except _Refused as no:
            return _refusal(no.reason, data, no.epsilon, sigma, q, no.history)
    # Sampling, noise, negatives and masks must be unpredictable to anyone who knows the config
    # (the server does): all come from OS entropy, never from `seed`.
    secret = torch.Generator().manual_seed(secrets.randbits(63))
    key = secrets.token_bytes(32) if cfg.dp else seed.to_bytes(16, "little", signed=True)
    tensors = [
        torch.as_tensor(data.context),
        torch.as_tensor(data.targets),
        *([torch.as_tensor(data.profile)] if data.profile is not None else []),
    ]
    batches = poisson_batches(tensors, q, secret)
    # the per-item tables and the user map, each at its own step size: post-processing of the
    # same (clipped, noised) gradient
    own_lr = [
        (scorer.id_emb, cfg.id_lr()),
        (scorer.user_map.weight if scorer.user_map is not None else None, cfg.map_lr()),
        (scorer.off.weight if scorer.off is not None else None, cfg.offsets_lr()),
        (scorer.fac.weight if scorer.fac is not None else None, cfg.factors_lr()),
    ]
    own = [p for p, _ in own_lr if p is not None]
    params = [p for p in scorer.parameters() if p.requires_grad and all(p is not q for q in own)]
    groups: list[dict[str, Any]] = [{"params": params}]
    groups += [{"params": [p], "lr": lr} for p, lr in own_lr if p is not None]
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
        # Opacus divides the noised sum by expected_batch_size; "sum" reduction of the loss
        # below keeps each example's gradient its own (no division by the batch it sits in)
        module = GradSampleModule(scorer, loss_reduction="sum")
        dp_opt = DPOptimizer(
            base_opt,
            # dp-noise=server: the step is the clipped sum without noise; the (trusted) server
            # adds sigma * C once to the sum of every client's change (server/interaction_dp.py)
            # dp-noise=secure: the clients add Skellam shares inside the secure sum instead
            noise_multiplier=0.0 if cfg.dp_noise in ("server", "secure") else sigma,
            max_grad_norm=cfg.max_grad_norm,
            expected_batch_size=batch_divisor(cfg, data.users),
            loss_reduction="mean",
            generator=secret,
        )
        # the accountant records this round's (sigma, q) per step; fedrec computes epsilon
        # itself, from the charged history
        accountant = RDPAccountant()
        dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
        opt: torch.optim.Optimizer = dp_opt
    else:
        opt = base_opt
    module.train()
    if not cfg.dp and scorer.tower is not None and scorer.id_emb is None:
        scorer.tower.start_round()  # many clients of a round in one process: see its doc
    # factor-rows: only the rows of the items the global bias ranks highest train; the others
    # get no per-example gradient (CandidateScorer detaches them) and are put back after every
    # step, which discards the noise DP-SGD added there (post-processing)
    losses, done = [], 0
    steps64: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None
    try:
        held = select_rows(scorer, cfg.factor_rows)
        while done < steps:
            batch = capped(next(batches), cfg.max_batch, secret)
            loss = _step(module, opt, batch, scorer.n_items, cfg, key, done)
            restore_rows(scorer, held)
            if loss is not None:
                losses.append(loss)
            done += 1
        if cfg.dp and cfg.dp_noise == "secure":
            steps64 = secure_steps(opt, steps)
    finally:
        scorer.rows = None
        if isinstance(module, GradSampleModule):
            module._close()  # remove Opacus hooks: the scorer is reused next round
    eps, runs = 0.0, list(history)
    if accountant is not None:
        took = [(float(s), float(q), int(n)) for s, q, n in accountant.history]
        # the optimizer's own noise: sigma, or 0 when the server adds it (dp-noise=server)
        if took != with_steps([], dp_opt.noise_multiplier, q, steps):  # other steps: a bug
            bug = f"local DP-SGD took the steps {took} but {steps} at ({sigma}, {q}) were charged"
            # never leave an under-count: the steps the accountant recorded go on top
            try:
                store.update(lambda b: Budget([*b.history, *took], b.mechanism, b.epsilon_max))
            except Exception as err:  # the bug must still be told, with why the top-up failed
                # a device's budget-file error is a constant that says the round is refused:
                # here the round has trained, so say only that the file could not be written
                why = (
                    "the budget file cannot be written (the device's own log says why)"
                    if str(err) == BUDGET_FAILURE
                    else str(err)
                )
                raise RuntimeError(
                    f"{bug} to the budget: an accounting bug; adding the steps taken to the "
                    f"budget failed too: {why}; nothing this round trained is sent"
                ) from None
            raise RuntimeError(
                f"{bug} to the budget: an accounting bug; the budget now holds both (an over-count)"
            )
        runs, eps = charged, eps_after[0]  # the charge's history and epsilon, checked above
    loss_mean = float(np.mean(losses)) if losses else math.nan
    total = _total_steps(runs)
    return RoundResult(
        True,
        len(data),
        done,
        loss_mean,
        eps,
        sigma,
        q,
        total_steps=total,
        history=runs,
        released=release is not None,
        steps64=steps64,
    )


def select_rows(scorer: CandidateScorer, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """With ``factor-rows`` n > 0: set ``scorer.rows`` to :func:`top_rows` of the bias the
    round starts from and return each per-item table (factors, offsets) with a copy of its
    values, for :func:`restore_rows`; n = 0: every row trains, nothing held."""
    tables = [m.weight for m in (scorer.fac, scorer.off) if m is not None]
    if n <= 0 or not tables:
        scorer.rows = None
        return []
    if scorer.bias is None:
        raise ValueError("factor-rows > 0 needs the learned item bias (item-bias = true)")
    scorer.rows = top_rows(scorer.bias.weight, n)
    return [(w, w.detach().clone()) for w in tables]


@torch.no_grad()
def restore_rows(scorer: CandidateScorer, held: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put every per-item table's unselected rows back to the values the round started from."""
    if not held or scorer.rows is None:
        return
    off = ~scorer.rows
    for w, start in held:
        w[off] = start[off]


def poisson_batches(
    tensors: Sequence[torch.Tensor], q: float, gen: torch.Generator
) -> Iterator[list[torch.Tensor]]:
    """Endless Poisson batches of the rows of ``tensors``: each row independently with
    probability ``q`` at every step, drawn from ``gen``: the draw of the sampler Opacus'
    ``DPDataLoader`` uses (``UniformWithReplacementSampler``: ``torch.rand(n, generator=gen) <
    q`` per step; the same batches from the same generator state, a test checks it), but one
    index per tensor instead of a dataset lookup and a collate per example (about 3 ms of a
    one-user client's round of sliding windows). The loader's stream is not the same one: torch's
    DataLoader also takes a seed from the generator each time it starts an epoch; the
    distribution of every batch is. An empty draw is a batch of 0 rows."""
    n = int(tensors[0].shape[0])
    if any(int(t.shape[0]) != n for t in tensors):
        raise ValueError(f"poisson_batches: tensors of {[int(t.shape[0]) for t in tensors]} rows")
    while True:
        idx = (torch.rand(n, generator=gen) < q).nonzero().reshape(-1)
        yield [t[idx] for t in tensors]


def capped(batch: list[torch.Tensor], cap: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``batch`` cut to a uniformly random subset of ``cap`` examples when it has more (``cap``
    0: as is). Only without local DP-SGD (FedConfig refuses ``max-batch`` with ``dp``): the
    subset is not a Poisson sample. ``gen`` is the round's secret generator."""
    n = int(batch[1].shape[0])
    if cap <= 0 or n <= cap:
        return batch
    keep = torch.randperm(n, generator=gen)[:cap].sort().values
    return [t[keep] for t in batch]


def secure_steps(
    opt: torch.optim.Optimizer, steps: int
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """dp-noise=secure: each parameter's step of the round's one plain SGD step, ``-lr *
    grad`` in float64, where ``grad`` is what the optimizer stepped with (the clipped sum
    divided by the public divisor; no noise). Computed here, not as the difference of two
    float32 models, whose rounding depends on the weights and is not within ``lr C / D``.
    RuntimeError for anything but one step of plain SGD (the plan refuses such configs)."""
    if steps != 1 or not isinstance(opt, DPOptimizer):
        raise RuntimeError("dp-noise=secure takes exactly one DP-SGD step a round")
    base = opt.original_optimizer
    if type(base) is not torch.optim.SGD:
        raise RuntimeError("dp-noise=secure steps with plain SGD only")
    out = []
    for group in opt.param_groups:
        if group.get("momentum", 0) or group.get("weight_decay", 0):
            raise RuntimeError("dp-noise=secure steps with plain SGD (no momentum, no decay)")
        for p in group["params"]:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            out.append((p, -float(group["lr"]) * grad.detach().double()))
    return out


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
    key: bytes,
    step: int,
) -> float | None:
    """One (DP-)SGD step on a logical (Poisson) batch; an empty batch still takes a step (noise
    only under DP).

    Under DP each example's loss is summed, not averaged, so its per-example gradient is its
    own (``DPOptimizer`` divides the noised sum by :func:`batch_divisor`); its negatives and
    masks come from :func:`keyed_candidates` (a function of the example, ``key`` and ``step``)
    or :func:`shared_candidates` (of ``key`` and ``step``; a target's flag of its own item).

    Memory: the batch goes through forward/backward in physical batches of at most
    ``physical-batch`` examples. Under DP each physical batch's per-example gradients are
    clipped and added to the running sum (Opacus' ``signal_skip_step``: no noise, no update),
    and the noise is added once, at the last one: the same step, and the same accountant step,
    as one pass. Without DP each part's mean loss is weighted by its share of the batch.
    """
    targets = batch[1]
    opt.zero_grad(set_to_none=True)
    n = int(targets.shape[0])
    if n == 0:
        for p in (p for g in opt.param_groups for p in g["params"]):
            p.grad_sample = torch.zeros((0, *p.shape))  # nothing sampled: noise only
            p.grad = torch.zeros_like(p) if not isinstance(opt, DPOptimizer) else None
        opt.step()
        return None
    dp = isinstance(opt, DPOptimizer)
    size = cfg.physical_batch if 0 < cfg.physical_batch < n else n
    total, parts = 0.0, 0
    for start in range(0, n, size):
        parts += 1
        part = [t[start : start + size] for t in batch]
        m = int(part[1].shape[0])
        last = start + size >= n
        loss = batch_loss(module, part, n_items, cfg, key=key, step=step, summed=dp)
        total += float(loss.item()) * (1 if dp else m)
        if not dp and size < n:
            loss = loss * (m / n)  # the mean over the whole batch
        with quiet_opacus_hooks():
            loss.backward()
        if dp:
            for p in (p for g in opt.param_groups for p in g["params"]):
                if getattr(p, "grad_sample", None) is None:
                    # unused this step (e.g. the profile gate with no profile): its gradient is 0
                    p.grad_sample = torch.zeros((m, *p.shape))
            assert isinstance(opt, DPOptimizer)
            if not last:
                # clip this part's per-example gradients into the running sum; no noise yet
                opt.signal_skip_step(do_skip=True)
                opt.step()
                opt.zero_grad(set_to_none=True)  # keeps the clipped sum, drops the rest
    opt.step()
    if parts == 1:  # one pass: the batch's own loss, as computed
        return float(loss.item()) / (n if dp else 1)
    return total / n


def batch_loss(
    module: torch.nn.Module,
    batch: list[torch.Tensor],
    n_items: int,
    cfg: FedConfig,
    *,
    key: bytes,
    step: int,
    summed: bool,
) -> torch.Tensor:
    """The loss of a non-empty batch ``[context, targets, (profile)]``: summed over examples
    (DP: each per-example gradient is that example's own) or averaged (no DP)."""
    context, targets = batch[0], batch[1]
    filled = (context >= 0).any(0).nonzero()  # drop context columns empty for the whole batch
    context = context[:, int(filled[0]) :] if filled.numel() else context[:, -1:]
    profile = batch[2] if len(batch) > 2 else None
    if cfg.negative_sampling == "shared":  # one set per step: far fewer items to embed
        cands, as_cold = shared_candidates(
            targets,
            n_items=n_items,
            negatives=cfg.negatives,
            key=key,
            step=step,
            cold_dropout=cfg.cold_dropout,
        )
    else:
        cands, as_cold = keyed_candidates(  # (batch, 1 + negatives) each
            targets,
            context,
            n_items=n_items,
            negatives=cfg.negatives,
            key=key,
            step=step,
            cold_dropout=cfg.cold_dropout,
        )
    with quiet_opacus_hooks():
        logits = module(context, cands, profile, as_cold)
    return candidate_loss(logits, context, cands, reduction="sum" if summed else "mean")


@contextlib.contextmanager
def quiet_opacus_hooks() -> Iterator[None]:
    """Opacus' backward hooks fire on modules whose inputs need no grad (the index tensors);
    torch says so once per module. Expected with Opacus; nothing to fix on our side."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        yield
