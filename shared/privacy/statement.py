"""The privacy statement of a run (``RUN/privacy/statement.md``).

The server writes it at the end of a run from the ledger; ``fedrec audit`` prints it again from
its own recomputation of every client's epsilon, so the two can be compared.
"""

from __future__ import annotations

import textwrap
from typing import Any

from fedrec.shared.federation.config import FedConfig


def statement(cfg: FedConfig, p: dict[str, Any]) -> str:
    """The run's privacy statement (``RUN/privacy/statement.md``); ``fedrec audit`` checks it."""
    user = p.get("user_level") or {}
    if not cfg.dp and not cfg.user_dp:
        table = ""
        if cfg.id_residual:
            table = (
                " With `id-residual=true` the update includes the per-item ID table: its rows "
                "that changed most show which items a client trained on, i.e. its users' "
                "interactions, in the clear."
            )
        return (
            "# Privacy statement\n\nDifferential privacy was OFF for this run: client updates are "
            "the plain result of local SGD and carry no formal guarantee. Only adapter tensors, "
            "the model head and whitelisted metrics left the clients."
            f"{table}{_segments_clear(cfg)}\n"
        )
    parts = ["# Privacy statement", ""]
    if cfg.dp and cfg.dp_noise == "secure":
        parts.append(_secure_interaction(cfg, p))
    elif cfg.dp:
        parts.append(_local(cfg, p))
    else:
        parts.append(
            "- **Local DP-SGD**: off. Clients train with plain SGD; only the user-level guarantee "
            "below applies."
        )
    parts.append(_user_level(cfg, user))
    parts.append(_not_protected(cfg))
    return "\n".join(parts)


def _local(cfg: FedConfig, p: dict[str, Any]) -> str:
    hist = ", ".join(f"{k} round(s): {v} client(s)" for k, v in p["rounds_per_client"].items())
    bars = ""
    if p.get("histogram"):
        most = max(n for _lo, _hi, n in p["histogram"]) or 1
        rows = [
            f"    {lo:7.3f} - {hi:7.3f} | {'#' * max(1 if n else 0, round(30 * n / most))} {n}"
            for lo, hi, n in p["histogram"]
        ]
        bars = "\n  Distribution of per-client epsilon:\n\n" + "\n".join(rows) + "\n"
    title = (
        "DP-SGD per interaction, the noise added by a trusted server"
        if cfg.dp_noise == "server"
        else "Local DP-SGD (per interaction)"
    )
    return f"""## {title}

- **Unit of privacy**: one interaction (user, item, timestamp) of a client's data, except an
  interaction that is its user's only training interaction (removing it removes the user from
  the client's roster; see "Not protected").
- **Adjacency**: add/remove one interaction. {_examples(cfg)}
{_mechanism(cfg)} {_negatives(cfg)}
- **Accountant**: {_ACCOUNTANTS[cfg.accountant]}, over each client's whole history
  (persistent across rounds, stored with its mechanism and the client's own cap); sampling
  assumption: Poisson subsampling within the client's own examples. No amplification from
  client sampling by the server is claimed. `fedrec audit` recomputes every epsilon under this
  mechanism and again with an independent accountant.
- **delta** = {cfg.delta}; **budget** epsilon_max = {cfg.epsilon} per client.
- **Per-client epsilon** ({p["clients"]} clients that took part): max {p["epsilon_max"]:.4f},
  median {p["epsilon_median"]:.4f}. Rounds trained per client: {hist or "none"}.
  Refused rounds (budget): {p["refusals"]}.{bars}{_segments(cfg)}
"""


