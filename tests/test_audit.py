"""`fedrec audit`: epsilon recomputation pinned to Opacus, and every kind of bad ledger caught."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.privacy.accounting import epsilon_spent
from fedrec.shared.privacy.audit import audit_ledger, read_ledger_lines

DELTA = 1e-5
REPLACE = {"delta": DELTA, "accountant": "pld", "adjacency": "replace-one"}

# Pinned from Opacus 1.6.0 (RDPAccountant / PRVAccountant.get_epsilon, history [(sigma, q, steps)]).
GOLDEN = [
    ((1.0, 0.01, 1000), 2.1013652716430564, 1.8383716376346455),
    ((1.78, 0.5, 8), 4.570679056406147, 4.1414440689250105),
    ((0.8, 0.04, 200), 7.101991794503481, 6.212587146904593),
    ((2.0, 0.5, 24), 6.860559821849166, 6.28952684523725),
]


@pytest.mark.parametrize(("run", "rdp", "prv"), GOLDEN)
def test_epsilon_pinned_to_opacus(run, rdp, prv):
    assert epsilon_spent(history=[run], delta=DELTA, accountant="rdp") == pytest.approx(rdp, 1e-9)
    assert epsilon_spent(history=[run], delta=DELTA, accountant="prv") == pytest.approx(prv, 1e-6)


def test_prv_cache_is_order_free_composition():
    a = epsilon_spent(history=[(1.78, 0.5, 8), (1.0, 0.1, 4)], delta=DELTA, accountant="prv")
    b = epsilon_spent(history=[(1.0, 0.1, 4), (1.78, 0.5, 8)], delta=DELTA, accountant="prv")
    assert a == pytest.approx(b, rel=1e-9)


def honest_ledger(*, recreate: bool = False) -> list[dict]:
    """What honest clients write: epsilon over the whole history (or, if ``recreate``, the bug
    of an accountant re-created every round)."""
    sigma, q, steps = 3.0, 0.5, 8
    plan = {"c1": [1, 3, 4], "c2": [2, 4], "c3": [1]}
    lines, hist = [], {}
    for rnd in range(1, 5):
        for client, rounds in plan.items():
            if rnd not in rounds:
                continue
            hist.setdefault(client, []).append((sigma, q, steps))
            h = hist[client][-1:] if recreate else hist[client]
            lines.append(
                {
                    "client": client, "round": rnd, "trained": True, "steps": steps,
                    "total_steps": steps * len(h), "sample_rate": q, "noise_multiplier": sigma,
                    "max_grad_norm": 1.0, "delta": DELTA, "accountant": "pld",
                    "adjacency": "replace-one", "group_size": 1,
                    "epsilon_after": epsilon_spent(history=h, **REPLACE), "epsilon_max": 8.0,
                    "accepted": True,
                }
            )  # fmt: skip
    return lines


def write(path: Path, lines: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)
    return path


def errors(audit) -> list[str]:
    return [str(f) for f in audit.errors]


def test_honest_ledger_passes(tmp_path):
    audit = audit_ledger(write(tmp_path / "l.jsonl", honest_ledger()), budget=8.0)
    assert audit.ok, errors(audit)
    c1 = audit.clients["c1"]
    assert c1.rounds == [1, 3, 4]
    assert c1.epsilon == pytest.approx(c1.epsilon_reported)
    # the independent accountant (Opacus PRV numerics) agrees within 2 %
    assert c1.independent == "prv"
    assert c1.epsilon_independent == pytest.approx(c1.epsilon, rel=0.02)
    # budget view: one more round of c3 (1 round so far) fits, c1 (3 rounds, eps ~8) none
    assert audit.clients["c1"].more_rounds == 0
    assert audit.clients["c3"].more_rounds == 2
    assert audit.clients["c3"].budget_left == pytest.approx(8.0 - audit.clients["c3"].epsilon)


def test_under_reported_epsilon_is_caught(tmp_path):
    lines = honest_ledger()
    lines[3]["epsilon_after"] *= 0.9  # c1, round 3
    audit = audit_ledger(write(tmp_path / "l.jsonl", lines), budget=8.0)
    assert not audit.ok
    (msg,) = errors(audit)
    assert "client c1" in msg and "round 3" in msg and "under-reports" in msg


def test_recreated_accountant_is_caught(tmp_path):
    audit = audit_ledger(write(tmp_path / "l.jsonl", honest_ledger(recreate=True)), budget=8.0)
    bad = {(f.client, f.round) for f in audit.errors}
    # every second-or-later round of a client under-reports; first rounds are fine
    assert bad >= {("c1", 3), ("c1", 4), ("c2", 4)}
    assert ("c1", 1) not in bad and ("c3", 1) not in bad


def test_missing_round_is_caught_as_a_gap(tmp_path):
    lines = [x for x in honest_ledger() if (x["client"], x["round"]) != ("c1", 3)]
    audit = audit_ledger(write(tmp_path / "l.jsonl", lines), budget=8.0)
    msgs = errors(audit)
    assert any("client c1" in m and "round 4" in m and "gap" in m for m in msgs), msgs
    # without total_steps the epsilon mismatch still gives it away
    for x in lines:
        x.pop("total_steps")
    audit = audit_ledger(write(tmp_path / "l2.jsonl", lines), budget=8.0)
    msgs = errors(audit)
    assert any("client c1" in m and "round 4" in m and "more than the ledger" in m for m in msgs)


def test_lost_round_explained_by_the_clients_history_is_a_counted_warning(tmp_path):
    """A reply lost to a timeout or a stopped run: the client spent, the ledger lacks the round.
    With the client's reported history the audit counts the steps (warning); a history that
    lacks what the ledger has is not believed (error)."""
    lines = honest_ledger()
    hist: dict[str, int] = {}
    for x in lines:
        hist[x["client"]] = hist.get(x["client"], 0) + x["steps"]
        x["history"] = [[x["noise_multiplier"], x["sample_rate"], hist[x["client"]]]]
    lost = [x for x in lines if (x["client"], x["round"]) != ("c1", 3)]
    audit = audit_ledger(write(tmp_path / "l.jsonl", lost), budget=8.0)
    assert audit.ok, errors(audit)
    (gap,) = [f for f in audit.findings if "gap" in f.message]
    assert gap.severity == "warning" and (gap.client, gap.round) == ("c1", 4)
    c1 = audit.clients["c1"]
    assert c1.unledgered_steps == 8 and c1.rounds == [1, 4]
    assert c1.epsilon == pytest.approx(c1.epsilon_reported)  # 3 rounds' worth, not 2
    full = audit_ledger(write(tmp_path / "full.jsonl", lines), budget=8.0).clients["c1"]
    assert c1.epsilon == pytest.approx(full.epsilon)
    assert c1.epsilon_independent == pytest.approx(full.epsilon_independent)
    # a history claiming less than the ledger's lines is not believed
    short = [dict(x) for x in lost]
    for x in short:
        if (x["client"], x["round"]) == ("c1", 4):
            x["history"] = [[x["noise_multiplier"], x["sample_rate"], 4]]
    audit = audit_ledger(write(tmp_path / "s.jsonl", short), budget=8.0)
    assert any("client c1" in m and "round 4" in m and "gap" in m for m in errors(audit))


def test_duplicate_over_budget_and_malformed_lines(tmp_path):
    lines = honest_ledger()
    dup = dict(lines[0])
    lines.insert(2, dup)
    audit = audit_ledger(write(tmp_path / "dup.jsonl", lines), budget=8.0)
    assert any("duplicate" in m and "client c1" in m and "round 1" in m for m in errors(audit))

    audit = audit_ledger(write(tmp_path / "b.jsonl", honest_ledger()), budget=7.0)
    assert any("over budget" in m and "client c1" in m and "round 4" in m for m in errors(audit))

    lines = honest_ledger()
    lines[1]["sample_rate"] = 1.5
    path = write(tmp_path / "m.jsonl", lines)
    path.write_text(path.read_text().replace('"c2"', "{", 1))  # garbage in the middle
    audit = audit_ledger(path, budget=8.0)
    assert any("ledger line" in m and ("JSON" in m or "sample_rate" in m) for m in errors(audit))


def test_truncated_last_line_is_reported_not_fatal(tmp_path):
    lines = honest_ledger()
    path = write(tmp_path / "t.jsonl", lines, tail=json.dumps(lines[-1])[:40])
    entries, findings = read_ledger_lines(path)
    assert len(entries) == len(lines)
    (f,) = findings
    assert f.severity == "warning" and "truncated" in f.message and f.line == len(lines) + 1
    assert audit_ledger(path, budget=8.0).ok


def make_run(tmp_path: Path, lines: list[dict], claim: float | None = None, **cfg_kw) -> Path:
    run = tmp_path / "run"
    (run / "privacy").mkdir(parents=True)
    # the honest ledgers' mechanism: noise multiplier 3.0, q 0.5, 8 steps (the defaults' q, steps)
    cfg = FedConfig(**({"num_rounds": 4, "epsilon": 8.0, "noise_multiplier": 3.0} | cfg_kw))
    (run / "config.json").write_text(json.dumps({"federation": cfg.as_dict()}))
    eps = max(x["epsilon_after"] for x in lines)
    (run / "metrics.json").write_text(json.dumps({"privacy": {"epsilon_max": claim or eps}}))
    write(run / "privacy" / "ledger.jsonl", lines)
    return run


def audit_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedrec", "audit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_exit_codes_and_outputs(tmp_path):
    run = make_run(tmp_path, honest_ledger())
    ok = audit_cli(str(run))
    assert ok.returncode == 0, ok.stderr
    assert "Result: PASS" in ok.stdout and "Unit of privacy" in ok.stdout
    assert (run / "privacy" / "epsilon.png").stat().st_size > 0
    js = json.loads(audit_cli(str(run), "--json").stdout)
    assert js["ok"] and js["accountant"] == "pld"
    assert js["summary"]["epsilon_max"] == pytest.approx(js["clients"]["c1"]["epsilon"])
    assert js["clients"]["c1"]["independent"] == "prv"

    lines = honest_ledger()
    lines[-1]["epsilon_after"] = 0.5  # c2, round 4
    bad = audit_cli(str(make_run(tmp_path / "t", lines)))
    assert bad.returncode == 1
    assert "client c2, round 4" in bad.stdout and "Result: FAIL" in bad.stdout

    # the run's own claim below the recomputed epsilon
    low = audit_cli(str(make_run(tmp_path / "c", honest_ledger(), claim=1.0)))
    assert low.returncode == 1 and "metrics.json claims" in low.stdout

    missing = audit_cli(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "config.json" in missing.stderr


def _strict_json(text: str):
    """json.loads that rejects Python's non-standard Infinity/NaN, as jq or JavaScript do."""

    def reject(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=reject)


