"""``factor-rows``: a round trains only the per-item rows (factors, offsets) of the items the global
model's learned bias ranks highest. The selection reads the released model only; the other rows get
exactly zero per-example gradient and no noise, and the accounting is the same as without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

import fedrec.client.local_train as lt
from fedrec.client.budget import MemoryStore
from fedrec.client.local_train import batch_loss, quiet_opacus_hooks, train_round
from fedrec.shared.federation.config import FedConfig
from fedrec.shared.model.candidates import CandidateScorer, top_rows

from .test_dp_training import _cfg, _data
from .test_model import ds, make_model  # noqa: F401 - fixture re-export


@pytest.mark.parametrize("seed", range(5))
def test_top_rows_are_the_highest_biases(seed):
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(5, 300))
    # a few values only, so that ties occur: they go to the lower index
    bias = torch.as_tensor(rng.integers(0, 7, n_items).astype(np.float32))
    n = int(rng.integers(1, n_items + 3))
    mask = top_rows(bias, n)
    assert mask.dtype == torch.bool and mask.shape == (n_items,)
    expected = sorted(range(n_items), key=lambda i: (-float(bias[i]), i))[:n]
    assert sorted(np.flatnonzero(mask.numpy()).tolist()) == sorted(expected)


def test_no_rows_while_the_bias_is_constant():
    """Before the first aggregation every item's bias is 0: a top-n would be the first n items
    of the catalog, chosen by nothing; no row trains instead."""
    assert not top_rows(torch.zeros(50), 10).any()
    assert not top_rows(torch.full((50,), 0.3), 10).any()
    assert not top_rows(torch.randn(50), 0).any()


def _bias(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.item_bias.copy_(torch.randn(model.item_bias.shape, generator=g))


@pytest.mark.parametrize("table", ["item_factors", "item_offsets"])
@pytest.mark.parametrize("seed", range(3))
def test_unselected_rows_get_zero_per_example_gradient(ds, tiny_backbone, seed, table):  # noqa: F811
    """Property test on random biases and examples: with rows selected, every example's
    gradient (Opacus' per-sample gradients, the training loss) is exactly 0 on each unselected
    row and equal to the unmasked gradient on the selected ones; without selection some
    unselected row has a nonzero gradient (the test can fail)."""
    rng = np.random.default_rng(seed)
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True, **{table: 3})
    _bias(model, seed)
    scorer = CandidateScorer(model)
    weight = (scorer.fac if table == "item_factors" else scorer.off).weight
    if table == "item_offsets":  # zero at init: give the rows values, so gradients reach users
        with torch.no_grad():
            weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    cfg = _cfg(backbone=str(tiny_backbone), **{table: 3})
    data = _data(ds)
    idx = np.sort(rng.choice(len(data), size=min(len(data), 12), replace=False))
    batch = [torch.as_tensor(data.context[idx]), torch.as_tensor(data.targets[idx])]
    key = rng.bytes(32)

    def grads(rows: torch.Tensor | None) -> torch.Tensor:
        scorer.rows = rows
        gsm = GradSampleModule(scorer, loss_reduction="sum")
        try:
            loss = batch_loss(gsm, batch, scorer.n_items, cfg, key=key, step=0, summed=True)
            with quiet_opacus_hooks():
                loss.backward()
            return weight.grad_sample.detach().clone()  # (batch, n_items, k)
        finally:
            gsm._close()
            scorer.rows = None
            for p in scorer.parameters():
                p.grad_sample, p.grad = None, None

    n = int(rng.integers(3, 20))
    rows = top_rows(model.item_bias, n)
    assert int(rows.sum()) == n
    full, masked = grads(None), grads(rows)
    assert float(full[:, ~rows].abs().sum()) > 0  # unmasked, unselected rows do get gradient
    assert float(masked[:, ~rows].abs().sum()) == 0.0
    assert torch.equal(masked[:, rows], full[:, rows])


@pytest.mark.parametrize("table", ["item_factors", "item_offsets"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("dp", [True, False])
def test_a_round_changes_only_the_selected_rows_and_accounts_as_before(
    ds,  # noqa: F811
    tiny_backbone,
    dp,
    opt,
    table,
    monkeypatch,
):
    """A real round (DP-SGD with its noise, or plain SGD; SGD or Adam; steps split into
    physical batches of 2): the unselected rows of the per-item table are bit-identical after
    it, the selected ones moved; the adapter trained; the budget holds the same history and
    epsilon as the same round without selection."""
    monkeypatch.setattr(lt.secrets, "randbits", lambda k: 12345)
    monkeypatch.setattr(lt.secrets, "token_bytes", lambda n: bytes(range(n)))
    extra = {} if dp else {"dp": False, "epsilon": 8.0}
    attr = "item_fac" if table == "item_factors" else "item_off"
    out = {}
    for n in (0, 15):
        model = make_model(ds, tiny_backbone, id_residual=False, ffa=True, **{table: 3})
        _bias(model, 0)
        before = getattr(model, attr).detach().clone()
        b_before = model.lora_layer().lora_B["default"].weight.detach().clone()
        cfg = _cfg(
            backbone=str(tiny_backbone),
            factor_rows=n,
            local_opt=opt,
            lr=0.5 if opt == "sgd" else 0.01,
            physical_batch=2,
            **{table: 3},
            **extra,
        )
        store = MemoryStore()
        sizes: list[int] = []
        scorer = CandidateScorer(model)
        scorer.register_forward_pre_hook(lambda _m, a, s=sizes: s.append(int(a[0].shape[0])))
        res = train_round(scorer, _data(ds), cfg, store, seed=0)
        assert res.trained and len(sizes) > res.steps  # steps were split
        moved = (getattr(model, attr) - before).abs().sum(1) > 0
        b_moved = (model.lora_layer().lora_B["default"].weight - b_before).abs().max() > 0
        out[n] = (moved, res, store.budget.history if dp else None, b_moved)
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True, **{table: 3})
    _bias(model, 0)
    rows = top_rows(model.item_bias, 15)
    moved, res, history, b_moved = out[15]
    if dp:  # DP-SGD's noise moves every row it is added to
        assert bool(out[0][0].all())
    assert not bool(moved[~rows].any())
    assert bool(moved[rows].any()) and b_moved
    assert history == out[0][2] and res.epsilon == out[0][1].epsilon
    assert res.noise_multiplier == out[0][1].noise_multiplier


def test_a_round_from_an_untrained_bias_trains_no_row(ds, tiny_backbone):  # noqa: F811
    model = make_model(ds, tiny_backbone, id_residual=False, ffa=True, item_factors=3)
    before = model.item_fac.detach().clone()
    cfg = _cfg(backbone=str(tiny_backbone), item_factors=3, factor_rows=10)
    train_round(CandidateScorer(model), _data(ds), cfg, MemoryStore(), seed=0)
    assert torch.equal(model.item_fac, before)
    assert (model.item_bias != 0).any()  # the round trained, the bias included


def test_factor_rows_needs_a_table_and_the_bias():
    with pytest.raises(ValueError, match="factor-rows"):
        FedConfig(factor_rows=10)
    with pytest.raises(ValueError, match="factor-rows"):
        FedConfig(factor_rows=10, item_factors=4, item_bias=False)
    with pytest.raises(ValueError, match="factor-rows"):
        FedConfig(factor_rows=-1, item_factors=4)
    assert FedConfig(factor_rows=10, item_offsets=4).factor_rows == 10


@pytest.mark.parametrize("dp", [False, True])
def test_the_client_app_selects_the_rows_of_the_bias_it_receives(
    synth_dir, tiny_backbone, tmp_path, monkeypatch, dp
):
    """Through the ClientApp's train handler (a Flower Message in, a reply out): the rows that
    move are the top-n of the item bias in the *received* global state, and sending a different
    bias moves a different set. So the selection reads the released model, loaded before any
    data is touched, and not the client's own earlier state or its data."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.client import app as client_app
    from fedrec.shared.federation import contract
    from fedrec.shared.federation.data_and_model import dataset_and_split, model_for
    from fedrec.shared.federation.params import from_record, to_record, travelling_state

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # messages are built inside a task
    n = 6
    cfg = FedConfig(
        data=str(synth_dir), backbone=str(tiny_backbone), max_length=16, history_len=4,
        item_factors=4, factor_rows=n, local_steps=2, sample_rate=0.5, negatives=10, slots=6,
        lr=0.5, lr_factors=2.0, dp=dp, epsilon=50.0, num_rounds=1,
    )  # fmt: skip
    data, split = dataset_and_split(cfg.data, cfg.protocol, cfg.seed)
    base = travelling_state(model_for(cfg, data, split))
    (bias_key,) = [k for k in base if k.endswith("item_bias")]
    (fac_key,) = [k for k in base if k.endswith("item_fac")]
    moved_sets = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        sent = dict(base)
        sent[bias_key] = torch.randn(base[bias_key].shape, generator=g)
        config = ConfigRecord({**cfg.to_flat(), "server-round": 1 + seed})
        content = RecordDict({contract.ARRAYS: to_record(sent), contract.CONFIG: config})
        # a device each time: the budget one device spent in the first call would refuse the second
        node = {
            "data-dir": str(synth_dir),
            "state-dir": str(tmp_path / f"dev{seed}"),
            "allow-no-dp": "true",
        }
        ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        reply = client_app.train(Message(content, dst_node_id=1, message_type="train"), ctx)
        assert not reply.has_error()
        assert contract.ARRAYS in reply.content, reply.content[contract.CLIENT]["reason"]
        got = from_record(reply.content[contract.ARRAYS])
        top = set(torch.topk(sent[bias_key].flatten(), n).indices.tolist())
        moved = set(torch.nonzero((got[fac_key] != sent[fac_key]).any(dim=1)).flatten().tolist())
        assert moved and moved <= top, (moved, top)
        moved_sets.append(moved)
    assert moved_sets[0] != moved_sets[1]