def _secure_interaction(cfg: FedConfig, p: dict[str, Any]) -> str:
    """Per-interaction DP-SGD whose noise the clients add as Skellam shares inside a SecAgg+
    sum (``dp-noise`` = secure): no trusted server."""
    try:
        si = p["secure_interaction"]
        sa = si["plan"]
        exact = (
            "evaluated from the Skellam pmf"
            if si.get("independent_exact", True)
            else "its Gaussian limit (mu is beyond the pmf's reach): NOT an independent check "
            "here, so the claim rests on the theorem"
        )
        return f"""## DP-SGD per interaction, the noise added by the clients in secure aggregation

- **Unit of privacy**: {si["unit"]} (see "Not protected").
- **Adjacency**: add/remove one interaction. {_secure_examples(cfg)}
- **Mechanism**: every round every client (all {sa["clients"]}, no client sampling) takes
  every one of its training examples (`sample-rate` = 1: no subsampling is claimed), clips
  each example's gradient to L2 norm {cfg.max_grad_norm} and takes ONE SGD step (lr {cfg.lr})
  on the clipped sum divided by the public constant batch-divisor = {cfg.batch_divisor}, with
  no noise of its own; the step is computed in float64. So one interaction moves one client's
  change by at most {sa["float_sensitivity"]:.6g} in L2. The client projects its change onto
  the L2 ball of radius {sa["projection_radius"]:g} (1-Lipschitz), scales it by
  {sa["scale"]:.6g}, rounds each coordinate up with probability its fractional part (plain
  randomized rounding, never redrawn), adds Skellam noise Sk(mu, mu) with mu =
  {sa["mu_client"]:.6g} per coordinate and masks the vector (SecAgg+, {sa["neighbours"]}
  neighbours, Shamir threshold {sa["threshold"]}). The server learns the sum modulo
  2^{sa["bits"]} of the survivors' vectors, decodes it (the sum of the changes plus noise)
  and its optimizer steps on it: post-processing. With the roundings coupled, one interaction
  moves the integer sum by at most {sa["l2_sensitivity"]:.6g} in L2 and {sa["l1_sensitivity"]:.6g}
  in L1 (the group of examples one interaction touches is inside this bound: no group-privacy
  conversion). {_negatives(cfg)} Each client recomputes this calibration from the run config
  the server sends (its silos checked against the simulation's number of partitions, or on a
  device against the federation-clients its owner states) and refuses a request for less
  noise than that config gives, another grid, radius or modulus, a lower threshold, or a round
  past num-rounds = {cfg.num_rounds}; a server that changes the config, or the SecAgg+ group
  it assigns, deviates from the protocol (see Trust). A simulated client's budget file counts
  the rounds it trained in (written as the trusted-server version's Gaussian step; no Gaussian
  noise is added in this mode), and the client stops using its data after num-rounds rounds.
  A device instead records each round, before it trains, in its own
  interaction-secure-budget.json (the plan's a-priori noise, across runs, at most num-rounds
  rounds per run) and refuses a round that would take that record's epsilon at its own
  delta-max plus its local DP-SGD epsilon past its own epsilon-max; that lifetime figure stays
  on the device (fedrec deploy budget), not in this statement, which is per run.
- **epsilon = {si["epsilon"]:.4f} at delta = {cfg.delta}** per interaction, for every client,
  after {si["releases"]} released round(s) (budget {cfg.epsilon}, met by the calibration for
  rounds with only the minimum {sa["min_survivors"]} survivors). {si["accounting"]}. Noise
  counted per round: mu = {si["mu_total_used"]:.6g} (the shares of the survivors minus
  {sa["colluders"]} assumed colluders and minus the share of the client holding the
  interaction), a standard deviation of {si["noise_std_on_sum"]:.4g} on each coordinate of the
  summed change; analytic bound {si["epsilon_analytic"]:.4f}, numerical computation
  {si["epsilon_independent"]:.4f} ({exact}). The accountant runs at delta =
  {si["delta_accountant"]:.6g}: the rest of delta, {si["collusion_risk"]:.3g}, bounds the
  chance that colluders hold a threshold of some client's shares in SecAgg+'s random graph.
  A client that dropped out of a round is still charged for it (an over-count).
- **Trust**: {si["trust"]}. No trusted server: the server never sees one client's change. The
  guarantee is computational (X25519, HKDF/AES-256-CTR, Fernet). The claim assumes the clients
  not counted as colluders follow the protocol; a server that deviates from it (no consistency
  round with signatures) and Sybil clients are not covered.
- **Arithmetic**: Opacus sums the clipped per-example gradients and divides them in float32;
  how that rounding changes when one example is removed is not covered (as in every DP-SGD
  implementation). The Skellam noise comes from NumPy's PCG64 seeded with 128 bits of OS
  entropy, not a cryptographically secure generator.
"""
    except (KeyError, TypeError, ValueError):
        return (
            "## DP-SGD per interaction inside secure aggregation\n\nOn (`dp-noise=secure`), but "
            "the run's record in `metrics.json` is missing or incomplete, so **nothing is "
            "claimed**: see the verification below.\n"
        )


