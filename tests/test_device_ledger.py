"""A device's user-level record (client/budget.py UserLevelLedger): composition with the
collusion risk taken out of delta, a cap checked under a lock, concurrent runs on one device."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from fedrec.client.budget import UserLevelLedger
from fedrec.shared.privacy import skellam

from .test_strategy import task_identity  # noqa: F401

# about one secure round of the default on ML-100K: 424 minimum survivors x mu 4,541, clip 10
# at scale 102.4 over 4,774 coordinates
ENTRY = {"mu_total": 1.93e6, "l1": 70_750.0, "l2": 1_024.0, "risk": 0.0}


def test_the_collusion_risk_comes_out_of_delta(tmp_path):
    ledger = UserLevelLedger(tmp_path / "user-level-budget.json")
    clean = [dict(ENTRY) for _ in range(3)]
    risky = [dict(ENTRY, risk=2e-5) for _ in range(3)]
    params = [(e["mu_total"], e["l1"], e["l2"]) for e in clean]
    assert ledger.epsilon(clean, 1e-4) == pytest.approx(skellam.composed_epsilon(params, 1e-4))
    # three rounds at risk 2e-5 each leave 4e-5 of the 1e-4 for the mechanism
    assert ledger.epsilon(risky, 1e-4) == pytest.approx(skellam.composed_epsilon(params, 4e-5))
    assert ledger.epsilon(risky, 1e-4) > ledger.epsilon(clean, 1e-4)
    assert ledger.epsilon(risky, 6e-5) == math.inf  # the risks use up delta: no finite bound
    assert ledger.epsilon([], 1e-4) == 0.0


def test_the_record_takes_the_larger_of_the_two_computations_as_a_statement_does(tmp_path):
    """A run's statement claims max(analytic, numerical). At a small budget the noise that
    meets the analytic bound gives a higher numerical epsilon: the device's record must count
    that one, and a cap between the two refuses the round (it was let through before)."""
    ledger = UserLevelLedger(tmp_path / "user-level-budget.json")
    l1, l2, delta = 4.0, 2.0, 1e-5
    mu = skellam.calibrate_mu(0.5, delta, 2, l1, l2)
    entries = [{"mu_total": mu, "l1": l1, "l2": l2, "risk": 0.0}] * 2
    analytic = skellam.skellam_epsilon(mu, l1, l2, 2, delta)
    numerical = skellam.skellam_epsilon_independent(mu, l2, 2, delta)
    assert analytic <= 0.5 < numerical
    assert ledger.epsilon(entries, delta) == pytest.approx(numerical, rel=1e-12)
    # different releases: each curve composed on its own, the same figure when they coincide
    assert skellam.composed_epsilon_independent([(mu, l2), (mu, l2)], delta) == pytest.approx(
        numerical, rel=1e-12
    )
    mixed = skellam.composed_epsilon_independent([(mu, l2), (2 * mu, l2)], delta)
    assert skellam.skellam_epsilon_independent(2 * mu, l2, 2, delta) < mixed < numerical
    ledger.append(entries[0])
    with pytest.raises(ValueError, match="user-epsilon-max"):
        ledger.append(entries[1], cap=(analytic + numerical) / 2, delta=delta)


def test_the_cap_is_checked_again_when_the_entry_is_written(tmp_path):
    """Another run on the device added rounds after this round's first check: the append
    itself refuses, and writes nothing."""
    ledger = UserLevelLedger(tmp_path / "user-level-budget.json")
    one = ledger.epsilon([ENTRY], 1e-4)
    two = ledger.epsilon([ENTRY, ENTRY], 1e-4)
    cap = (one + two) / 2
    ledger.append(dict(ENTRY), cap=cap, delta=1e-4)  # the first round fits
    before = ledger.path.read_bytes()
    with pytest.raises(ValueError, match="user-epsilon-max"):
        ledger.append(dict(ENTRY), cap=cap, delta=1e-4)
    assert ledger.path.read_bytes() == before
    ledger.append(dict(ENTRY))  # no cap: recorded
    assert len(ledger.load()) == 2


def test_concurrent_runs_on_one_device_lose_no_entry(tmp_path):
    """Eight writers (two runs' rounds, say) append 15 entries each at the same time: the
    lock makes every read-modify-write see the others' entries."""
    path = tmp_path / "state" / "user-level-budget.json"
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(15):
                UserLevelLedger(path).append(dict(ENTRY, mu_total=1e6 + 100 * k + i))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    entries = json.loads(path.read_text())["releases"]
    assert len(entries) == 120
    assert len({e["mu_total"] for e in entries}) == 120


def test_concurrent_runs_cannot_pass_the_cap_together(tmp_path):
    """Eight writers race to add rounds under a cap that allows exactly three: three entries
    are written and every other append is refused (the cap is read inside the lock)."""
    path = tmp_path / "user-level-budget.json"
    ledger = UserLevelLedger(path)
    three = ledger.epsilon([ENTRY] * 3, 1e-4)
    four = ledger.epsilon([ENTRY] * 4, 1e-4)
    cap = (three + four) / 2
    written, refused = [], []

    def writer() -> None:
        for _ in range(3):
            try:
                UserLevelLedger(path).append(dict(ENTRY), cap=cap, delta=1e-4)
                written.append(1)
            except ValueError:
                refused.append(1)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ledger.load()) == 3 and len(written) == 3 and len(refused) == 21