def test_cli_json_is_strict_json_when_a_bound_is_infinite(tmp_path):
    """A client whose epsilon is infinite (sliding windows in config.json: group privacy over 41
    examples at this sigma has no finite bound) must still give valid JSON, null for that value,
    not Python's Infinity."""
    run = make_run(tmp_path, honest_ledger(), accountant="rdp", examples="sequence")
    r = audit_cli(str(run), "--json")
    js = _strict_json(r.stdout)
    assert r.returncode == 1  # the ledger's replace-one claims are not the config's mechanism
    c1 = js["clients"]["c1"]
    assert c1["independent"] == "dp-accounting-rdp" and c1["group"] == 41
    assert c1["epsilon"] is None and c1["epsilon_independent"] is None


def test_audit_checks_each_line_against_the_configs_mechanism(tmp_path):
    """A ledger whose lines claim less noise or more steps than config.json calibrates fails,
    even when every epsilon on it is recomputed consistently; and a claim a hair below the
    recomputation is caught (no two-sided slack for under-reporting)."""
    lines, h = honest_ledger(), {}
    for line in lines:  # a consistent ledger, but at noise 2.5 where config.json says 3.0
        h.setdefault(line["client"], []).append((2.5, 0.5, 8))
        line["noise_multiplier"] = 2.5
        line["epsilon_max"] = 100.0
        line["epsilon_after"] = epsilon_spent(history=h[line["client"]], **REPLACE)
    r = audit_cli(str(make_run(tmp_path / "n", lines, epsilon=100.0)))
    assert r.returncode == 1 and "not the one config.json calibrates" in r.stdout
    lines = honest_ledger()
    lines[-1]["epsilon_after"] *= 1 - 0.005  # 0.5 % low: inside the old two-sided 1 %
    audit = audit_ledger(write(tmp_path / "low.jsonl", lines), budget=8.0)
    assert any("under-reports" in m for m in errors(audit))