def _secure_examples(cfg: FedConfig) -> str:
    """How many clipped gradient terms one interaction moves, under ``dp-noise=secure`` (they
    are counted in the sensitivity itself, not by a group-privacy conversion)."""
    if cfg.dp_adjacency() == "replace-one":
        return (
            "Each interaction is in at most one training\n  example (keyed-hash groups): adding "
            "or removing it adds, removes or replaces that\n  example, at most two clipped "
            "gradient terms; the sensitivity below counts both."
        )
    return (
        f"Training examples are sliding windows (`examples=sequence`): one interaction\n  "
        f"is the target of one window and in the context of up to {cfg.history_len} more, so "
        f"it moves up to\n  {cfg.dp_group()} clipped gradient terms (1 + 2 x history-len: a "
        "changed window is a removal and an\n  addition); the sensitivity below counts all of "
        "them (no group-privacy conversion)."
    )


def _segments_clear(cfg: FedConfig) -> str:
    if not cfg.segment_prior:
        return ""
    return (
        f" With `segment-prior` = {cfg.segment_prior!r} each client that trained in round 1 also "
        "sent its exact interaction counts per (segment, item): which items its users in each "
        "segment took, in the clear."
    )


def _segments(cfg: FedConfig) -> str:
    if not cfg.segment_prior:
        return ""
    from fedrec.shared.privacy.calibration import planned_release

    release = planned_release(cfg)
    assert release is not None
    return f"""
- **Segment counts** (`segment-prior` = {cfg.segment_prior!r}): each client that
  trained in round 1 also released its interaction counts per (segment, item), cells fixed in
  advance by the profile fields and the catalog, with Gaussian noise of std {cfg.segment_noise}
  per cell, rounded to whole numbers (one interaction changes one count by 1: L2 sensitivity 1;
  the rounding is post-processing). It is charged to the
  client's budget in the same history, as one step at sample rate 1 and noise multiplier
  {release[0]:g} ({_release_bound(cfg)}); the ledger shows it as the round's `release`, the
  epsilons above include it, and the DP-SGD noise was calibrated with it in the budget. New
  users are ranked with the server's sum of the tables (post-processing).
"""


def _release_bound(cfg: FedConfig) -> str:
    if cfg.dp_adjacency() == "replace-one" and cfg.accountant == "rdp":
        return "under RDP a replacement is two add/remove steps by group privacy: an upper bound"
    if cfg.dp_adjacency() == "replace-one":
        return (
            "its replace-one curve is the release's own; the add/remove branch counts it at\n"
            "  half its shift, but the replace-one branch dominates it and sets every epsilon"
        )
    return f"group privacy over {cfg.dp_group()} steps: an upper bound"


_ACCOUNTANTS = {
    "pld": "Google's dp-accounting privacy-loss distributions (PLD; tight for replace-one)",
    "prv": "Opacus' PRV numerics (replace-one through fedrec's own privacy random variable)",
    "rdp": "Opacus RDP (a replacement bounded as two add/remove steps: loose)",
}


def _mechanism(cfg: FedConfig) -> str:
    if cfg.dp_noise != "server":
        head = "- **Mechanism**: local DP-SGD with Opacus at every client: Poisson sampling"
        return f"""{head} at rate
  {_rate(cfg)}, per-example clipping to L2 norm {cfg.max_grad_norm}, Gaussian noise,
  {cfg.local_steps} steps per round. The noised sum is divided by a constant
  ({_divisor(cfg)}), never by the data's size."""
    return f"""- **Mechanism**: DP-SGD over the union of the clients' examples, the noise added by
  the server (`dp-noise` = server). Every round every client Poisson-samples its examples at
  rate {_rate(cfg)}, clips each example's gradient to L2 norm {cfg.max_grad_norm} and takes ONE
  SGD step (lr {cfg.lr}) on the clipped sum divided by a constant ({_divisor(cfg)}), with NO
  noise; the server sums every client's change and adds Gaussian noise of standard deviation
  lr x sigma x {cfg.max_grad_norm} / {cfg.batch_divisor} per coordinate (OS CSPRNG) before its
  optimizer: one subsampled Gaussian release a round, accounted per interaction as a client's
  own DP-SGD step would be (the ledger's `noise_at` says "server"; `fedrec audit` checks
  each round's recorded noise against it).
- **Trust**: the server is TRUSTED. It sees every client's clipped, un-noised change, so the
  epsilon below holds against everyone who sees the released models (the other clients
  included), NOT against the server or anyone who reads the clients' replies on the way."""


