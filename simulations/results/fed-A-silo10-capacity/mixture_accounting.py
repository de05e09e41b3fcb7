"""What a tighter accountant for sliding windows would give (a computation, not fedrec's
accountant): the `silos` preset's DP-SGD (q 0.1, 30 steps) accounted by mixtures of Gaussians
instead of group privacy over the neighbour-level epsilon.

Removing one interaction x from a history changes three windows when the context holds two
items: x's own window goes, and the two windows after it get other contexts. fedrec accounts it
as 5 add/remove steps (1 + 2 x 2) by group privacy (`accounting.group_epsilon`). Here the two
datasets D (with x) and D' (without) are chained through U = D plus the two new windows:
D -> U adds 2 windows, U -> D' removes 3. Each window is Poisson-sampled on its own, so one
step of each leg is a Gaussian whose shift is the sum of the sampled windows' clipped
gradients, dominated by the scalar mixture with sensitivity j (j ~ Binomial(k, q)):
Choquette-Choo, Ganesh, Steinke, Thakurta 2023 (arXiv:2310.15526), Corollary 4.7, as
dp-accounting's MixtureGaussianPrivacyLoss documents. The legs compose over the 30 steps
(PLD) and chain as (e_a + e_b, delta_a + e^e_a delta_b) in both orders. "group of 5" is the
same mixture for removing 5 windows, for comparison only (not this adjacency).

Usage: python simulations/results/fed-A-silo10-capacity/mixture_accounting.py
"""

import math

from dp_accounting.pld import privacy_loss_distribution as pld
from scipy.stats import binom

from fedrec.shared.privacy.accounting import epsilon_spent

Q, STEPS, DELTA, GROUP = 0.1, 30, 1e-5, 5


def composed(sigma: float, k: int) -> pld.PrivacyLossDistribution:
    sens = list(range(k + 1))
    probs = [float(binom.pmf(j, k, Q)) for j in sens]
    one = pld.from_mixture_gaussian_mechanism(sigma, sens, probs)
    return one.self_compose(STEPS)


def chained(sigma: float) -> float:
    """The smallest e_a + e_b over a log grid of (delta_a, delta_b) with both orders of the
    chain within DELTA: delta_a + e^e_a delta_b <= DELTA and delta_b + e^e_b delta_a <= DELTA."""
    a, b = composed(sigma, 2), composed(sigma, 3)
    grid = [DELTA * 10 ** (-j / 4) for j in range(1, 29)]
    ea = {d: a.get_epsilon_for_delta(d) for d in grid}
    eb = {d: b.get_epsilon_for_delta(d) for d in grid}
    best = math.inf
    for da in grid:
        for db in grid:
            if da + math.exp(ea[da]) * db <= DELTA and db + math.exp(eb[db]) * da <= DELTA:
                best = min(best, ea[da] + eb[db])
    return best


print("| noise multiplier | fedrec's epsilon (group privacy, RDP) | chained mixtures "
      "| mixture, group of 5 removals |")  # fmt: skip
print("|---:|---:|---:|---:|")
for sigma in (2.40, 2.10, 4.62, 11.60):
    ours = epsilon_spent(history=[(sigma, Q, STEPS)], delta=DELTA, accountant="rdp", group=GROUP)
    five = composed(sigma, GROUP).get_epsilon_for_delta(DELTA)
    print(f"| {sigma:.2f} | {ours:.3f} | {chained(sigma):.3f} | {five:.3f} |")