def test_a_failed_write_leaves_the_record_and_no_temp_file(tmp_path, monkeypatch):
    """A write that fails half-way (disk full, say) keeps the previous record whole and leaves
    no temp file beside it."""
    import fedrec.client.budget as budget

    ledger = UserLevelLedger(tmp_path / "user-level-budget.json")
    ledger.append(dict(ENTRY))
    before = ledger.path.read_bytes()

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(budget.json, "dump", full)
    with pytest.raises(OSError, match="No space"):
        ledger.append(dict(ENTRY))
    assert ledger.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "user-level-budget.json",
        "user-level-budget.json.lock",
    ]


def test_a_refusal_tells_the_server_nothing_of_the_record(tmp_path, caplog):
    """The error of a refused round reaches the server: it names the cap, not how many secure
    rounds the device joined, its epsilon or where it keeps its record; the device's own log
    has those."""
    ledger = UserLevelLedger(tmp_path / "user-level-budget.json")
    for _ in range(3):
        ledger.append(dict(ENTRY))
    cap = ledger.epsilon([ENTRY] * 3, 1e-4)  # full
    with caplog.at_level("WARNING", logger="fedrec.client.budget"):
        with pytest.raises(ValueError) as err:
            ledger.append(dict(ENTRY), cap=cap, delta=1e-4)
    said = str(err.value)
    after = ledger.epsilon([ENTRY] * 4, 1e-4)  # what the record would reach
    assert "user-epsilon-max" in said
    assert "3" not in said and str(tmp_path) not in said
    assert f"{cap:.4g}" not in said and f"{after:.4g}" not in said and f"{after:.3g}" not in said
    assert f"{after:.4g}" in caplog.text
    assert "3 earlier secure rounds" in caplog.text and str(ledger.path) in caplog.text


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"user-epsilon-max": "nan", "user-delta-max": 1e-4}, "finite number > 0"),
        ({"user-epsilon-max": 0, "user-delta-max": 1e-4}, "finite number > 0"),
        ({"user-epsilon-max": "eight", "user-delta-max": 1e-4}, "finite number > 0"),
        ({"user-epsilon-max": 8}, "without user-delta-max"),
        ({"user-epsilon-max": 8, "user-delta-max": 1.5}, r"in \(0, 1\)"),
        ({"user-epsilon-max": 8, "user-delta-max": "tiny"}, r"in \(0, 1\)"),
        ({"user-epsilon-max": 8, "user-delta-max": "nan"}, r"in \(0, 1\)"),
        ({"user-epsilon-max": "inf", "user-delta-max": 1e-4}, "finite number > 0"),
    ],
)
def test_a_bad_user_level_cap_is_a_node_config_error(node, match):
    from fedrec.client.budget import user_level_cap

    with pytest.raises(ValueError, match=match):
        user_level_cap(node)
    assert user_level_cap({}) is None
    assert user_level_cap({"user-epsilon-max": "8", "user-delta-max": "1e-4"}) == (8.0, 1e-4)