def _rate(cfg: FedConfig) -> str:
    if cfg.sample_rate == 0:
        return (
            f"q = min(1, expected-batch / (slots x the client's users)) = min(1, "
            f"{cfg.expected_batch} / ({cfg.slots} x users)), each client's noise calibrated for "
            "its own q (the ledger records it; the number of users on a client is public here)"
        )
    return str(cfg.sample_rate)


def _divisor(cfg: FedConfig) -> str:
    if cfg.batch_divisor > 0:
        return f"batch-divisor = {cfg.batch_divisor}"
    return (
        f"q x slots x the client's users = {_q(cfg)} x {cfg.slots} x users; "
        "the number of users on a client is public here"
    )


def _q(cfg: FedConfig) -> str:
    return "q" if cfg.sample_rate == 0 else str(cfg.sample_rate)


def _examples(cfg: FedConfig) -> str:
    k = cfg.dp_group()
    if cfg.dp_adjacency() == "replace-one":
        return (
            "Each interaction is in exactly one training\n  example (keyed-hash groups, "
            "`fedrec.shared.model.examples.disjoint_examples`): adding or removing it\n  adds "
            "or removes that example, or REPLACES it (the example's target or context changes).\n"
            "  Every epsilon here is for that example-level adjacency (replace-one, or add/remove "
            "one;\n  the larger of the two)."
        )
    return (
        f"Training examples are sliding windows (`examples=sequence`): one interaction\n  "
        f"changes up to {k} examples in add/remove steps (1 + 2 x history-len "
        f"{cfg.history_len}), so every\n  epsilon here is the group-privacy bound for {k} "
        "examples at the stated delta\n  (`fedrec.shared.privacy.accounting.group_epsilon`), "
        "not the per-example one."
    )


def _user_level(cfg: FedConfig, u: dict[str, Any]) -> str:
    if not cfg.user_dp and cfg.secure_agg:
        return (
            "- **User-level DP**: off (`user-dp=false`): the guarantee above is per interaction, "
            "not per user.\n"
        )
    if not cfg.user_dp:
        return (
            "- **User-level DP**: off (`user-dp=false`). **Secure aggregation**: off (the server "
            "sees each client's update).\n"
        )
    if not u.get("enabled"):
        return "## User-level DP\n\nOn, but the run ended before any round was accounted.\n"
    try:
        return (_secure(u) if cfg.secure_agg else _trusted(u)) + _delta_note(u)
    except (KeyError, TypeError, ValueError, AttributeError):
        # the run's record is missing or malformed (the audit's findings say what): no claim
        return (
            "## User-level DP\n\nOn (`user-dp=true`), but the run's user-level record in "
            "`metrics.json` is missing or incomplete, so **nothing is claimed**: see the "
            "verification below.\n"
        )


def _negatives(cfg: FedConfig) -> str:
    """How negatives are drawn, as the run drew them: neither way lets one example's gradient
    depend on another example."""
    if cfg.negative_sampling == "shared":
        return (
            "Each step's negatives are one set for the whole batch, drawn from a per-round "
            "secret (fresh OS randomness) and the step only, never from the data, with their "
            "cold-dropout flags; a target's flag is a keyed hash of its item, the secret and "
            "the step. So no example's gradient depends on another's."
        )
    return (
        "Each example's negatives and cold-dropout mask are a keyed hash of that example and "
        "a per-round secret (fresh OS randomness), so no example's gradient depends on "
        "another's."
    )


def _delta_note(u: dict[str, Any]) -> str:
    """A warning when delta is not small against 1 / (number of clients): a mechanism that
    publishes a random user's data outright with probability delta meets (0, delta)-DP, so a
    delta near 1/N allows about delta x N users to be exposed."""
    n, delta = int(u.get("clients") or 0), float(u["delta"])
    if n <= 0 or delta * n <= 0.01:
        return ""
    return (
        f"\n**On delta**: delta x clients = {delta:g} x {n} = {delta * n:.3g}. (epsilon, delta)-DP "
        "allows a mechanism that exposes\n  a random user's data outright with probability "
        f"delta; at this delta that is about {delta * n:.2g} of the {n} users.\n  A delta of "
        f"at most {0.01 / n:.1g} (0.01 / clients) keeps that below 1 %: set `user-delta`.\n"
    )


