"""The privacy statement of a run (``RUN/privacy/statement.md``, DESIGN 4).

The server writes it at the end of a run from the ledger; ``fedrec audit`` prints it again from
its own recomputation of every client's epsilon, so the two can be compared.
"""

from __future__ import annotations

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
            f"the model head and whitelisted metrics left the clients.{table}\n"
        )
    parts = ["# Privacy statement", ""]
    if cfg.dp:
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
    return f"""## Local DP-SGD (per interaction)

- **Unit of privacy**: one interaction (user, item, timestamp) of a client's data.
- **Adjacency**: add/remove one interaction.
- **Mechanism**: local DP-SGD with Opacus at every client: Poisson sampling at rate
  {cfg.sample_rate}, per-example clipping to L2 norm {cfg.max_grad_norm}, Gaussian noise,
  {cfg.local_steps} steps per round. {_examples(cfg)}
- **Accountant**: Opacus {cfg.accountant.upper()}, over each client's whole history (persistent
  across rounds); sampling assumption: Poisson subsampling within the client's own examples.
  No amplification from client sampling by the server is claimed.
- **delta** = {cfg.delta}; **budget** epsilon_max = {cfg.epsilon} per client.
- **Per-client epsilon** ({p["clients"]} clients that took part): max {p["epsilon_max"]:.4f},
  median {p["epsilon_median"]:.4f}. Rounds trained per client: {hist or "none"}.
  Refused rounds (budget): {p["refusals"]}.{bars}
"""


def _examples(cfg: FedConfig) -> str:
    k = cfg.dp_group()
    if k == 1:
        return (
            "Each interaction is in exactly one training example\n  (keyed-hash groups, see "
            "`fedrec.client.local_train`), so per-example DP is per-interaction DP."
        )
    return (
        f"Training examples are sliding windows (`examples=sequence`): one interaction\n  "
        f"changes up to {k} examples (1 + 2 x history-len {cfg.history_len}), so every epsilon "
        f"here is the\n  group-privacy bound for {k} examples at the stated delta "
        "(`fedrec.shared.privacy.accounting.group_epsilon`),\n  not the per-example one."
    )


def _user_level(cfg: FedConfig, u: dict[str, Any]) -> str:
    if not cfg.user_dp:
        return (
            "- **User-level DP**: off (`user-dp=false`). **Secure aggregation**: off (the server "
            "sees each client's update).\n"
        )
    if not u.get("enabled"):
        return "## User-level DP\n\nOn, but the run ended before any round was accounted.\n"
    return f"""## User-level DP (DP-FedAvg, server side)

- **Unit of privacy**: {u["unit"]}. **Adjacency**: {u["adjacency"]}.
- **Mechanism**: {u["mechanism"]}. Each client's whole update is clipped to L2 norm
  {u["clip"]}; the clipped sum is divided by the fixed sample size {u["sampled_per_round"]}
  (of {u["clients"]} clients; missing or rejected clients count as zero) and Gaussian noise of
  std {u["noise_std"]:.4g} (noise multiplier {u["noise_multiplier"]:.4f}) is added.
- **epsilon = {u["epsilon"]:.4f} at delta = {u["delta"]}** after {u["releases"]} noisy
  release(s) (budget {u["epsilon_budget"]}), {u["accounting"]}. Flower samples a fixed number
  of clients without replacement, which is not the Poisson sampling the amplification bound
  assumes; under that assumption it would be {u["epsilon_if_poisson_sampling"]:.4f} (not claimed).
- **Trust**: the server is trusted to clip and add the noise (no secure aggregation: it sees
  each client's update before noise). The noise is drawn from NumPy's global generator, seeded
  from OS entropy at server start; not a cryptographically secure generator.
"""


def _not_protected(cfg: FedConfig) -> str:
    return f"""## Not protected
The guarantees cover the adapter tensors each client sends (local DP-SGD) and the global model
the server releases (user-level DP, when on). Everything below is outside them:
- The number of training examples and the mean training loss each client reports per round:
  computed from the client's data and sent without noise, so they can leak about single
  interactions.
- A user's whole history, unless user-level DP is on: the local guarantee is per interaction; a
  user with many interactions is protected for each one, not for all of them together.
- Which clients took part in which round (client ids in the ledger).
- Profile fields when `use-profile` is on ({cfg.use_profile} in this run): a profile feeds every
  example of its user, so it is not covered by the per-interaction guarantee.
- Randomness: client sampling and noise come from PyTorch's generator seeded from OS entropy,
  not a cryptographically secure generator (Opacus' secure mode is not used).
"""