def test_audit_recomputes_under_the_config_mechanism_not_the_ledgers_word(tmp_path):
    """An older ledger claimed add/remove for disjoint examples: the audit takes the adjacency
    from config.json (one interaction replaces an example), names the mismatch and recomputes
    the larger replace-one epsilon, so the claim fails."""
    lines, h = honest_ledger(), {}
    for line in lines:  # what fedrec wrote before: add/remove epsilon, no adjacency field
        h.setdefault(line["client"], []).append((3.0, 0.5, 8))
        del line["adjacency"]
        line["epsilon_after"] = epsilon_spent(history=h[line["client"]], delta=DELTA,
                                              accountant="pld")  # fmt: skip
    assert audit_ledger(write(tmp_path / "old.jsonl", lines), budget=8.0).ok  # its own word
    run = make_run(tmp_path, lines)
    r = audit_cli(str(run))
    assert r.returncode == 1
    assert "adjacency 'add-remove' (config.json: 'replace-one')" in r.stdout
    assert "under-reports" in r.stdout


# --- empirical audit (one-run, Steinke et al. 2023) ----------------------------------------------
def test_lower_bound_matches_the_closed_form_when_all_guesses_are_right():
    """delta = 0, v = r: P[Bin(r, q) >= r] = q^r, so the bound is logit(level^(1/r))."""
    import math

    from fedrec.shared.privacy.empirical import epsilon_lower_bound, p_value

    for r in (10, 50, 200):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0, 0.05) == pytest.approx(
            math.log(q / (1 - q)), abs=1e-6
        )
    # delta > 0 only weakens the bound; more wrong guesses weaken it; chance level gives 0
    assert epsilon_lower_bound(1000, 100, 100, 1e-5, 0.05) < epsilon_lower_bound(
        1000, 100, 100, 0.0, 0.05
    )
    assert epsilon_lower_bound(1000, 100, 90, 0.0, 0.05) < epsilon_lower_bound(
        1000, 100, 100, 0.0, 0.05
    )
    assert epsilon_lower_bound(1000, 100, 50, 1e-5, 0.05) == 0.0
    assert p_value(1000, 100, 60, 0.0, 0.0) == pytest.approx(0.02844, abs=1e-4)  # Bin(100, 1/2)
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 20, 5, 1.0, 0.0)