def _trusted(u: dict[str, Any]) -> str:
    """User-level DP with a trusted server adding the noise (Flower's DP wrapper)."""
    return f"""## User-level DP (DP-FedAvg, server side)

- **Unit of privacy**: {u["unit"]}. **Adjacency**: {u["adjacency"]}.
- **Mechanism**: {u["mechanism"]}. Each client's whole update is clipped to L2 norm
  {u["clip"]}; the clipped sum is divided by the fixed sample size {u["sampled_per_round"]}
  (of {u["clients"]} clients; missing or rejected clients count as zero) and Gaussian noise of
  std {u["noise_std"]:.4g} (noise multiplier {u["noise_multiplier"]:.4f}) is added to that
  mean before the server optimizer ({u.get("server_optimizer", "sgd, lr 1")}) uses it: any
  server step is post-processing of that release.
- **epsilon = {u["epsilon"]:.4f} at delta = {u["delta"]}** after {u["releases"]} noisy
  release(s) (budget {u["epsilon_budget"]}), {u["accounting"]}, for zero-out adjacency (one
  client's update replaced by zeros, everything else unchanged). Replace-one (one client's data
  swapped for another's, the number of clients unchanged) changes the sum by up to twice the
  clip: epsilon {u.get("epsilon_replace_one", float("nan")):.4f} (the same releases at half the
  noise multiplier). Adding or removing a client is **not claimed**: the sample size is
  computed from the number of clients (`fraction-train` x clients, at least `min-replies`), so
  one client more or fewer can change the divisor and the noise's scale together, which neither
  bound covers. Flower samples a fixed number
  of clients without replacement, which is not the Poisson sampling the amplification bound
  assumes; under that assumption it would be {u["epsilon_if_poisson_sampling"]:.4f} (not claimed).
- **Trust**: the server is trusted to clip and add the noise (no secure aggregation: it sees
  each client's update before noise). The noise comes from the operating system's CSPRNG
  (`os.urandom`, Box-Muller, float64); the accounting is that of the ideal Gaussian.
- **What is covered**: the released models (each round's global model and the final one). Not
  the per-round counts of clients that replied, refused, failed or were rejected
  (`metrics.json`, `progress.jsonl`): a user with no data refuses to train, which those counts
  show; nor whether a round had enough replies to be aggregated.
"""


def _secure(u: dict[str, Any]) -> str:
    """User-level DP with secure aggregation and distributed noise (no trusted server)."""
    sa = u["secure_agg"]
    exact = (
        "evaluated from the Skellam pmf"
        if u.get("independent_exact", True)
        else "its Gaussian limit (the pmf was out of reach): NOT an independent check here"
    )
    return f"""## User-level DP with secure aggregation (distributed noise, no trusted server)

- **Unit of privacy**: {u["unit"]}. **Adjacency**: zero-out: one client's update replaced by
  zeros, everything else unchanged. In a secure round a client's reply holds only its masked
  vector and constants (whether it trained or had data is not sent). Replace-one (one client's
  update swapped for another's) costs epsilon {u.get("epsilon_replace_one", float("nan")):.4f}
  (twice the sensitivities); adding or removing a client (its noise share and its presence in
  the cohort with it) is **not claimed**.
- **Mechanism**: {u["mechanism"]}. Each client clips its whole change to L2 norm {u["clip"]},
  scales it by {sa["scale"]:.6g}, rounds it to integers (conditional randomized rounding: the
  integer vector's L2 norm is at most {sa["l2_sensitivity"]:.6g}, its L1 norm at most
  {sa["l1_sensitivity"]:.6g}), adds Skellam noise Sk(mu, mu) with mu = {sa["mu_client"]:.6g}
  per coordinate and masks the vector (SecAgg+, {sa["neighbours"]} neighbours per client,
  Shamir threshold {sa["threshold"]}). The server learns the sum modulo 2^{sa["bits"]} of the
  survivors' noisy vectors (plus who replied when); it divides the decoded sum by the cohort
  size {sa["cohort"]}, and its optimizer ({u.get("server_optimizer", "not recorded")}) steps on
  that noisy mean: post-processing, no privacy cost. Each client recomputes this calibration
  from the run config and refuses a request for less noise, another grid or a lower threshold.
- **epsilon = {u["epsilon"]:.4f} at delta = {u["delta"]}** after {u["releases"]} released
  round(s) (budget {u["epsilon_budget"]}, which the calibration meets for rounds with only the
  minimum {sa["min_survivors"]} survivors; this figure counts the survivors the released rounds
  had: the protected user's own share is never counted, and whether it drops out, which can
  depend on its data through its reply's timing, is outside the guarantee, see Not protected).
  {u["accounting"]}. Noise counted
  per round: the smallest released round's, mu = {u["mu_total_used"]:.6g} (the shares of the
  survivors minus {sa["colluders"]} assumed colluders and minus the protected user's own);
  analytic bound {u["epsilon_analytic"]:.4f}, numerical computation
  {u["epsilon_independent"]:.4f} ({exact}). The accountant runs at delta =
  {u.get("delta_accountant", u["delta"]):.6g}: the rest of delta,
  {u.get("collusion_risk", 0.0):.3g}, bounds the chance that colluders hold a threshold of some
  node's shares in SecAgg+'s random graph (a union bound over nodes and rounds).
- **Trust**: {u["trust"]}. The colluders are fixed before the server draws each round's graph.
  The survivor minimum ({sa["min_survivors"]}) is enforced by the server (honest but curious);
  a client also refuses to unmask when the survivors named in its group are too few for it
  (a necessary condition, the whole one on a complete graph; not against lists that differ
  between clients);
  the Shamir threshold is enforced by cryptography: a node's masks cannot be removed without a
  threshold of its group's shares, and a client refuses a request for both kinds of share of
  one node. The guarantee is computational: it holds if X25519, HKDF/AES-256-CTR and
  Fernet are secure, at a 128-bit level (Fernet's AES-128 keys; the self-mask seed and the
  seed each masking key is derived from are 128-bit, the latter bound to its node and round).
- **Not covered**: the per-round counts of clients that replied, dropped or were rejected
  (`metrics.json`, `progress.jsonl`; a client without data, or whose training failed, sends a
  zero change with its noise share like any other, so these counts do not show it) and
  whether a round was released; a server that deviates from the protocol (the
  paper's consistency round with signatures is not implemented, so a malicious server could ask
  different clients for a node's two kinds of share); Sybil clients; the timing of replies
  (which clients the server samples does not matter: the colluders are assumed to be in every
  cohort).
  The noise comes from NumPy's PCG64 seeded with 128 bits of OS entropy on each client, not a
  cryptographically secure generator. A client that adds less noise than asked weakens the
  guarantee: the claim assumes the clients not counted as colluders follow the protocol.
""" + _legacy_colluders(u)


