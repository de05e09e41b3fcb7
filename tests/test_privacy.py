"""Privacy maths: accounting against Opacus' RDP analysis; DP-true example construction."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedrec.shared.model.examples import disjoint_examples, slot_of
from fedrec.shared.privacy.accounting import epsilon_spent, noise_for_budget

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' default orders


def reference_epsilon(runs, delta):
    """Independent path: sum the RDP curves by hand, then convert."""
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=ORDERS) for s, q, n in runs)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return eps


@pytest.mark.parametrize(
    "runs",
    [[(1.0, 0.01, 1000)], [(0.8, 0.05, 200), (1.2, 0.05, 200)], [(2.0, 1.0, 10)]],
)
def test_rdp_epsilon_matches_opacus_analysis(runs):
    assert epsilon_spent(history=runs, delta=1e-5) == pytest.approx(reference_epsilon(runs, 1e-5))


def test_golden_value():
    # sigma 1.0, q 0.01, 1000 steps, delta 1e-5: pinned from Opacus 1.6.0's RDP accountant.
    # (A loose hand bound, RDP(a) ~ 2 q^2 a / sigma^2 per step with the classic conversion, gives
    # about 3.2, an upper estimate consistent with it.)
    assert epsilon_spent(history=[(1.0, 0.01, 1000)], delta=1e-5) == pytest.approx(2.1014, abs=1e-3)


def test_recreating_the_accountant_each_round_under_reports():
    one_round = [(1.0, 0.1, 50)]
    three_rounds = one_round * 3
    assert epsilon_spent(history=three_rounds, delta=1e-5) > 1.5 * epsilon_spent(
        history=one_round, delta=1e-5
    )


def test_noise_for_budget_never_exceeds_it():
    for eps in (1.0, 3.0, 8.0):
        sigma = noise_for_budget(epsilon=eps, delta=1e-5, sample_rate=0.2, steps=100)
        spent = epsilon_spent(history=[(sigma, 0.2, 100)], delta=1e-5)
        assert spent <= eps and spent > 0.9 * eps


@pytest.mark.parametrize(
    "bad", [dict(noise_multiplier=0.0), dict(sample_rate=0.0), dict(sample_rate=1.5)]
)
def test_invalid_mechanism_parameters(bad):
    run = {"noise_multiplier": 1.0, "sample_rate": 0.1, **bad}
    with pytest.raises(ValueError):
        epsilon_spent(history=[(run["noise_multiplier"], run["sample_rate"], 10)], delta=1e-5)


def test_disjoint_examples_each_interaction_in_exactly_one_example():
    rng = np.random.default_rng(0)
    items = rng.choice(500, size=60, replace=False)
    ts = np.sort(rng.integers(0, 10**6, size=60))
    targets, ctx = disjoint_examples(items, ts, slots=8, history_len=60)
    used = list(targets) + [int(i) for i in ctx.ravel() if i >= 0]
    assert sorted(used) == sorted(items.tolist())  # every interaction once, none twice
    assert len(targets) <= 8


def test_removing_one_interaction_changes_exactly_one_example():
    rng = np.random.default_rng(1)
    items = rng.choice(500, size=40, replace=False)
    ts = np.sort(rng.integers(0, 10**6, size=40))

    def examples(keep):
        t, c = disjoint_examples(items[keep], ts[keep], slots=8, history_len=40)
        return {(int(a), tuple(int(x) for x in row if x >= 0)) for a, row in zip(t, c, strict=True)}

    full = examples(np.ones(40, dtype=bool))
    for j in range(40):
        keep = np.ones(40, dtype=bool)
        keep[j] = False
        changed = full ^ examples(keep)
        # the old example of slot(j) disappears and at most one new one (same slot) appears
        assert 1 <= len(changed) <= 2
        slot = slot_of(int(items[j]), int(ts[j]), key=0, slots=8)
        touched = {
            slot_of(int(a), int(ts[list(items).index(a)]), key=0, slots=8) for a, _ in changed
        }
        assert touched == {slot}


def test_memoized_rdp_equals_opacus_accountant_object():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.1, 0.5, 12), (0.9, 0.25, 3), (1.1, 0.5, 4)]
    assert epsilon_spent(history=acc.history, delta=1e-5) == pytest.approx(
        acc.get_epsilon(delta=1e-5), rel=1e-12
    )


def test_group_epsilon_is_the_group_privacy_bound():
    """group_epsilon against a brute-force search of the same bound, on a made-up privacy curve,
    and on the RDP accountant: the reported epsilon's delta condition holds."""
    import math

    from fedrec.shared.privacy.accounting import group_epsilon

    def curve(d):  # a Gaussian-like curve: epsilon grows like sqrt(log 1/d)
        return 0.2 * math.sqrt(2 * math.log(1.25 / d))

    delta, k = 1e-5, 5
    got = group_epsilon(curve, delta, k)
    grid = [delta / k * 10 ** (-j / 8) for j in range(321)]
    ok = [d for d in grid if d * sum(math.exp(i * curve(d)) for i in range(k)) <= delta]
    assert got == pytest.approx(k * curve(max(ok)))
    assert got > k * curve(delta)  # the example-level delta is smaller than delta
    # on the accountant: group 1 is the plain epsilon; larger groups cost more
    h = [(1.0, 0.05, 200)]
    e1 = epsilon_spent(history=h, delta=delta)
    assert epsilon_spent(history=h, delta=delta, group=1) == e1
    e3, e9 = (epsilon_spent(history=h, delta=delta, group=g) for g in (3, 9))
    assert 3 * e1 < e3 < e9