def test_attack_statistics_on_known_score_distributions():
    import numpy as np

    from fedrec.shared.privacy.empirical import membership_stats, one_run_bound

    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    noise = rng.normal(size=1000)
    null = one_run_bound(noise, included, 1e-5)  # scores independent of membership
    assert null["epsilon"] < 0.5 and 4.0 < null["ceiling"] < 5.0
    assert 0.45 < membership_stats(noise, included)["auc"] < 0.55
    leak = noise + 4.0 * included  # a model that memorises its canaries
    stats = membership_stats(leak, included)
    assert stats["auc"] > 0.97 and stats["tpr_at_1pct_fpr"] > 0.5
    assert one_run_bound(leak, included, 1e-5)["epsilon"] > 3.0


def test_canaries_are_interactions_through_the_example_builder(tmp_path):
    """Empirical-audit canaries at the claimed unit: one interaction each, inserted into the
    client's history after its last one and turned into examples by the real builder (each
    included canary is in exactly one example); other clients' canaries never appear; a file
    of another unit is refused."""
    import numpy as np

    from fedrec.client.local_train import build_examples
    from fedrec.client.runtime import with_canaries
    from fedrec.shared.privacy.empirical import client_file, plan_canaries

    rng = np.random.default_rng(3)
    plan = plan_canaries(np.arange(100, 140), np.arange(50), ["p0", "p1", "p2"], 4, rng)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(client_file(plan)))
    items, times = np.arange(1, 13), np.arange(1000, 1012)
    for name in ("p0", "p1", "p2"):
        mine = [i for i, inc, o in zip(plan["item"], plan["included"], plan["client"], strict=True)
                if inc and o == name]  # fmt: skip
        ((got_items, got_times),) = with_canaries([(items, times)], path, name)
        assert got_items.tolist() == items.tolist() + mine
        assert got_times[:12].tolist() == times.tolist() and (np.diff(got_times) > 0).all()
        ex = build_examples([(got_items, got_times)], slots=5, history_len=20, key=0)
        seen = np.concatenate([ex.targets, ex.context[ex.context >= 0]]).tolist()
        assert all(seen.count(c) == 1 for c in mine)  # each canary in exactly one example
        assert not set(seen) & (set(range(100, 140)) - set(mine))
    assert sum(plan["included"]) == sum(len(v) for v in client_file(plan)["clients"].values())
    path.write_text(json.dumps({"clients": {"p0": [[100, 1, 2]]}}))  # an older example file
    with pytest.raises(ValueError, match="unit None"):
        with_canaries([(items, times)], path, "p0")


