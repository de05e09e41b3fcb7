"""The privacy statement of a run (``RUN/privacy/statement.md``, DESIGN 4).

The server writes it at the end of a run from the ledger; ``fedrec audit`` prints it again from
its own recomputation of every client's epsilon, so the two can be compared.
"""

from __future__ import annotations

from typing import Any

from fedrec.shared.federation.config import FedConfig


def statement(cfg: FedConfig, p: dict[str, Any]) -> str:
    """The run's privacy statement (``RUN/privacy/statement.md``); ``fedrec audit`` checks it."""
    if not cfg.dp:
        return (
            "# Privacy statement\n\nDifferential privacy was OFF for this run: client updates are "
            "the plain result of local SGD and carry no formal guarantee. Only adapter tensors "
            "and whitelisted metrics left the clients.\n"
        )
    hist = ", ".join(f"{k} round(s): {v} client(s)" for k, v in p["rounds_per_client"].items())
    bars = ""
    if p.get("histogram"):
        most = max(n for _lo, _hi, n in p["histogram"]) or 1
        rows = [
            f"    {lo:7.3f} - {hi:7.3f} | {'#' * max(1 if n else 0, round(30 * n / most))} {n}"
            for lo, hi, n in p["histogram"]
        ]
        bars = "\n  Distribution of per-client epsilon:\n\n" + "\n".join(rows) + "\n"
    return f"""# Privacy statement

- **Unit of privacy**: one interaction (user, item, timestamp) of a client's data.
- **Adjacency**: add/remove one interaction.
- **Mechanism**: local DP-SGD with Opacus at every client: Poisson sampling at rate
  {cfg.sample_rate}, per-example clipping to L2 norm {cfg.max_grad_norm}, Gaussian noise,
  {cfg.local_steps} steps per round. Each interaction is in exactly one training example
  (keyed-hash groups, see `fedrec.client.local_train`), so per-example DP is per-interaction DP.
- **Accountant**: Opacus {cfg.accountant.upper()}, over each client's whole history (persistent
  across rounds); sampling assumption: Poisson subsampling within the client's own examples.
  No amplification from client sampling by the server is claimed.
- **delta** = {cfg.delta}; **budget** epsilon_max = {cfg.epsilon} per client.
- **Per-client epsilon** ({p["clients"]} clients that took part): max {p["epsilon_max"]:.4f},
  median {p["epsilon_median"]:.4f}. Rounds trained per client: {hist or "none"}.
  Refused rounds (budget): {p["refusals"]}.{bars}
- **User-level DP**: off (not available yet). **Secure aggregation**: off (the server sees each
  client's noised update).

## Not protected
The guarantee covers the adapter tensors each client sends. Everything below is outside it:
- The number of training examples and the mean training loss each client reports per round:
  computed from the client's data and sent without noise, so they can leak about single
  interactions.
- A user's whole history: the guarantee is per interaction; a user with many interactions is
  protected for each one, not for all of them together (user-level DP is off).
- Which clients took part in which round (client ids in the ledger).
- Profile fields when `use-profile` is on ({cfg.use_profile} in this run): a profile feeds every
  example of its user, so it is not covered by the per-interaction guarantee.
- Randomness: sampling and noise come from PyTorch's generator seeded from OS entropy, not a
  cryptographically secure generator (Opacus' secure mode is not used).
"""
