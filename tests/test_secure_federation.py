"""Secure aggregation with distributed noise in a real Flower simulation (tiny data and model).

The protocol's pieces are tested alone in tests/test_secagg.py (SecAgg+) and
tests/test_skellam.py (the mechanism and its accountants); here they run through Flower's
Message API end to end, with clients that drop out mid-round.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrec.shared.federation.config import FedConfig


def secure_cfg(synth_dir, tiny_backbone, **kw) -> FedConfig:
    base = dict(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=8,
        num_rounds=2, fraction_train=0.5, evaluate_every=0, local_steps=2, sample_rate=0.5,
        negatives=10, slots=6, lr=0.5, dp=False, user_dp=True, user_clip=0.5, user_epsilon=6.0,
        secure_agg=True,  # 16 neighbours of 30 (auto), threshold 9: 8 dropouts always leave 9
    )  # fmt: skip
    return FedConfig(**(base | kw))


def test_secure_aggregation_round_with_dropouts_is_released_and_audited(
    synth_dir, tiny_backbone, tmp_path
):
    """Partitions p0, p5, ... fail at the masked-input stage (after sharing their keys): the
    server recovers their pairwise masks from the neighbours' shares and releases the sum of
    the survivors; the claim counts only the survivors' noise and `fedrec audit` verifies it."""
    from fedrec.shared.privacy import skellam
    from fedrec.shared.privacy.report import audit_run
    from fedrec.simulations.launch import simulate

    out = tmp_path / "sec"
    cfg = secure_cfg(
        synth_dir, tiny_backbone, secagg_dropout=0.35, secagg_test_dropout="0.2:masked"
    )
    result = simulate(cfg, out, baselines="popularity", num_cpus=2)
    u = result["privacy"]["user_level"]
    sa = u["secure_agg"]
    rounds = [json.loads(x) for x in (out / "privacy" / "secagg.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["released"], r
        # the dropped partitions were in the cohort, shared keys, then failed
        assert r["shared"] == r["cohort"] == sa["cohort"]
        assert sa["min_survivors"] <= r["survivors"] == r["masked"] < r["cohort"]
        assert r["honest_shares"] == r["survivors"] - sa["colluders"] - 1
        assert r["mu_honest"] == pytest.approx(sa["mu_client"] * r["honest_shares"])
    assert u["releases"] == 2 and u["epsilon"] <= 6.0
    mu = min(r["mu_honest"] for r in rounds)
    assert u["epsilon"] == pytest.approx(
        max(
            skellam.skellam_epsilon(
                mu, sa["l1_sensitivity"], sa["l2_sensitivity"], 2, cfg.user_delta
            ),
            skellam.skellam_epsilon_independent(mu, sa["l2_sensitivity"], 2, cfg.user_delta),
        )
    )
    # the model moved: the released sums were applied
    assert all(r["aggregated"] for r in result["model"]["rounds"])
    statement = (out / "privacy" / "statement.md").read_text()
    assert "secure aggregation (distributed noise, no trusted server)" in statement
    report, text = audit_run(out, plot=False)
    assert report["ok"], text
    assert report["secure_aggregation"] is True and report["user_level_dp"]["verified"]

    # a doctored claim (a larger noise share than the config calibrates) fails the audit
    doc = json.loads((out / "metrics.json").read_text())
    doc["privacy"]["user_level"]["secure_agg"]["mu_client"] *= 2
    doc["privacy"]["user_level"]["epsilon"] /= 2
    (out / "metrics.json").write_text(json.dumps(doc))
    report, text = audit_run(out, plot=False)
    assert not report["ok"] and "mu_client" in text


def test_too_many_dropouts_leave_the_round_unreleased(synth_dir, tiny_backbone, tmp_path):
    """Dropouts beyond secagg-dropout: the round is not released, the global model stays, and
    the run claims no release for it."""
    from fedrec.shared.privacy.report import audit_run
    from fedrec.simulations.launch import simulate

    out = tmp_path / "sec-drop"
    cfg = secure_cfg(
        synth_dir, tiny_backbone, num_rounds=1, secagg_dropout=0.05,
        secagg_test_dropout="0.2:masked",
    )  # fmt: skip
    result = simulate(cfg, out, baselines="none", num_cpus=2)
    rec = json.loads((out / "privacy" / "secagg.jsonl").read_text().splitlines()[0])
    assert not rec["released"] and rec["masked"] < rec["cohort"]
    assert result["model"]["rounds"][0]["aggregated"] is False
    assert result["privacy"]["user_level"]["releases"] == 0
    report, text = audit_run(out, plot=False)
    assert report["ok"], text


def test_the_claim_counts_only_shares_the_sum_really_carries():
    """Clients that lie about their noise (add none) up to the assumed colluders plus the
    protected user: the decoded sum still carries at least the noise the claim counts."""
    from fedrec.shared.privacy import skellam
    from fedrec.shared.privacy.distributed import honest_shares

    enc = skellam.SkellamConfig(clip=1.0, scale=50.0, dim=4000, bits=40)
    survivors, colluders, mu = 20, 3, 40.0
    liars = colluders + 1
    rng = np.random.default_rng(0)
    vectors = [
        skellam.encode(np.zeros(enc.dim), enc, 0.0 if i < liars else mu, rng)
        for i in range(survivors)
    ]
    noise = skellam.decode(skellam.modular_sum(vectors, enc.bits), enc) * enc.scale
    claimed_var = 2 * mu * honest_shares(survivors, colluders)
    # the sample variance of 4000 draws is within a few percent of the true one
    assert noise.var() >= 0.9 * claimed_var
    assert noise.var() == pytest.approx(2 * mu * (survivors - liars), rel=0.1)