def test_budget_carried_from_an_earlier_run_is_verified(tmp_path):
    """A device's budget spans runs: its first line in a new run carries earlier spending."""
    sigma, q, steps = 3.0, 0.5, 8
    line = {
        "client": "dev", "round": 1, "trained": True, "steps": steps, "total_steps": 2 * steps,
        "sample_rate": q, "noise_multiplier": sigma, "delta": DELTA, "accountant": "pld",
        "adjacency": "replace-one",
        "epsilon_after": epsilon_spent(history=[(sigma, q, 2 * steps)], **REPLACE),
        "history": [[sigma, q, 2 * steps]],
    }  # fmt: skip
    audit = audit_ledger(write(tmp_path / "l.jsonl", [line]), budget=8.0)
    assert audit.ok, errors(audit)
    assert audit.clients["dev"].carried_steps == steps
    assert any(f.severity == "note" and "carries 8" in f.message for f in audit.findings)
    # without the reported history the earlier spending is an unexplained gap
    del line["history"]
    audit = audit_ledger(write(tmp_path / "l2.jsonl", [line]), budget=8.0)
    assert any("gap" in m for m in errors(audit))
    # a history that does not add up to the total is not believed either
    line["history"] = [[sigma, q, steps]]
    audit = audit_ledger(write(tmp_path / "l3.jsonl", [line]), budget=8.0)
    assert not audit.ok


