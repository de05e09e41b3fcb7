"""The federation's run config: one typed, validated object, parsed once.

Flower reads ``[tool.flwr.app.config]`` in ``pyproject.toml`` (kebab-case keys, overridable with
``flwr run . --run-config 'num-rounds=5'``); ``fedrec simulate --set num-rounds=5`` takes the same
keys. :func:`parse_run_config` turns either into a :class:`FedConfig`: unknown keys and
out-of-range values raise ``ValueError`` naming the key; settings that will be ignored warn.

The server sends the resolved config to every client in each round's ``ConfigRecord``, so a client
(simulated or on a device) trains with exactly the server's settings; only its data location
comes from its own node config.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedrec.shared.model.config import ModelConfig
from fedrec.shared.settings import SettingWarning, parse_fields

AGGREGATORS = ("ffa", "fedavg")


def _need(cond: bool, key: str, value: object, rule: str) -> None:
    if not cond:
        raise ValueError(f"run config '{key}' = {value!r} is invalid: {rule}")


DROPOUT_STAGES = ("share", "masked", "unmask")  # secagg-test-dropout stages


@dataclass(frozen=True)
class FedConfig:
    """Everything a federated run needs. Field ``a_b`` is run-config key ``a-b``.

    Privacy (local DP-SGD, per client): ``epsilon``/``delta`` is each client's budget; the noise
    multiplier is calibrated so that ``planned-rounds`` rounds of ``local-steps`` Poisson-sampled
    steps at ``sample-rate`` spend exactly that budget (``planned-rounds`` = 0: the 99th
    percentile of the number of rounds a client is sampled for, given ``num-rounds`` and
    ``fraction-train``). ``noise-multiplier`` > 0 fixes it instead. A client never exceeds its
    budget: when the next round would, it refuses to train.
    """

    # --- data ---
    data: str = "ml-100k"  # a data set name in the data home (ml-100k) or a data folder
    protocol: str = "A"  # evaluation protocol: A (warm), B (cold items), C (cold users)
    partition: str = "user"  # one user per client, or "silo" (K silos of whole users)
    silos: int = 20  # number of silos with partition=silo
    seed: int = 0  # seed of the partition, the model's init and the clients' sampling
    # --- model (see ModelConfig) ---
    backbone: str = "minilm"  # minilm (the built-in default), smollm2, or a local HF model folder
    aggregator: str = "ffa"  # ffa (FFA-LoRA: A frozen, only B travels) or fedavg (A and B averaged)
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r)
    max_length: int = 24  # tokens per item text
    history_len: int = 20  # most recent items the user tower reads
    use_profile: bool = False  # read the user's profile text (not covered by per-interaction DP)
    item_bias: bool = True  # a learned per-item score offset
    # a learned per-item vector added to the text embedding of warm items (central training's
    # default, ``model.id_residual``): an (n_items, dim) table that travels each round, about
    # 2.6 MB on ML-100K with MiniLM. Without local DP and without user-level DP only: DP-SGD
    # would need per-example gradients and noise on every one of its values.
    id_residual: bool = False
    lr_id: float = 0.0  # the table's SGD learning rate; 0 = ``lr``
    # k > 0: a learned k-vector per item and the score term <sum_j w_j f_{h_j}, f_i> (low-rank
    # item-item factors, see ModelConfig.item_factors): n_items * k numbers that travel each
    # round (k = 8: 13,456 on ML-100K), so unlike the ID table usable under DP
    item_factors: int = 0
    factor_init: float = 0.1  # the std of the factors' seeded random init
    # the item factors' local learning rate; 0 = ``lr``. A step size of their own is
    # post-processing of the same (clipped, noised) gradient: under local DP-SGD it costs no
    # privacy; under user-level DP the client's whole change is clipped after local training
    lr_factors: float = 0.0
    # with item-factors and use-profile: the profile also enters the factor space through a
    # learned k x dim map (a rank-k profile-by-item preference; ModelConfig.profile_factors)
    profile_factors: bool = False
    # k > 0: a learned k-vector per item, zero at init, and the score term <P^T u, g_i> (P the
    # catalog text embeddings' top-k principal directions, public; ModelConfig.item_offsets):
    # linear in the table, so it learns from the first step; n_items * k numbers travel
    item_offsets: int = 0
    # the item offsets' local learning rate; 0 = ``lr`` (under user-level DP the client's whole
    # change is clipped after local training, whatever the step sizes; under local DP-SGD it
    # steps on the same clipped, noised gradient: post-processing)
    lr_offsets: float = 0.0
    # n > 0, with item-factors or item-offsets: a round trains the per-item rows of only the n
    # items with the highest learned item bias in the global model it starts from (a released
    # model: post-processing, no privacy cost; none in a round whose global bias is still
    # constant, as before the first aggregation). The other rows get no gradient and no noise
    # and stay as they are: DP-FEST-style row selection (Ghazi et al. 2023), so DP-SGD's noise
    # lands only on rows with many examples. 0 = every row trains
    factor_rows: int = 0
    # r > 0: a learned rank-r map on the history part of the user vector, s -> s + (s P) Q
    # (ModelConfig.user_map): a transition from the items watched to the next one, r * dim
    # numbers that travel each round (r = 16: 6,144 with MiniLM; r * r with the catalog space),
    # shared by every example
    user_map: int = 0
    # where it maps: ``free`` (Q is r x dim) or ``catalog`` (s -> s + (s P) M P^T, P the catalog
    # text embeddings' top-r principal directions, public; M r x r: r^2 numbers travel)
    user_map_space: str = "free"
    # the user map's local learning rate; 0 = ``lr``. Its r x dim gradient is dense and large
    # next to the adapter's: at the adapter's lr its change would take most of a user-level
    # clip (norm 93 against 8 for LoRA B at lr 16, one measurement); a step size of its own is
    # post-processing of the same (clipped, noised) gradient, so it costs no privacy
    lr_map: float = 0.0
    # fraction of catalog items scored as if cold in training (protocol B)
    cold_dropout: float = 0.0
    # w > 0: after the last round the server gives every item never trained the bias its frozen
    # text embedding predicts, by a ridge regression onto the trained items' learned biases
    # (shared/model/cold_prior.py), times w: post-processing of the released model and the
    # public catalog, no privacy cost; 0 = cold items keep no bias
    cold_prior: float = 0.0
    # the encoder whose frozen text embeddings the cold prior regresses on: '' = the model's own
    # backbone (no adapter); or another backbone the server has (e.g. mpnet, after `fedrec
    # backbone fetch mpnet`): only the server reads it, over the public catalog texts, after the
    # last round (post-processing, no privacy cost); the clients never load it. A new item added
    # at serving time is then embedded by that encoder too
    cold_prior_backbone: str = ""
    # profile fields (a comma list of age, gender): clients that train in the run's first round
    # also send their interactions counted per (segment, item), with Gaussian noise of std
    # segment-noise per cell under local DP (charged to their budget: shared/federation/
    # segments.py); new users are then ranked by segment-weight x the log of the combined
    # counts' segment prior plus the model's score (the tables summed, or with robust
    # aggregation combined cell by cell). "" = none
    segment_prior: str = ""
    segment_noise: float = 2.0  # the release's noise multiplier (L2 sensitivity 1) under local DP
    # the prior's empirical-Bayes shrinkage toward global popularity (larger: less shrinkage)
    segment_shrink: float = 3.0
    segment_weight: float = 100.0  # w in w x log prior + the model's score, for new users
    # the most interactions one (segment, item) cell of a client's table can honestly count
    # (e.g. the most users a client holds, when no user has an item twice): a reply whose table
    # has a cell above it (plus 10 noise std under local DP) or below minus that margin is
    # rejected whole, update included. 0 = no bound beyond 1e12
    segment_cell_max: float = 0.0
    # --- rounds ---
    num_rounds: int = 20  # rounds of the federation
    fraction_train: float = 0.1  # fraction of the clients sampled each round
    min_replies: int = 2  # fewest accepted replies for a round to aggregate
    evaluate_every: int = 5  # central validation every N rounds (0 = only at the end)
    fraction_evaluate: float = 0.0  # federated evaluation on clients at the last round
    round_timeout: float = 600.0  # seconds the server waits for a round's replies
    # The server refuses (or, with update-norm-action=clip, scales down) a client's change to
    # the global tensors whose L2 norm exceeds this: one client cannot move the model
    # arbitrarily far (or overflow the float32 mean). Generous by default (local DP's noise
    # alone moves a one-user client's tensors by tens); lower it to bound poisoning.
    update_norm_max: float = 1e4
    update_norm_action: str = "reject"  # reject or clip a change above update-norm-max
    # How the server combines the accepted changes: "none" (their mean, FedAvg), or per
    # coordinate "trimmed-mean" (the trim-fraction largest and smallest values dropped) or
    # "median": robust to a minority of poisoned updates. With segment-prior the clients'
    # count tables are combined the same way, cell by cell. Not with user-dp (its noise is
    # calibrated for the mean's sensitivity).
    robust: str = "none"
    trim_fraction: float = 0.1  # with robust=trimmed-mean: fraction dropped at each end
    # SIMULATION ONLY, to measure robustness: "FRACTION:KIND:SCALE" makes every round(1 /
    # FRACTION)-th partition (p0, p10, ...) send a poisoned change after training honestly:
    # KIND "scale" sends SCALE x its change, "sign-flip" -SCALE x its change, "promote" its
    # honest change and, with segment-prior, its count table with round(SCALE) added to every
    # segment's cell of the catalog's last item (an item pushed to new users). "" = no attack.
    # A device (a SuperNode with data-dir) refuses a run that sets it.
    poison: str = ""
    server_opt: str = "sgd"  # how the server applies the mean client change: sgd|momentum|adam
    server_lr: float = 1.0  # the server optimizer's learning rate
    # the last round's server lr as a fraction of server-lr: < 1 decays it over num-rounds on
    # a cosine (round 1 at server-lr); 1 = constant
    server_lr_final: float = 1.0
    # > 0: the released model is an exponential moving average of the rounds' global models
    # (weight ema-decay per round, bias-corrected, the initial model left out); metrics.json
    # also scores the last round's model. Post-processing of the privatized rounds: no privacy
    # cost
    ema_decay: float = 0.0
    # --- local training ---
    local_steps: int = 8  # DP-SGD (or SGD) steps each sampled client takes per round
    local_opt: str = "sgd"  # the client's optimizer under DP-SGD's clipping and noise: sgd | adam
    # each client's Poisson sampling rate q; 0 = from expected-batch (below)
    sample_rate: float = 0.0
    lr: float = 1.0  # the clients' local learning rate
    negatives: int = 50  # sampled negative items per training example
    # "keyed": each example draws its own negatives (a hash of the example and a per-round
    # secret); "shared": one set per step for the whole batch (from the per-round secret and the
    # step only, never from the data). Both keep each example's loss a function of that example
    # and data-independent randomness; "shared" touches far fewer distinct items per step (the
    # item tower's cost), see fedrec.shared.model.candidates.shared_candidates.
    negative_sampling: str = "keyed"
    slots: int = 32  # training examples per user (disjoint examples)
    # what a DP client divides its noised gradient sum by: a constant, never the data's size
    # (0 = sample-rate * slots * the client's users; see client.local_train.batch_divisor)
    batch_divisor: float = 0.0
    # With sample-rate 0 (the default), each client samples at
    # q = min(1, expected-batch / (slots * its users)), from the public roster, never from the
    # data: a one-user client (q = 16 / 32 = 0.5) and a silo of hundreds of users both take
    # batches of about expected-batch examples; each client's sigma is calibrated for its own q,
    # which the ledger records. sample-rate > 0 fixes q for every client instead.
    expected_batch: int = 16
    # At most this many examples go through one forward/backward pass: a logical (Poisson)
    # batch is split into physical batches of this size, their clipped per-example gradients
    # summed, and the noise added once, so the DP step is the same and memory depends on this
    # bound, not on the data. 0 = no bound (one pass per logical batch).
    physical_batch: int = 16
    # Without local DP-SGD (user-level DP or no DP): the most examples one local step trains on;
    # a larger Poisson batch is cut to a uniformly random subset of this size (drawn from the
    # client's own OS randomness), so that a heavy user's step costs what a light user's does.
    # Under user-level DP the whole update is clipped, so any use of the user's data inside the
    # round is covered. Local DP-SGD refuses it (its accounting assumes Poisson batches).
    # 0 = no cap.
    max_batch: int = 0
    # how a client builds its training examples: "disjoint" (each interaction in exactly one
    # example, what makes per-example DP-SGD DP for the interaction) or "sequence" (central
    # training's sliding windows: every interaction a target, its ``history-len`` predecessors
    # the context; see fedrec.shared.model.examples). With local DP, "sequence" is accounted by
    # group privacy over the 1 + 2 * history-len examples one interaction can change
    # (``dp_group``), RDP accountant only.
    examples: str = "disjoint"
    # --- local DP-SGD ---
    dp: bool = True  # local DP-SGD on each client
    epsilon: float = 8.0  # each client's local DP budget (per interaction)
    delta: float = 1e-5  # each client's local DP delta
    # Who adds local DP-SGD's Gaussian noise. "client": each client noises its own clipped
    # gradient sum (protects against the server). "server": a TRUSTED server adds it once per
    # round to the sum of all clients' clipped, un-noised gradient sums, each client taking one
    # DP-SGD step per round at the same sample-rate and batch-divisor: central DP-SGD over the
    # union of the clients' examples (silos pooling one noise draw), accounted per interaction
    # exactly as a client's own steps are, but no protection against the server, which sees
    # every client's un-noised sum (server/interaction_dp.py). "secure": the same full-batch
    # step (sample-rate 1) with the noise added as Skellam shares by the clients inside a SecAgg+
    # sum (secure-agg=true): no trusted server (shared/privacy/secure_interaction.py).
    dp_noise: str = "client"
    max_grad_norm: float = 1.0  # per-example gradient clip (L2) of DP-SGD
    # pld: dp-accounting's privacy-loss distributions (tight for replace-one); prv: Opacus' PRV
    # numerics; rdp: Opacus' RDP (loose for replace-one: two add/remove steps)
    accountant: str = "pld"
    noise_multiplier: float = 0.0  # > 0 fixes DP-SGD's noise multiplier (0 = calibrated)
    planned_rounds: int = 0  # rounds a client budgets for (0 = from num-rounds, fraction-train)
    # user-level DP (DP-FedAvg, Flower's DifferentialPrivacyServerSideFixedClipping wrapper):
    # each client's whole update is clipped to ``user-clip`` (L2) on the server, the sum over the
    # round's fixed sample is divided by the sample size and Gaussian noise of std
    # ``z * user-clip / sample`` is added. ``z`` is calibrated so that ``num-rounds`` releases,
    # accounted with no sampling amplification, spend (``user-epsilon``, ``user-delta``);
    # ``user-noise-multiplier`` > 0 fixes it instead. Unit: one client (= one user with
    # partition=user; a whole silo with partition=silo).
    user_dp: bool = False
    user_clip: float = 1.0  # user-level DP: L2 clip of each client's whole update
    user_epsilon: float = 8.0  # user-level DP: epsilon per client over the run
    user_delta: float = 1e-5  # user-level DP: delta (below 0.01 / clients for 943 users)
    user_noise_multiplier: float = 0.0  # user-level DP: > 0 fixes the noise multiplier
    # secure aggregation with distributed DP (needs user-dp=true): no trusted server. Each client
    # clips its whole update to ``user-clip``, rounds it to integers, adds its share of Skellam
    # noise and masks it (SecAgg+, server/secure_agg.py); the server only ever sees the noisy sum.
    secure_agg: bool = False
    secagg_bits: int = 32  # secure aggregation: the sum is taken modulo 2**bits
    secagg_neighbours: int = 0  # SecAgg+ neighbours per client (0 = from the cohort size; even)
    # secure aggregation: the largest fraction of a round's cohort that may drop out; a round
    # with fewer survivors is not released (the noise is calibrated for that many shares)
    secagg_dropout: float = 0.1
    # secure aggregation: fraction of all connected clients (rounded up) assumed to collude with
    # the server, all assumed to be in every cohort; their noise shares are not counted
    secagg_colluders: float = 0.05
    # SIMULATION ONLY, to test dropout recovery: "FRACTION:STAGE" makes every round(1 /
    # FRACTION)-th partition (p0, p5, ...) fail at secure-aggregation stage STAGE (share, masked
    # or unmask), as a device that goes offline would. "" = none. A device refuses it.
    secagg_test_dropout: str = ""
    # empirical privacy audit only (`fedrec audit --empirical`): a JSON file of canary examples
    # per client; each client adds its own to its training examples. Empty = no canaries.
    audit_canaries: str = ""

    def __post_init__(self) -> None:
        _need(self.protocol in ("A", "B", "C"), "protocol", self.protocol, "A, B or C")
        _need(self.partition in ("user", "silo"), "partition", self.partition, "user or silo")
        _need(self.silos >= 1, "silos", self.silos, ">= 1")
        _need(self.aggregator in AGGREGATORS, "aggregator", self.aggregator, "ffa or fedavg")
        _need(1 <= self.lora_r <= 64, "lora-r", self.lora_r, "1..64")
        _need(self.lora_alpha > 0, "lora-alpha", self.lora_alpha, "> 0")
        _need(1 <= self.history_len <= 200, "history-len", self.history_len, "1..200")
        _need(8 <= self.max_length <= 512, "max-length", self.max_length, "8..512 tokens")
        # torch.manual_seed and the clients' derived seeds need it to fit in 31 bits
        _need(0 <= self.seed < 2**31, "seed", self.seed, "0..2147483647")
        _need(0 <= self.cold_dropout < 1, "cold-dropout", self.cold_dropout, "0 <= p < 1")
        _need(0 <= self.cold_prior <= 100, "cold-prior", self.cold_prior, "0..100; 0 = none")
        from fedrec.shared.federation.segments import parse_fields

        parse_fields(self.segment_prior)  # names the key and the field
        _need(0 < self.segment_noise <= 1e4, "segment-noise", self.segment_noise, "(0, 10000]")
        _need(0 < self.segment_shrink <= 1e6, "segment-shrink", self.segment_shrink, "(0, 1e6]")
        _need(0 < self.segment_weight <= 1e6, "segment-weight", self.segment_weight, "(0, 1e6]")
        _need(
            0 <= self.segment_cell_max <= 1e12,
            "segment-cell-max",
            self.segment_cell_max,
            "[0, 1e12] (0 = no bound)",
        )
        _need(
            not (self.segment_prior and self.robust != "none" and self.partition == "user"),
            "robust",
            self.robust,
            "none with segment-prior and partition = user: a one-user table holds one user's "
            "0/1 counts, so the median (or a trimmed mean) of such tables is 0 in almost every "
            "cell and is no estimate of their sum; a robust combination needs clients of many "
            "users each (partition = silo)",
        )
        _need(
            not (self.segment_prior and self.user_dp),
            "segment-prior",
            self.segment_prior,
            "'' with user-dp = true (the release is accounted per interaction under local "
            "DP-SGD; the user-level and secure-aggregation paths do not carry it)",
        )
        _need(
            not self.segment_prior or self.protocol == "C",
            "segment-prior",
            self.segment_prior,
            "'' unless protocol = C: the prior ranks only users the federation never trained "
            "(protocol C's), and under A's leave-last-out split one interaction added to a user "
            "with at most two can move another of their items into training (two counts)",
        )
        _need(
            not self.cold_prior_backbone or self.cold_prior > 0,
            "cold-prior-backbone",
            self.cold_prior_backbone,
            "'' unless cold-prior > 0 (it says which encoder the cold prior reads)",
        )
        _need(
            not self.cold_prior or self.item_bias,
            "cold-prior",
            self.cold_prior,
            "needs item-bias = true (the prior regresses the learned item biases)",
        )
        _need(1 <= self.num_rounds <= 100_000, "num-rounds", self.num_rounds, "1..100000")
        _need(0 < self.fraction_train <= 1, "fraction-train", self.fraction_train, "(0, 1]")
        _need(self.min_replies >= 1, "min-replies", self.min_replies, ">= 1")
        _need(self.evaluate_every >= 0, "evaluate-every", self.evaluate_every, ">= 0")
        _need(
            0 <= self.fraction_evaluate <= 1, "fraction-evaluate", self.fraction_evaluate, "[0, 1]"
        )
        _need(self.round_timeout > 0, "round-timeout", self.round_timeout, "> 0 seconds")
        _need(
            0 < self.update_norm_max <= 1e12,
            "update-norm-max",
            self.update_norm_max,
            "an L2 norm in (0, 1e12]",
        )
        _need(
            self.robust in ("none", "trimmed-mean", "median"),
            "robust",
            self.robust,
            "none, trimmed-mean or median",
        )
        _need(0 <= self.trim_fraction < 0.5, "trim-fraction", self.trim_fraction, "[0, 0.5)")
        _need(
            not (self.user_dp and self.robust != "none"),
            "robust",
            self.robust,
            "robust aggregation with user-dp=true: user-level DP's noise is calibrated for the "
            "mean of clipped updates; set robust=none",
        )
        if self.poison:
            spec = self.poison_spec()  # raises ValueError naming the key
            _need(
                spec is None
                or spec[1] != "promote"
                or (bool(self.segment_prior) and spec[2] >= 0.5),
                "poison",
                self.poison,
                "kind promote with segment-prior set and SCALE >= 0.5 (it adds round(SCALE) to a "
                "segment-count table)",
            )
        if self.secagg_test_dropout:
            self.dropout_spec()
        _need(
            self.update_norm_action in ("reject", "clip"),
            "update-norm-action",
            self.update_norm_action,
            "reject or clip",
        )
        _need(
            self.server_opt in ("sgd", "momentum", "adam"),
            "server-opt",
            self.server_opt,
            "sgd, momentum or adam",
        )
        _need(0 < self.server_lr <= 10, "server-lr", self.server_lr, "(0, 10]")
        _need(0 < self.server_lr_final <= 1, "server-lr-final", self.server_lr_final, "(0, 1]")
        _need(0 <= self.ema_decay < 1, "ema-decay", self.ema_decay, "[0, 1): 0 = off")
        _need(self.local_steps >= 1, "local-steps", self.local_steps, ">= 1")
        _need(
            self.dp_noise in ("client", "server", "secure"),
            "dp-noise",
            self.dp_noise,
            "client, server or secure",
        )
        if self.dp_noise in ("server", "secure"):
            self._check_server_noise()
        _need(self.local_opt in ("sgd", "adam"), "local-opt", self.local_opt, "sgd or adam")
        _need(
            0 <= self.sample_rate <= 1,
            "sample-rate",
            self.sample_rate,
            "(0, 1], or 0 to derive each client's rate from expected-batch",
        )
        _need(0 < self.lr < 100, "lr", self.lr, "(0, 100)")
        _need(0 <= self.item_factors <= 64, "item-factors", self.item_factors, "0..64")
        _need(0 <= self.item_offsets <= 64, "item-offsets", self.item_offsets, "0..64")
        _need(0 <= self.factor_rows <= 10_000_000, "factor-rows", self.factor_rows, "0..10000000")
        _need(
            not self.factor_rows
            or (self.item_bias and (self.item_factors > 0 or self.item_offsets > 0)),
            "factor-rows",
            self.factor_rows,
            "0, or item-factors or item-offsets > 0 with item-bias = true (rows are chosen by "
            "the learned item bias)",
        )
        _need(
            not (self.item_offsets and self.item_factors),
            "item-offsets",
            self.item_offsets,
            "0 when item-factors > 0 (one per-item term at a time)",
        )
        _need(
            0 <= self.lr_factors < 10_000,
            "lr-factors",
            self.lr_factors,
            "[0, 10000); 0 = the same as lr",
        )
        _need(
            0 <= self.lr_offsets < 10_000,
            "lr-offsets",
            self.lr_offsets,
            "[0, 10000); 0 = the same as lr",
        )
        _need(0 <= self.user_map <= 384, "user-map", self.user_map, "0..384 (a rank)")
        _need(
            self.user_map_space in ("free", "catalog"),
            "user-map-space",
            self.user_map_space,
            "free or catalog",
        )
        _need(0 < self.factor_init <= 1, "factor-init", self.factor_init, "(0, 1]")
        _need(
            not self.profile_factors or (self.item_factors > 0 and self.use_profile),
            "profile-factors",
            self.profile_factors,
            "needs item-factors > 0 and use-profile = true",
        )
        _need(0 <= self.lr_id < 10_000, "lr-id", self.lr_id, "[0, 10000); 0 = the same as lr")
        _need(0 <= self.lr_map < 10_000, "lr-map", self.lr_map, "[0, 10000); 0 = the same as lr")
        _need(
            not (self.id_residual and (self.dp or self.user_dp)),
            "id-residual",
            self.id_residual,
            "id-residual=true needs dp=false and user-dp=false: the per-item table is not "
            "covered by either DP mechanism here (local DP-SGD would have to clip and noise all "
            "its values per example; user-level DP with it is not measured)",
        )
        _need(1 <= self.negatives <= 100_000, "negatives", self.negatives, "1..100000")
        _need(
            self.negative_sampling in ("keyed", "shared"),
            "negative-sampling",
            self.negative_sampling,
            "keyed (per example) or shared (one set per step)",
        )
        _need(1 <= self.slots <= 10_000, "slots", self.slots, "1..10000")
        _need(
            0 <= self.batch_divisor <= 1e7,
            "batch-divisor",
            self.batch_divisor,
            "0 (sample-rate * slots * users) or a positive constant up to 1e7",
        )
        _need(
            0 <= self.expected_batch <= 1_000_000,
            "expected-batch",
            self.expected_batch,
            "an expected batch size up to 1000000 (used when sample-rate is 0)",
        )
        _need(
            self.sample_rate > 0 or self.expected_batch > 0,
            "expected-batch",
            self.expected_batch,
            "> 0 when sample-rate is 0: one of them sets each client's sampling rate",
        )
        _need(
            0 <= self.physical_batch <= 1_000_000,
            "physical-batch",
            self.physical_batch,
            "0 (no bound) or the most examples per forward/backward pass, up to 1000000",
        )
        _need(
            0 <= self.max_batch <= 1_000_000,
            "max-batch",
            self.max_batch,
            "0 (no cap) or the most examples a local step trains on, up to 1000000",
        )
        # before max-batch's: with both set (preset secure plus dp=true) this is the first fix
        _need(
            not (self.secure_agg and self.dp and self.dp_noise != "secure"),
            "dp",
            self.dp,
            "false with secure-agg=true (local DP-SGD's per-client ledger is not wired into "
            "secure rounds; user-level DP with distributed noise is the guarantee there), or "
            "set dp-noise=secure (per-interaction DP with the noise as shares in the secure sum)",
        )
        _need(
            not (self.dp and self.max_batch > 0),
            "max-batch",
            self.max_batch,
            "0 with local DP-SGD (dp=true): a capped batch is not a Poisson sample, which the "
            "per-interaction accounting assumes; set max-batch=0, or dp=false with user-dp=true "
            "(user-level DP, whose clip covers any use of a client's data)",
        )
        _need(
            self.examples in ("disjoint", "sequence"),
            "examples",
            self.examples,
            "disjoint or sequence",
        )
        _need(
            not (self.dp and self.examples == "sequence" and self.accountant != "rdp"),
            "examples",
            self.examples,
            "examples=sequence with local DP is accounted by group privacy, which fedrec "
            "calibrates with the RDP accountant only: set accountant=rdp (or examples=disjoint)",
        )
        _need(self.epsilon > 0, "epsilon", self.epsilon, "> 0")
        _need(0 < self.delta < 1, "delta", self.delta, "0 < delta < 1")
        _need(self.max_grad_norm > 0, "max-grad-norm", self.max_grad_norm, "> 0")
        _need(
            self.accountant in ("pld", "prv", "rdp"),
            "accountant",
            self.accountant,
            "pld, prv or rdp",
        )
        _need(self.noise_multiplier >= 0, "noise-multiplier", self.noise_multiplier, ">= 0")
        _need(self.planned_rounds >= 0, "planned-rounds", self.planned_rounds, ">= 0")
        _need(self.user_clip > 0, "user-clip", self.user_clip, "> 0")
        _need(self.user_epsilon > 0, "user-epsilon", self.user_epsilon, "> 0")
        _need(0 < self.user_delta < 1, "user-delta", self.user_delta, "0 < delta < 1")
        _need(
            self.user_noise_multiplier >= 0,
            "user-noise-multiplier",
            self.user_noise_multiplier,
            ">= 0",
        )
        _need(
            not self.secure_agg or self.user_dp or self.dp_noise == "secure",
            "secure-agg",
            self.secure_agg,
            "false unless user-dp=true or dp-noise=secure (secure aggregation carries "
            "distributed DP noise; set one of them)",
        )
        _need(2 <= self.secagg_bits <= 62, "secagg-bits", self.secagg_bits, "2..62")
        _need(
            self.secagg_neighbours >= 0 and self.secagg_neighbours % 2 == 0,
            "secagg-neighbours",
            self.secagg_neighbours,
            "0 (automatic) or an even number >= 2",
        )
        _need(0 <= self.secagg_dropout < 0.5, "secagg-dropout", self.secagg_dropout, "[0, 0.5)")
        _need(
            0 <= self.secagg_colluders < 0.5,
            "secagg-colluders",
            self.secagg_colluders,
            "[0, 0.5)",
        )
        if not self.dp:
            for key in ("epsilon", "delta", "max_grad_norm", "noise_multiplier", "planned_rounds"):
                if getattr(self, key) != getattr(FedConfig, key):
                    warnings.warn(
                        f"run config '{key.replace('_', '-')}' is ignored: dp=false",
                        SettingWarning,
                        stacklevel=3,
                    )
        if not self.id_residual and self.lr_id != FedConfig.lr_id:
            warnings.warn(
                "run config 'lr-id' is ignored: id-residual=false", SettingWarning, stacklevel=3
            )
        if not self.item_factors and self.lr_factors != FedConfig.lr_factors:
            warnings.warn(
                "run config 'lr-factors' is ignored: item-factors=0", SettingWarning, stacklevel=3
            )
        if not self.item_offsets and self.lr_offsets != FedConfig.lr_offsets:
            warnings.warn(
                "run config 'lr-offsets' is ignored: item-offsets=0", SettingWarning, stacklevel=3
            )
        if not self.user_map and self.lr_map != FedConfig.lr_map:
            warnings.warn(
                "run config 'lr-map' is ignored: user-map=0", SettingWarning, stacklevel=3
            )
        if self.partition == "user" and self.silos != FedConfig.silos:
            warnings.warn(
                "run config 'silos' is ignored: partition=user", SettingWarning, stacklevel=3
            )

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            backbone=self.backbone,
            max_length=self.max_length,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            ffa=self.aggregator == "ffa",
            history_len=self.history_len,
            use_profile=self.use_profile,
            id_residual=self.id_residual,  # no DP only (checked above)
            item_factors=self.item_factors,
            factor_init=self.factor_init,
            profile_factors=self.profile_factors,
            item_offsets=self.item_offsets,
            user_map=self.user_map,
            user_map_space=self.user_map_space,
            item_bias=self.item_bias,
            cold_dropout=self.cold_dropout,
            # fixed: under per-example clipping its large gradient would eat the clip budget
            train_scale=False,
            seed=self.seed,
        )

    def _check_server_noise(self) -> None:
        """``dp-noise = server`` is central DP-SGD over the union of the clients' examples only
        when every round is ONE subsampled Gaussian release: every client takes one plain SGD
        step on its clipped sum at the same q and divisor, the server adds the noise to the sum
        of the changes, and nothing else the clients send depends on their data."""
        rule = f"with dp-noise = {self.dp_noise}"
        _need(self.dp, "dp", self.dp, f"true {rule} (the noise is local DP-SGD's)")
        _need(not self.user_dp, "user-dp", self.user_dp, f"false {rule} (one DP mechanism)")
        secure = self.dp_noise == "secure"
        _need(
            self.secure_agg == secure,
            "secure-agg",
            self.secure_agg,
            "true with dp-noise = secure (the clients' noise shares need the secure sum)"
            if secure
            else f"false {rule} (dp-noise = secure is the version without a trusted server)",
        )
        if secure:
            _need(
                self.sample_rate == 1,
                "sample-rate",
                self.sample_rate,
                f"1 {rule}: every example every round (fedrec claims no bound for a "
                "Poisson-subsampled Skellam mechanism)",
            )
            _need(
                self.partition == "silo",
                "partition",
                self.partition,
                f"silo {rule} (every client checks the number of clients against silos)",
            )
            # the Skellam plan follows num-rounds only: a fixed Gaussian noise multiplier or
            # another planned round count would only change the clients' round cap
            _need(
                self.noise_multiplier == 0,
                "noise-multiplier",
                self.noise_multiplier,
                f"0 {rule} (the Skellam noise is calibrated from epsilon and num-rounds)",
            )
            _need(
                self.planned_rounds in (0, self.num_rounds),
                "planned-rounds",
                self.planned_rounds,
                f"0 or num-rounds {rule} (the noise is planned for num-rounds releases)",
            )
        _need(
            self.local_steps == 1,
            "local-steps",
            self.local_steps,
            f"1 {rule}: each round must be one DP-SGD step, one noised sum",
        )
        _need(self.local_opt == "sgd", "local-opt", self.local_opt, f"sgd {rule}")
        _need(
            self.fraction_train == 1,
            "fraction-train",
            self.fraction_train,
            f"1 {rule}: every client takes part every round (no client sampling is assumed)",
        )
        _need(
            self.sample_rate > 0,
            "sample-rate",
            self.sample_rate,
            f"> 0 {rule}: every client samples its examples at the same q",
        )
        _need(
            self.batch_divisor > 0,
            "batch-divisor",
            self.batch_divisor,
            f"> 0 {rule}: every client divides by the same public constant (the expected "
            "batch of the whole federation, e.g. sample-rate x slots x all users)",
        )
        for key, v in (
            ("lr-factors", self.lr_factors),
            ("lr-offsets", self.lr_offsets),
            ("lr-id", self.lr_id),
            ("lr-map", self.lr_map),
        ):
            _need(v == 0, key, v, f"0 (= lr) {rule}: the server noises every tensor at lr")
        _need(
            self.factor_rows == 0,
            "factor-rows",
            self.factor_rows,
            f"0 {rule} (the server would have to discard the noise on the rows left untrained)",
        )
        _need(
            self.robust == "none",
            "robust",
            self.robust,
            f"none {rule}: the noise is calibrated for one window's change to the plain sum",
        )
        _need(not self.segment_prior, "segment-prior", self.segment_prior, f"'' {rule}")
        _need(not self.poison, "poison", self.poison, f"'' {rule}")
        _need(not self.audit_canaries, "audit-canaries", self.audit_canaries, f"'' {rule}")

    def map_lr(self) -> float:
        """The user map's SGD learning rate: ``lr-map``, or ``lr`` when it is 0."""
        return self.lr_map or self.lr

    def factors_lr(self) -> float:
        """The item factors' local learning rate: ``lr-factors``, or ``lr`` when it is 0."""
        return self.lr_factors or self.lr

    def offsets_lr(self) -> float:
        """The item offsets' SGD learning rate: ``lr-offsets``, or ``lr`` when it is 0."""
        return self.lr_offsets or self.lr

    def id_lr(self) -> float:
        """The per-item ID table's SGD learning rate: ``lr-id``, or ``lr`` when it is 0."""
        return self.lr_id or self.lr

    def dropout_spec(self) -> tuple[int, str] | None:
        """``secagg-test-dropout`` parsed: (every how many partitions, stage), or None."""
        if not self.secagg_test_dropout:
            return None
        parts = self.secagg_test_dropout.split(":")
        try:
            fraction, stage = float(parts[0]), parts[1]
            if len(parts) != 2 or not 0 < fraction <= 1 or stage not in DROPOUT_STAGES:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(
                f"run config 'secagg-test-dropout' = {self.secagg_test_dropout!r} is invalid: "
                f"FRACTION:STAGE with FRACTION in (0, 1] and STAGE one of "
                f"{', '.join(DROPOUT_STAGES)} (e.g. 0.2:masked)"
            ) from None
        return max(1, round(1 / fraction)), stage

    def poison_spec(self) -> tuple[int, str, float] | None:
        """``poison`` parsed: (every how many partitions, kind, scale), or None."""
        if not self.poison:
            return None
        parts = self.poison.split(":")
        try:
            fraction, kind, scale = float(parts[0]), parts[1], float(parts[2])
            kinds = ("scale", "sign-flip", "promote")
            if len(parts) != 3 or not 0 < fraction <= 1 or kind not in kinds:
                raise ValueError
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(
                f"run config 'poison' = {self.poison!r} is invalid: FRACTION:KIND:SCALE with "
                "FRACTION in (0, 1], KIND scale, sign-flip or promote, SCALE > 0 (e.g. "
                "0.1:sign-flip:4)"
            ) from None
        return max(1, round(1 / fraction)), kind, scale

    def client_sample_rate(self, users: int) -> float:
        """A client's Poisson sampling rate: ``sample-rate`` when set (> 0), else
        ``min(1, expected-batch / (slots * users))`` for a client holding ``users`` people's data
        (the roster, public here: the guarantee is per interaction, not per user)."""
        if self.sample_rate > 0:
            return self.sample_rate
        return min(1.0, self.expected_batch / (self.slots * max(1, users)))

    def dp_group(self) -> int:
        """How many training examples one interaction can change, in add/remove steps, when the
        adjacency is ``add-remove`` (:meth:`dp_adjacency`). Sliding windows: the interaction's
        own example goes, and each of the next ``history-len`` examples has it in its context,
        so changes (a replacement: one removal plus one addition): 1 + 2 * history-len.
        Disjoint examples: 1, with ``replace-one`` adjacency."""
        if self.dp and self.examples == "sequence":
            return 1 + 2 * self.history_len
        return 1

    def dp_adjacency(self) -> str:
        """What one interaction does to the training examples (see
        :mod:`fedrec.shared.privacy.accounting`). Disjoint examples: adding or removing an
        interaction adds or removes one example (its slot was empty) or REPLACES the one example
        of its slot (its target or its context changes): ``replace-one``. Sliding windows: up to
        :meth:`dp_group` add/remove steps (``add-remove``). ``tests/test_dp_training.py`` checks
        both mappings on random histories."""
        return "add-remove" if self.dp and self.examples == "sequence" else "replace-one"

    def dp_mechanism(self) -> dict[str, Any]:
        """The local DP mechanism's accounting parameters (all but the noise and sampling, which
        each accountant-history run carries): what a device stores beside its history."""
        return {
            "accountant": self.accountant,
            "adjacency": self.dp_adjacency(),
            "group_size": self.dp_group(),
            "delta": self.delta,
        }

    def rounds_planned(self) -> int:
        """Rounds each client budgets for: set explicitly, or the 99th percentile of
        Binomial(num_rounds, fraction_train) (everyone, when every client trains every round)."""
        if self.planned_rounds:
            return self.planned_rounds
        n, p = self.num_rounds, self.fraction_train
        if p >= 1:
            return n
        cdf, k = 0.0, 0
        try:
            for k in range(n + 1):
                cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
                if cdf >= 0.99:
                    break
        except OverflowError:  # math.comb(n, k) exceeds a float (n ~ 1,000): in log space
            cdf, k = 0.0, 0
            for k in range(n + 1):
                log_pmf = (
                    math.lgamma(n + 1)
                    - math.lgamma(k + 1)
                    - math.lgamma(n - k + 1)
                    + k * math.log(p)
                    + (n - k) * math.log1p(-p)
                )
                cdf += math.exp(log_pmf)
                if cdf >= 0.99:
                    break
        return max(1, k)

    def to_flat(self) -> dict[str, Any]:
        """Kebab-case keys, as in ``[tool.flwr.app.config]``."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_run_config(raw: Mapping[str, Any], *, where: str = "run config") -> FedConfig:
    """Flat kebab- or snake-case mapping -> :class:`FedConfig`; unknown keys raise (the one
    settings parser, :func:`fedrec.shared.settings.parse_fields`)."""
    return parse_fields(FedConfig, dict(raw), where=where)


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (CLI ``--set``) -> a mapping for :func:`parse_run_config`."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. num-rounds=10")
        # one key however it is spelled (num_rounds is num-rounds): the last --set wins
        key = key.strip().replace("_", "-")
        out.pop(key, None)
        out[key] = value.strip()
    return out