def test_noise_for_a_group_budget_never_exceeds_it_and_is_tight():
    for k in (3, 9):
        sigma = noise_for_budget(epsilon=8.0, delta=1e-5, sample_rate=0.05, steps=100, group=k)
        run = [(sigma, 0.05, 100)]
        assert epsilon_spent(history=run, delta=1e-5, group=k) <= 8.0
        less = [(sigma * 0.99, 0.05, 100)]
        assert epsilon_spent(history=less, delta=1e-5, group=k) > 8.0
    with pytest.raises(ValueError, match="accountant='rdp'"):
        noise_for_budget(
            epsilon=8.0, delta=1e-5, sample_rate=0.05, steps=100, group=3, accountant="prv"
        )


def test_statement_names_the_group_for_sliding_window_examples():
    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.privacy.statement import statement

    p = {"rounds_per_client": {"2": 3}, "clients": 3, "epsilon_max": 7.9, "epsilon_median": 7.9,
         "refusals": 0}  # fmt: skip
    seq = statement(FedConfig(examples="sequence", history_len=4, accountant="rdp"), p)
    assert "group-privacy bound for 9" in seq
    plain = statement(FedConfig(), p)
    assert "exactly one training" in plain and "group-privacy" not in plain
    # the statement says the example-level adjacency is a replacement, what is released in the
    # clear, and that the catalog is assumed public
    assert "REPLACES it" in plain and "replace-one" in plain
    assert "item catalog (ids and texts) is public" in plain
    assert "Federated evaluation was off" in plain
    assert "sends its HR@10" in statement(FedConfig(fraction_evaluate=0.5), p)
    # the negatives are described as the run draws them (it said 'keyed' for shared ones)
    flat = lambda t: " ".join(t.split())  # noqa: E731
    assert "Each example's negatives and cold-dropout mask are a keyed hash" in flat(plain)
    assert "except an interaction that is its user's only training interaction" in flat(plain)
    shared = flat(statement(FedConfig(negative_sampling="shared"), p))
    assert "one set for the whole batch" in shared and "Each example's negatives" not in shared