def test_group_size_is_used_to_recompute_epsilon(tmp_path):
    """A ledger of sliding-window clients (group_size 3) is recomputed with group privacy: the
    group epsilon passes, the smaller per-example epsilon is caught as under-reported."""
    lines = honest_ledger()
    h: dict[str, list] = {}
    for line in lines:
        h.setdefault(line["client"], []).append((3.0, 0.5, 8))
        line["group_size"], line["adjacency"], line["accountant"] = 3, "add-remove", "rdp"
        line["epsilon_max"] = 100.0
        line["epsilon_after"] = epsilon_spent(history=h[line["client"]], delta=DELTA, group=3)
    audit = audit_ledger(write(tmp_path / "g.jsonl", lines), budget=100.0)
    assert audit.ok, errors(audit)
    c1 = audit.clients["c1"]
    assert c1.group == 3 and c1.epsilon == pytest.approx(c1.epsilon_reported)
    assert c1.epsilon_independent == pytest.approx(c1.epsilon, rel=0.02)
    for line in lines:  # what a client that forgot the group would report
        line["epsilon_after"] = epsilon_spent(
            history=h[line["client"]][: line["total_steps"] // 8], delta=DELTA, accountant="rdp"
        )
    audit = audit_ledger(write(tmp_path / "u.jsonl", lines), budget=100.0)
    assert not audit.ok and any("c1" in e for e in errors(audit))


def test_write_json_writes_null_for_non_finite_floats(tmp_path):
    from fedrec.shared.rundir import write_json

    write_json(tmp_path / "m.json", {"a": [1.0, math.inf], "b": {"c": -math.inf, "d": math.nan}})
    assert _strict_json((tmp_path / "m.json").read_text()) == {
        "a": [1.0, None], "b": {"c": None, "d": None}
    }  # fmt: skip


def test_reaudit_reports_what_an_old_add_remove_claim_really_spent(tmp_path):
    """simulations/reaudit on a run whose ledger claimed add/remove epsilon for disjoint
    examples: the recomputed replace-one epsilon is larger, and the independent accountant
    agrees with it within 2 %."""
    from fedrec.simulations.reaudit import find_runs, main, reaudit_run

    lines, h = honest_ledger(), {}
    for line in lines:
        h.setdefault(line["client"], []).append((3.0, 0.5, 8))
        del line["adjacency"]
        line["epsilon_after"] = epsilon_spent(history=h[line["client"]], delta=DELTA,
                                              accountant="pld")  # fmt: skip
    run = make_run(tmp_path, lines)
    assert find_runs([tmp_path]) == [run]
    row = reaudit_run(run)
    assert row["adjacency"] == "replace-one" and row["accountant_recomputed"] == "pld"
    assert row["epsilon_claimed_max"] == pytest.approx(max(x["epsilon_after"] for x in lines))
    assert row["epsilon_recomputed_max"] > 1.3 * row["epsilon_claimed_max"]
    assert row["epsilon_independent_max"] == pytest.approx(row["epsilon_recomputed_max"], rel=0.02)
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "replace-one" in (tmp_path / "out" / "reaudit.md").read_text()


def _with_round_counts(run: Path, lines: list[dict], counts: dict[int, int]) -> Path:
    doc = json.loads((run / "metrics.json").read_text())
    doc["model"] = {"rounds": [{"round": r, "accepted": n, "refused": 0, "rejected": 0}
                               for r, n in counts.items()]}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(doc))
    return run


def test_audit_finds_ledger_lines_missing_against_the_rounds_counts(tmp_path):
    """metrics.json counts each round's accepted replies; a ledger with fewer lines for a round
    (here: a client's only line deleted) fails, although every remaining line is consistent."""
    from fedrec.shared.privacy.report import audit_run

    counts = {1: 2, 2: 1, 3: 1, 4: 2}  # honest_ledger's plan
    honest = _with_round_counts(make_run(tmp_path / "a", honest_ledger()), honest_ledger(), counts)
    report, text = audit_run(honest, plot=False)
    assert report["ok"], text
    lines = [x for x in honest_ledger() if x["client"] != "c3"]  # c3 trained in round 1 only
    gap = _with_round_counts(make_run(tmp_path / "b", lines), lines, counts)
    report, text = audit_run(gap, plot=False)
    assert not report["ok"] and "ledger lines are missing" in text