def test_a_devices_unreadable_local_budget_tells_the_server_a_constant(
    tmp_path, caplog, monkeypatch
):
    """A device's local-DP budget file that cannot be read or written stops its round with a
    constant message (what a ClientApp error tells the server); the file's path and the fault
    go to the device's log. The CLI's store (not quiet) still names both."""
    from flwr.app import Context, RecordDict

    from fedrec.client.budget import BUDGET_FAILURE, Budget, FileStore, budget_store

    node = {"data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "state")}
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    store = budget_store(ctx, "dev", {})
    assert isinstance(store, FileStore) and store.quiet
    from fedrec.shared.federation.config import FedConfig

    store.save(Budget([(1.2, 0.5, 4)], FedConfig(dp=True).dp_mechanism(), 8.0))
    assert store.load().history == [(1.2, 0.5, 4)]
    store.path.write_text("{not json")
    for attempt in (store.load, lambda: store.update(lambda b: b)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fedrec.client.budget"):
            with pytest.raises(ValueError) as err:
                attempt()
        assert str(err.value) == BUDGET_FAILURE and str(tmp_path) not in str(err.value)
        assert str(store.path) in caplog.text and "refusing to train" in caplog.text
    with pytest.raises(ValueError, match="refusing to train") as err:
        FileStore(store.path).load()  # the CLI's reader: the detail is the user's own
    assert str(store.path) in str(err.value)
    # its lock cannot be taken (the state folder is a file): the same constant
    (tmp_path / "blocked").write_text("")
    blocked = FileStore(tmp_path / "blocked" / "privacy-budget.json", quiet=True)
    with pytest.raises(ValueError) as err:
        blocked.update(lambda b: b)
    assert str(err.value) == BUDGET_FAILURE
    # the write itself fails (a full disk): the same constant, the old file kept
    import fedrec.client.budget as budget_module

    good = FileStore(tmp_path / "good" / "privacy-budget.json", quiet=True)
    good.save(Budget([(1.2, 0.5, 4)], FedConfig(dp=True).dp_mechanism(), 8.0))

    def full(*_a, **_k):
        raise OSError(28, "No space left on device", str(tmp_path / "secret"))

    monkeypatch.setattr(budget_module, "_write_durably", full)
    for attempt in (lambda: good.save(Budget()), lambda: good.update(lambda b: b)):
        with pytest.raises(ValueError) as err:
            attempt()
        assert str(err.value) == BUDGET_FAILURE and "secret" not in str(err.value)
    monkeypatch.undo()
    assert good.load().history == [(1.2, 0.5, 4)]

    # what the change itself raises is its own (a refusal, an accounting error), not the file's
    def refuse(_b):
        raise ValueError("the change's own reason")

    with pytest.raises(ValueError, match="the change's own reason"):
        good.update(refuse)


def test_a_state_folder_without_a_data_folder_is_refused(tmp_path):
    """A node with state-dir keeps a device's record, so it must be a device (data-dir), which
    gets the device's checks; a simulated partition with a state folder is a config error."""
    from fedrec.client.budget import device_state_dir

    with pytest.raises(ValueError, match="state-dir but no data-dir"):
        device_state_dir({"partition-id": 0, "state-dir": str(tmp_path / "s")})
    assert device_state_dir({"partition-id": 0}) is None
    assert device_state_dir({"data-dir": "/d", "state-dir": "/s"}) == Path("/s")
    assert device_state_dir({"data-dir": "/d"}) == Path("/d/fedrec-state")
    assert not (tmp_path / "s").exists()


def test_a_devices_broken_data_or_state_folder_tells_the_server_a_constant(
    tmp_path, synth_dir, caplog
):  # task_identity (autouse, imported): messages need a task
    """A device whose data file cannot be parsed (the error names its path, a line and a value
    of its own history) or whose state folder cannot hold the global model: its plain train
    and evaluate rounds fail with a constant text, what a ClientApp error tells the server; the
    details go to the device's own log. In simulation the error passes as it is."""
    import shutil

    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedrec.client import app as client_app
    from fedrec.shared.federation import contract
    from fedrec.shared.federation.config import FedConfig

    data = tmp_path / "mydata"
    shutil.copytree(synth_dir, data)
    rows = (data / "interactions.tsv").read_text().splitlines()
    (data / "interactions.tsv").write_text(
        "\n".join([*rows[:5], "7\t3\tSECRET-VALUE\t1.0", *rows[5:]])
    )
    node = {"data-dir": str(data), "state-dir": str(tmp_path / "state")}
    cfg = FedConfig(data=str(data)).to_flat()
    for kind, handler in (("train", client_app.train), ("evaluate", client_app.evaluate)):
        msg = Message(RecordDict({contract.CONFIG: ConfigRecord(cfg)}), dst_node_id=1,
                      message_type=kind)  # fmt: skip
        ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        caplog.clear()
        with caplog.at_level("WARNING", logger="fedrec.client.app"):
            with pytest.raises(ValueError) as err:
                handler(msg, ctx)
        assert str(err.value) == client_app.DATA_FAILURE, kind
        assert "SECRET" in caplog.text and str(data) in caplog.text
    # the same data in simulation (no device folder): the error itself, for the developer
    with pytest.raises(ValueError, match="SECRET") as err:
        with client_app.device_private({"partition-id": 0}, client_app.DATA_FAILURE):
            raise ValueError(f"{data}/interactions.tsv:6: 'SECRET-VALUE' is not a number")
    # a state folder that cannot hold the model cache
    with pytest.raises(ValueError) as err:
        with client_app.device_private(node, client_app.CACHE_FAILURE):
            raise NotADirectoryError(20, "Not a directory", str(tmp_path / "state"))
    assert str(err.value) == client_app.CACHE_FAILURE and str(tmp_path) not in str(err.value)


def test_a_budget_file_that_would_under_count_is_refused(tmp_path):
    """Hand-edited or corrupted records that would lower the epsilon (negative or fractional
    steps, a non-positive noise or cap, a rate outside (0, 1], a collusion risk of 1 or more)
    are unreadable: the device refuses to train and `fedrec deploy budget` says so."""
    from fedrec.client.budget import Budget, FileStore, UserLevelLedger
    from fedrec.shared.federation.config import FedConfig

    mech = FedConfig(dp=True).dp_mechanism()
    path = tmp_path / "privacy-budget.json"
    good = {"history": [[2.6, 0.5, 3]], "mechanism": mech, "epsilon_max": 8.0}
    path.write_text(json.dumps(good))
    assert FileStore(path).load() == Budget([(2.6, 0.5, 3)], mech, 8.0)
    for history, cap in (([[2.6, 0.5, 3], [2.6, 0.5, -3]], 8.0), ([[2.6, 0.5, 3.7]], 8.0),
                         ([[0.0, 0.5, 3]], 8.0), ([[2.6, 1.5, 3]], 8.0), ([[2.6, 0.5, True]], 8),
                         ([[2.6, 0.5, 3]], -1), ([[2.6, 0.5, 3]], "8")):  # fmt: skip
        path.write_text(json.dumps(good | {"history": history, "epsilon_max": cap}))
        with pytest.raises(ValueError, match="unreadable"):
            FileStore(path).load()
    record = tmp_path / "user-level-budget.json"
    entry = {"mu_total": 1e6, "l1": 7e4, "l2": 1e3, "risk": 2.0}
    record.write_text(json.dumps({"releases": [entry]}))
    with pytest.raises(ValueError, match="unreadable.*not a probability"):
        UserLevelLedger(record).load()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{}", "no field 'history'"),
        ("[]", "the record is a JSON array, not an object"),
        ("null", "the record is a JSON null, not an object"),
        ('{"history": 5}', "'history' is a JSON number, not an array"),
        ('{"history": {}}', "'history' is a JSON object, not an array"),
        (
            '{"history": [[1, 0.5]]}',
            r"history entry \[1, 0.5\] is not \[noise multiplier, sample rate, steps\]",
        ),  # fmt: skip
        ("notjson", "not valid JSON: Expecting value at line 1, column 1"),
    ],
)
def test_an_unreadable_budget_file_says_what_is_wrong_in_words(tmp_path, text, why):
    """`fedrec deploy budget` and a device name what is wrong with the file (a KeyError's bare
    'history' before, and a file that was not JSON was reported as a missing field)."""
    from fedrec.client.budget import FileStore, UserLevelLedger

    path = tmp_path / "privacy-budget.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"unreadable \\({why}"):
        FileStore(path).load()
    record = tmp_path / "user-level-budget.json"
    for body, want in (("{}", "no field 'releases'"), ('{"releases": [{}]}', "no field 'mu_total'"),
                       ("{", "not valid JSON"), ("null", "the file holds a JSON null"),
                       ('{"releases": 5}', "'releases' is a JSON number, not an array"),
                       ('{"releases": {"a": 1}}', "'releases' is a JSON object, not an array"),
                       ('{"releases": ["x"]}', "release entry 'x' is a JSON string, not an obj"),
                       ('{"releases": [{"mu_total": "1e6", "l1": 1, "l2": 1, "risk": 0}]}',
                        "release entry field 'mu_total' is not a number")):  # fmt: skip
        record.write_text(body)
        with pytest.raises(ValueError, match=f"unreadable \\({want}"):
            UserLevelLedger(record).load()


def test_an_entry_says_which_colluder_rule_its_plan_used(tmp_path, caplog):
    """A device's entry for a secure round records the colluders its plan assumed in the whole
    population (48 of 943 at the default); entries written before that rule (2026-12-03) lack
    the field and are counted as such, so `fedrec deploy budget` and the device's log can say
    that their epsilon is understated; a bad value in the field makes the record unreadable."""
    from fedrec.client import secure as client_secure
    from fedrec.client.budget import POPULATION_COLLUDERS
    from fedrec.shared.federation.config import FedConfig

    cfg = FedConfig(user_dp=True, secure_agg=True, dp=False)
    state = tmp_path / "state"
    node = {"data-dir": str(tmp_path), "state-dir": str(state)}
    fields = {"cohort": 471, "dim": 4774, "clients": 943}
    ledger, entry = client_secure._user_level_check(cfg, fields, node)
    assert ledger is not None and entry[POPULATION_COLLUDERS] == 48.0  # ceil(5 % of 943)
    path = state / "user-level-budget.json"
    assert ledger.path == path
    older = {k: entry[k] for k in ("mu_total", "l1", "l2", "risk")}  # as written before
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"releases": [older, older]}))
    ledger.append(entry)
    entries = ledger.load()
    assert UserLevelLedger.per_cohort_rule(entries) == 2
    assert [POPULATION_COLLUDERS in e for e in entries] == [False, False, True]
    # the epsilon itself does not depend on the field
    assert ledger.epsilon(entries, 1e-5) == pytest.approx(ledger.epsilon([older] * 3, 1e-5))
    capped = {**node, "user-epsilon-max": 1e3, "user-delta-max": 1e-5}
    with caplog.at_level("WARNING", logger="fedrec.client.secure"):
        client_secure._user_level_check(cfg, fields, capped)
    assert "2 entries" in caplog.text and "per-cohort colluder rule" in caplog.text
    for bad in (-1, "48", True, None):
        path.write_text(json.dumps({"releases": [dict(entry, **{POPULATION_COLLUDERS: bad})]}))
        with pytest.raises(ValueError, match="unreadable.*population_colluders"):
            UserLevelLedger(path).load()