def _legacy_colluders(u: dict[str, Any]) -> str:
    """For a run made before 2026-12-03 (colluders counted per cohort), what ``fedrec audit``
    recomputed under the population rule runs use now; empty otherwise."""
    eps = u.get("epsilon_population_colluders")
    if not isinstance(eps, (int, float)):
        return ""
    sa = u["secure_agg"]
    risk = u.get("collusion_risk_population")
    risk_text = (
        f"whose collusion risk for that many colluders is {risk:.3g}, {risk / u['delta']:.1%} "
        "of delta, taken from delta; a run made now accepts at most 1 %"
        if isinstance(risk, (int, float)) and u.get("delta")
        else "whose collusion risk for that many colluders can exceed what a run made now "
        "would accept"
    )
    budget = u.get("epsilon_budget")
    over = (
        f"\n  **This is above the run's budget of {budget:g}**: read the run as having spent "
        f"{eps:.4f}, not {budget:g}."
        if isinstance(budget, (int, float)) and eps > budget * (1 + 1e-6)
        else ""
    )
    return f"""- **Made under the older colluder rule**: this run assumed at most {sa["colluders"]}
  colluders in each cohort of {sa["cohort"]}, an assumption about every round's draw. Runs since
  2026-12-03 assume at most the same fraction of the whole population,
  {u.get("colluders_population")} of {u.get("clients")} clients, all assumed to be in every cohort,
  counted with this run's own SecAgg+ graph ({risk_text}). Under that assumption this run's
  epsilon (recomputed by `fedrec audit` from the same releases) is
  **{eps:.4f}** at delta = {u["delta"]}.{over}
"""


def _who(cfg: FedConfig) -> str:
    if cfg.secure_agg:
        return (
            "- Which clients the server asked and which replied at each stage of each round (it "
            "knows their\n  node ids; `privacy/secagg.jsonl` records only counts)."
        )
    return "- Which clients took part in which round (client ids in the ledger)."


def _segment_fields(cfg: FedConfig) -> str:
    if not cfg.segment_prior:
        return ""
    return (
        f"- The profile fields that put a user in a segment ({cfg.segment_prior!r}): "
        "every interaction of the\n  user is counted in that segment's row, so the fields are "
        "not covered by the per-interaction\n  guarantee (the counts are).\n"
    )