def test_audit_reports_spending_only_a_budget_file_shows(tmp_path):
    """privacy/clients/<name>.json holds a client's whole history: steps beyond the ledger's
    are reported (a warning within the budget, an error above it); garbage is an error."""
    from fedrec.shared.privacy.report import audit_run

    run = make_run(tmp_path, honest_ledger())
    clients = run / "privacy" / "clients"
    clients.mkdir()
    (clients / "c3.json").write_text(json.dumps({"history": [[3.0, 0.5, 16]]}))  # one lost round
    report, text = audit_run(run, plot=False)
    assert report["ok"], text
    assert "records 16 DP steps, the ledger accounts for 8" in text and "within the budget" in text
    (clients / "c3.json").write_text(json.dumps({"history": [[3.0, 0.5, 400]]}))
    report, text = audit_run(run, plot=False)
    assert not report["ok"] and "> the budget 8.0" in text
    (clients / "c3.json").write_text("{not json")
    report, text = audit_run(run, plot=False)
    assert not report["ok"] and "not a readable budget file" in text


def test_an_absurd_round_number_is_an_error_and_draws_no_plot(tmp_path):
    """A ledger line at round 10**7 (num-rounds 4) is reported, and the epsilon plot, whose
    x axis would span ten million rounds, is not drawn."""
    from fedrec.shared.privacy.report import audit_run

    lines = honest_ledger()
    lines[-1] = {**lines[-1], "round": 10**7}
    run = make_run(tmp_path, lines)
    report, text = audit_run(run, plot=True)
    assert not report["ok"] and "10000000" in text
    assert not (run / "privacy" / "epsilon.png").exists()


def test_a_bad_metrics_or_config_file_is_an_error_that_names_it(tmp_path):
    """metrics.json that is not an object, not JSON, or has no numeric claim: the audit fails
    and says which file (a list crashed it; an empty object or a string claim passed silently);
    a config.json whose federation section is not an object: a clear ValueError."""
    from fedrec.shared.privacy.report import audit_run

    for i, text in enumerate(["[1]", "{broken", "{}", '{"privacy": {"epsilon_max": "big"}}']):
        run = make_run(tmp_path / str(i), honest_ledger())
        (run / "metrics.json").write_text(text)
        report, _ = audit_run(run, plot=False)
        assert not report["ok"], text
        found = [f["message"] for f in report["findings"] if f["severity"] == "error"]
        assert any("metrics.json" in m and "claim cannot be checked" in m for m in found), found
    run = make_run(tmp_path / "cfg", honest_ledger())
    (run / "config.json").write_text(json.dumps({"federation": "x"}))
    with pytest.raises(ValueError, match="config.json is not a federated run's config.*str"):
        audit_run(run, plot=False)


@pytest.mark.parametrize("secure", [False, True])
def test_a_user_level_run_with_a_bad_metrics_file_fails_the_audit_and_claims_nothing(
    tmp_path, secure
):
    """User-level runs (trusted server, and secure aggregation: the default preset) with a
    metrics.json missing, not JSON, not an object, or with a field of the wrong type: the
    audit fails naming the file and the statement claims nothing (these crashed it with a
    KeyError or AttributeError and a traceback)."""
    from fedrec.shared.privacy.report import audit_run

    cfg = FedConfig(dp=False, user_dp=True, secure_agg=secure, num_rounds=2, user_delta=1e-4)
    on = '{"privacy": {"user_level": {"enabled": true, '
    texts = [None, "{broken", "[]", "{}", '{"privacy": []}', on + '"releases": "x"}}}',
             on + '"secure_agg": {"cohort": "x"}}}}',
             '{"model": [], ' + on[1:] + '"clients": 10}}}']  # fmt: skip
    for i, text in enumerate(texts):
        run = tmp_path / str(i)
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"federation": cfg.as_dict()}))
        if text is not None:
            (run / "metrics.json").write_text(text)
        report, statement = audit_run(run, plot=False)
        assert not report["ok"], text
        assert any("metrics.json" in f["message"] for f in report["findings"]), (text, report)
        if i < 5:  # no user-level record at all: the statement claims nothing
            assert "nothing is claimed" in " ".join(statement.split()), text
        assert "FAIL" in statement, text
    r = audit_cli(str(tmp_path / "2"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