def test_statement_names_the_encoder_the_cold_prior_reads():
    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.privacy.statement import statement

    p = {"rounds_per_client": {"2": 3}, "clients": 3, "epsilon_max": 7.9, "epsilon_median": 7.9,
         "refusals": 0}  # fmt: skip
    flat = lambda t: " ".join(t.split())  # noqa: E731
    assert "cold prior" not in flat(statement(FedConfig(protocol="B"), p))
    own = flat(statement(FedConfig(protocol="B", cold_prior=1.0), p))
    assert "embedded by the model's frozen backbone" in own and "post-processing" in own
    other = flat(statement(FedConfig(protocol="B", cold_prior=1.0, cold_prior_backbone="mpnet"), p))
    assert "embedded by `mpnet`, an encoder only the server loads" in other
    assert "pretrained on data independent of this federation's" in other
    assert "pretrained on data independent" not in own and "`model.cold_prior.error`" in own
    named = FedConfig(protocol="B", cold_prior=1.0, cold_prior_backbone="minilm")
    assert "embedded by the model's frozen backbone" in flat(statement(named, p))
    from fedrec.shared.backbone import resolve_backbone

    folder = FedConfig(protocol="B", cold_prior=1.0,
                       cold_prior_backbone=str(resolve_backbone("minilm")))  # fmt: skip
    assert "embedded by the model's frozen backbone" in flat(statement(folder, p))


def test_statement_says_what_local_randomness_the_server_can_know():
    """Without local DP a client's negatives are keyed by things the server knows (run seed,
    round, client name); with local DP by an OS secret. The statement says which."""
    import warnings

    from fedrec.client.app import _name_key
    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.privacy.statement import _not_protected

    assert "32-byte OS secret per round" in _not_protected(FedConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = _not_protected(FedConfig(dp=False, user_dp=True, user_clip=10.0))
    assert "keyed by the run seed, the round and the client's name" in off
    assert "32-byte OS secret" not in off
    # the name's key is stable across processes (Python's str hash is salted per process)
    assert _name_key("p7") == _name_key("p7") and 0 <= _name_key("p7") < 7919
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "from fedrec.client.app import _name_key; print(_name_key('p7'))"],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123", "PATH": ""},
    )  # fmt: skip
    assert int(out.stdout.strip()) == _name_key("p7")


def test_trusted_user_level_statement_claims_replace_one_and_not_add_remove():
    """With a trusted server the sample size follows the number of clients, so one client more
    or fewer can change the divisor and the noise's scale: the statement claims zero-out,
    reports replace-one, and says add/remove is not claimed (it gave the replace-one epsilon
    for adding or removing a client)."""
    import json
    from pathlib import Path

    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.privacy.statement import statement

    run = Path(__file__).parents[1] / "simulations/results/item-offsets/cdp-off16/metrics.json"
    u = json.loads(run.read_text())["privacy"]["user_level"]
    p = {"rounds_per_client": {}, "clients": 943, "epsilon_max": 0.0, "epsilon_median": 0.0,
         "refusals": 0, "user_level": u}  # fmt: skip
    text = statement(FedConfig(user_dp=True, fraction_train=0.5), p)
    assert "epsilon = 7.9936 at delta = 0.0001" in text
    assert "Replace-one (one client's data\n  swapped for another's" in text and "19.3967" in text
    assert "Adding or removing a client is **not claimed**" in text
    assert "adding or removing a client (or swapping" not in text


def test_a_user_level_delta_near_one_over_the_clients_is_flagged():
    """delta 1e-3 for 943 clients allows about one user exposed outright: the statement says so
    and what delta to set; delta 1e-4 (delta x N = 0.094) is flagged too, 1e-5 is not."""
    import json
    from pathlib import Path

    from fedrec.shared.federation.config import FedConfig
    from fedrec.shared.privacy.statement import statement

    run = Path(__file__).parents[1] / "simulations/results/item-offsets/cdp-off16/metrics.json"
    u = json.loads(run.read_text())["privacy"]["user_level"]
    p = {"rounds_per_client": {}, "clients": 943, "epsilon_max": 0.0, "epsilon_median": 0.0,
         "refusals": 0}  # fmt: skip
    cfg = FedConfig(user_dp=True, fraction_train=0.5)
    for delta, flagged in ((1e-3, True), (1e-4, True), (1e-5, False)):
        text = " ".join(statement(cfg, p | {"user_level": u | {"delta": delta}}).split())
        assert ("**On delta**" in text) is flagged, delta
        if flagged:
            assert f"delta x clients = {delta:g} x 943 = {delta * 943:.3g}" in text
            assert "A delta of at most 1e-05 (0.01 / clients)" in text
