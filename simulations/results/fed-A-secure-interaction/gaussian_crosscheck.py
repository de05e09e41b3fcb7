"""A cross-check of the secure runs' composition and conversion with Google's dp-accounting.

    python simulations/results/fed-A-secure-interaction/gaussian_crosscheck.py > \
      simulations/results/fed-A-secure-interaction/gaussian_crosscheck.txt

For each run in ``runs/``: a Gaussian mechanism with the variance the claim counts on the sum
(``2 mu``, ``mu = mu_total_used``: the counted shares of the worst released round) and the
plan's integer L2 sensitivity, composed over the released rounds (``privacy/secagg.jsonl``), at
the accountant's delta; dp-accounting's RDP and PLD epsilons beside the run's claim.

What it checks: the composition over rounds and the RDP-to-(epsilon, delta) conversion, given
fedrec's own sensitivity and share count. What it does not: the sensitivity's derivation, the
shares counted, the collusion bound, or anything specific to the Skellam noise (at these ``mu``
the Skellam RDP bound is the Gaussian's to many digits, so the claim rests on Theorem 3.5 of
Agarwal, Kairouz and Liu 2021). The PLD figure is the Gaussian mechanism's, not a bound for
the Skellam sum, and is not claimed.
"""

import json
import math
from pathlib import Path

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

RUNS = Path(__file__).resolve().parent / "runs"


def crosscheck(run: Path) -> str:
    privacy = json.loads((run / "metrics.json").read_text())["privacy"]
    secure = privacy["secure_interaction"]
    lines = (run / "privacy" / "secagg.jsonl").read_text().splitlines()
    releases = sum(1 for line in lines if json.loads(line)["released"])
    mu = float(secure["mu_total_used"])
    l2 = float(secure["plan"]["l2_sensitivity"])
    delta = float(secure["delta_accountant"])
    multiplier = math.sqrt(2 * mu) / l2
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(multiplier), releases)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event)
    return (
        f"| `{run.name}` | {mu:.4e} | {l2:.2f} | {multiplier:.3f} | {releases} | {delta:g} "
        f"| {float(privacy['epsilon_max']):.4f} | {rdp.get_epsilon(delta):.4f} "
        f"| {pld.get_epsilon(delta):.4f} |"
    )


def main() -> None:
    print(
        "| run | mu counted | L2 sensitivity | multiplier | rounds | delta | claimed epsilon "
        "| dp-accounting RDP | dp-accounting PLD (Gaussian, not claimed) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in sorted(p for p in RUNS.iterdir() if (p / "metrics.json").exists()):
        print(crosscheck(run))


if __name__ == "__main__":
    main()