def _not_protected(cfg: FedConfig) -> str:
    evaluation = (
        f"- Federated evaluation (`fraction-evaluate` = {cfg.fraction_evaluate} in this run): "
        "each evaluated client\n  sends its HR@10, NDCG@10 and number of held-out queries on "
        "its own held-out items without\n  noise (they also depend on the training history it "
        "ranks from); the run's federated metrics\n  are computed from them.\n"
        if cfg.fraction_evaluate > 0 and not cfg.secure_agg
        else "- Federated evaluation: none (secure rounds send no evaluation messages).\n"
        if cfg.secure_agg
        else "- Federated evaluation was off (`fraction-evaluate` = 0): clients sent no metrics "
        "on held-out items.\n"
    )
    randomness = (
        "- Randomness (`dp-noise` = secure): no sampling (every example every round); the "
        "clients' rounding\n  and Skellam noise come from NumPy's PCG64 seeded with 128 bits of "
        "OS entropy; negatives and\n  masks from NumPy's PCG64 keyed by BLAKE2b of a 32-byte OS "
        "secret per round.\n"
        if cfg.dp and cfg.dp_noise == "secure"
        else "- Randomness: Poisson sampling "
        + ("comes" if cfg.dp_noise == "server" else "and noise come")
        + " from PyTorch's generator seeded from OS "
        "entropy,\n  not a cryptographically secure generator (Opacus' secure mode is not used"
        + ("; the server's noise comes from the OS CSPRNG" if cfg.dp_noise == "server" else "")
        + "); "
        "negatives and\n  masks from NumPy's PCG64 keyed by BLAKE2b of a 32-byte OS secret per "
        "round.\n"
        if cfg.dp
        else "- Randomness of local training: without local DP-SGD (this run) each client's "
        "negatives\n  and cold-dropout masks are keyed by the run seed, the round and the client's "
        "name, which the\n  server knows (its sampling uses OS entropy). "
        "The user-level guarantee, when on, does not rest on them: it bounds what the clipped, "
        "noised update\n  reveals whatever a client computed from its data.\n"
    )
    from fedrec.shared.backbone import same_backbone

    prior_encoder = cfg.cold_prior_backbone
    other = bool(prior_encoder) and not same_backbone(prior_encoder, cfg.backbone)
    prior = (
        textwrap.fill(
            f"The cold prior (`cold-prior` = {cfg.cold_prior}): after the last round the server "
            "regresses the released model's item biases on the public catalog texts ("
            + (
                f"embedded by `{cfg.cold_prior_backbone}`, an encoder only the server loads"
                if other
                else "embedded by the model's frozen backbone"
            )
            + ") and gives the items the protocol declared new (public, not derived from "
            "interactions) the prediction: post-processing of the released model and public "
            "data, under the guarantees above"
            + (
                ", provided that encoder was pretrained on data independent of this "
                "federation's (a folder fine-tuned on the clients' interactions would not be)"
                if other
                else ""
            )
            + ". If the prior cannot be fitted, cold items keep no bias (`metrics.json` "
            "`model.cold_prior.error` says why).",
            width=96,
            initial_indent="- ",
            subsequent_indent="  ",
            break_on_hyphens=False,
        )
        + "\n"
        if cfg.cold_prior > 0
        else ""
    )
    if cfg.ema_decay > 0:
        prior += (
            f"- The model average (`ema-decay` = {cfg.ema_decay:g}): the released model is the "
            "moving average of the\n  rounds' global models, each a function of the rounds' "
            "privatized aggregates and the\n  public initial model: post-processing, under the "
            "guarantees above.\n"
        )
    partial = (
        "- Partial replies: a client whose reply is lost after it trained has spent budget that "
        "the\n  server's ledger misses; the client's own budget file has it.\n"
    )
    if cfg.secure_agg and cfg.dp and cfg.dp_noise == "secure":
        roster_secure = (
            " So is each silo's roster (which users' data it holds): fedrec counts its users as "
            "those with a training interaction "
            "and assigns\n  users to silos from that list: an interaction that is its user's "
            "only training interaction\n  changes the assignment, which the per-interaction "
            "guarantee does not cover."
        )
    else:
        roster_secure = ""
    if cfg.secure_agg:
        replies = (
            "- A secure round's reply holds only the masked vector and constants: whether the "
            "client trained\n  or had data is not sent (a client without data sends a zero "
            "change with its noise share,\n  and so does a device, a SuperNode with `data-dir`, "
            "whose training failed; in a simulation a\n  failed client's error reaches the "
            "server, a visible dropout: there it is a bug to see).\n"
        )
        roster = roster_secure
        counts = (
            "- Per round, `metrics.json` and `privacy/secagg.jsonl` record how many clients "
            "replied at each stage\n  and survived, whether the round was released, and each "
            "stage's wall-clock seconds and bytes:\n  these are not noised (the masked-input "
            "stage lasts until the slowest client has trained).\n"
        )
    else:
        replies = (
            "- Under DP a reply's example count, training loss and duration are constants (1, "
            "0, 0): they\n  are computed from the data, so they are not sent. Its epsilon, steps "
            "and accountant\n  history are functions of the public mechanism and of which rounds "
            "the client joined.\n"
        )
        roster = (
            " So is each client's roster (which users' data it holds): it sets\n  the divisor "
            "and, with `sample-rate` 0, the client's sampling rate and noise (published on the\n"
            "  ledger). fedrec counts a client's users as those with at least one training "
            "interaction, and\n  in silo runs assigns users to silos from that list: an "
            "interaction that is a user's only\n  training interaction changes the count (and the "
            "assignment), which the per-interaction\n  guarantee does not cover. A client with no "
            'training data refuses ("no training examples")\n  instead of sending a noise-only '
            "update, so whether a client has any data at all is visible."
        )
        counts = (
            "- Per round, `metrics.json` records how many replies were accepted, refused (with "
            "the client's\n  reason on the ledger), rejected or failed, and whether the round was "
            "aggregated (below\n  `min-replies` it is not): these counts are not noised.\n"
        )
    history = (
        "- A client's reply carries its whole accountant history (`history`, `total-steps`), "
        "which shows\n  what it spent in earlier runs on the same device.\n"
        if cfg.dp and not cfg.secure_agg
        else ""
    )
    server_eval = (
        f"- The server's own evaluation (`evaluate-every` = {cfg.evaluate_every}, and the test "
        "table at the end): it ranks\n  with the released model on the validation and test "
        "queries of the data set it was given (in a\n  simulation, every user's held-out items, "
        "in the clear). The model is covered; the metrics\n  computed from those held-out items "
        "are not noised.\n"
    )
    tuning = (
        "- Settings chosen by comparing runs on the same users' validation data (fedrec's "
        "presets were\n  tuned that way on ML-100K): epsilon is per run; what a choice among "
        "runs reveals is not\n  accounted.\n"
    )
    catalog = (
        "- The item catalog (ids and texts) is public by assumption: negatives are drawn from it"
        "\n  and every client holds it."
    )
    why_longer = (
        "its negatives are\n  drawn per sampled example"
        if cfg.negative_sampling == "keyed"
        else "it trains on more\n  sampled examples"
        + (", up to `max-batch` a step" if cfg.max_batch > 0 else "")
    )
    timing = (
        f"- Reply timing and dropouts: a client's round takes longer with more data ({why_longer}"
        "), and a client with no\n  data answers at once; the server sees when each reply "
        "arrives.\n"
    )
    whole = (
        "- A user's whole history, unless user-level DP is on: the local guarantee is per "
        "interaction; a\n  user with many interactions is protected for each one, not for all "
        "of them together."
    )
    covers = (
        "The guarantee covers the global models the server releases, NOT the clients' replies\n"
        "(`dp-noise` = server: each reply is a clipped change without noise, seen by the server).\n"
        "Everything below is outside it:"
        if cfg.dp and cfg.dp_noise == "server"
        else "The guarantee covers the masked sums the server unmasks and the global models it "
        "releases (`dp-noise` = secure).\nEverything below is outside it:"
        if cfg.dp and cfg.dp_noise == "secure"
        else "The guarantees cover the adapter tensors each client sends (local DP-SGD) and the "
        "global model\nthe server releases (user-level DP, when on). Everything below is outside "
        "them:"
    )
    return f"""## Not protected
{covers}
{replies}{evaluation}{server_eval}{catalog}{roster}
{counts}{timing}{history}{whole}
{_who(cfg)}
- Profile fields when `use-profile` is on ({cfg.use_profile} in this run): a profile feeds every
  example of its user, so it is not covered by the per-interaction guarantee.
{_segment_fields(cfg)}{tuning}{randomness}{prior}{partial if cfg.dp and not cfg.secure_agg else ""}
"""
