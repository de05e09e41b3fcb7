"""fedrec's Flower ServerApp: federated LoRA training with a checkpoint per round and a run dir.

Runs under Flower's runtimes only, always submitted with ``flwr run``: by ``fedrec simulate``
(a private local SuperLink in simulation mode), by hand with ``flwr run .`` (settings from
``[tool.flwr.app.config]``), or to a SuperLink deployment.

Server-only run-config keys (not sent to clients): ``run-dir`` (where RUN/ goes), ``resume``
(continue from ``RUN/checkpoint`` after a crash), ``baselines`` (comma list, ``none`` or ``all``).
The server evaluates the global model on the protocol's held-out data (valid every
``evaluate-every`` rounds, all test sets at the end). That is a measurement harness for
simulations: a real deployment's server holds no user data, and would rely on the clients'
federated evaluation instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedrec.server.outputs import write_outputs
from fedrec.server.secure_agg import SecureUserDP
from fedrec.server.strategy import FedRecStrategy
from fedrec.server.user_dp import (
    UserLevelDP,
    reseed_numpy,
    sample_size,
    user_level_summary,
    user_noise_multiplier,
)
from fedrec.shared.backbone import check_prior_backbone
from fedrec.shared.evaluation import evaluate
from fedrec.shared.federation.config import FedConfig, parse_run_config
from fedrec.shared.federation.data_and_model import (
    catalog_digest,
    dataset_and_split,
    model_for,
    resolve_data_dir,
)
from fedrec.shared.federation.params import (
    from_record,
    load_travelling,
    nbytes,
    to_record,
    travelling_state,
)
from fedrec.shared.model.central import ModelScorer, ProfileBank
from fedrec.shared.privacy.distributed import SecurePlan, secure_summary
from fedrec.shared.privacy.distributed import plan as plan_secure
from fedrec.shared.privacy.secure_interaction import (
    InteractionPlan,
    interaction_summary,
    plan_interaction,
)
from fedrec.shared.rundir import dumps, write_json

SERVER_KEYS = ("run-dir", "resume", "baselines")
log = logging.getLogger("fedrec.server")


def split_run_config(raw: dict[str, Any]) -> tuple[FedConfig, dict[str, Any]]:
    raw = dict(raw)
    server = {k: raw.pop(k) for k in SERVER_KEYS if k in raw}
    return parse_run_config(raw), server


class ModelAverage:
    """The exponential moving average of the rounds' global models (``ema-decay``).

    ``sum = decay * sum + (1 - decay) * state`` after each round, read as ``sum / (1 -
    decay**rounds)`` (bias-corrected: the initial model, which no round trained, is left out).
    Every global model it averages is a function of the rounds' privatized aggregates and the
    public initial model, so the average is post-processing and costs no privacy."""

    def __init__(self, decay: float) -> None:
        self.decay, self.rounds = decay, 0
        self.sum: dict[str, torch.Tensor] = {}

    def update(self, state: Mapping[str, torch.Tensor]) -> None:
        d = self.decay
        self.sum = {
            k: (self.sum[k] * d if k in self.sum else torch.zeros_like(v, dtype=torch.float64))
            + (1 - d) * v.double()
            for k, v in state.items()
        }
        self.rounds += 1

    def value(self) -> dict[str, torch.Tensor]:
        if not self.rounds:
            raise ValueError("no round has been averaged yet")
        weight = 1 - self.decay**self.rounds
        return {k: (v / weight).float() for k, v in self.sum.items()}  # as travelling_state

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.sum, "_rounds": torch.tensor(self.rounds)} if self.rounds else {}

    def load(self, saved: Mapping[str, torch.Tensor]) -> None:
        if not saved:
            return
        self.rounds = int(saved["_rounds"])
        self.sum = {k: v for k, v in saved.items() if k != "_rounds"}


def save_checkpoint(
    run: Path,
    rnd: int,
    state: dict[str, torch.Tensor],
    opt_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """``RUN/checkpoint/``: the global tensors (the server optimizer's moments, ``opt.*``, and
    the model average, ``ema.*``) after round ``rnd``, replaced atomically."""
    ck = run / "checkpoint"
    ck.mkdir(parents=True, exist_ok=True)
    tmp = ck / f".global.{os.getpid()}.tmp"
    both = {
        **state,
        **{f"opt.{k}": v for k, v in opt_state.items()},
        **{f"ema.{k}": v for k, v in (ema_state or {}).items()},
    }
    # the round is in the tensor file itself: a crash before round.json below leaves a file
    # that still says which round its tensors (and the average) are from
    save_file({k: v.contiguous() for k, v in both.items()}, str(tmp), metadata={"round": str(rnd)})
    os.replace(tmp, ck / "global.safetensors")
    tmp_json = ck / f".round.{os.getpid()}.tmp"
    tmp_json.write_text(json.dumps({"round": rnd}))
    os.replace(tmp_json, ck / "round.json")  # written last: names a complete tensor file


def checkpoint_round(run: Path) -> int | None:
    """The round of the tensors in ``RUN/checkpoint/`` (None: no checkpoint), read from the
    tensor file's stamp without loading its tensors."""
    ck = run / "checkpoint"
    path = ck / "global.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        stamped = (f.metadata() or {}).get("round")
    if stamped is not None:  # the round its tensors are from (round.json may lag by one)
        return int(stamped)
    if (ck / "round.json").is_file():  # a checkpoint written before the stamp
        return int(json.loads((ck / "round.json").read_text())["round"])
    return None


def load_checkpoint(
    run: Path,
) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    rnd = checkpoint_round(run)
    if rnd is None:
        return None
    both = load_file(str(run / "checkpoint" / "global.safetensors"))
    opt = {k[4:]: v for k, v in both.items() if k.startswith("opt.")}
    return rnd, {k: v for k, v in both.items() if not k.startswith(("opt.", "ema."))}, opt


def resumed_average(run: Path, decay: float, offset: int) -> ModelAverage:
    """The model average in ``RUN/checkpoint/``, which must hold every round up to ``offset``,
    the round of the global tensors beside it (written in the same file). ValueError saying
    what to do otherwise: a checkpoint written without ``ema-decay``."""
    average = ModelAverage(decay)
    average.load(load_checkpoint_average(run))
    if average.rounds != offset:
        raise ValueError(
            f"{run / 'checkpoint'} holds the model average of {average.rounds} rounds but the "
            f"global model of round {offset}: it was not written with ema-decay={decay}; start "
            "a new run instead of --resume"
        )
    return average


def load_checkpoint_average(run: Path) -> dict[str, torch.Tensor]:
    """The model average's state in ``RUN/checkpoint/`` (empty if it holds none)."""
    path = run / "checkpoint" / "global.safetensors"
    if not path.is_file():
        return {}
    return {k[4:]: v for k, v in load_file(str(path)).items() if k.startswith("ema.")}


def check_run_dir(run: Path, cfg: FedConfig, resume: bool) -> None:
    """Refuse to mix runs: a new run in a folder that holds one, or a resume with other
    settings than the checkpointed run's."""
    previous = run / "config.json"
    if resume and checkpoint_round(run) is not None:
        old = json.loads(previous.read_text()).get("federation") if previous.is_file() else None
        try:  # keys added to fedrec since the run started take their defaults
            old = parse_run_config(old).as_dict() if isinstance(old, dict) else None
        except ValueError:
            old = None
        if old != cfg.as_dict():
            raise ValueError(
                f"cannot resume {run}: its config.json differs from this run's settings; "
                "resume with the same settings or use a new --out"
            )
    else:
        for name in ("ledger.jsonl", "secagg.jsonl"):
            if (run / "privacy" / name).exists():
                raise ValueError(
                    f"{run} already holds a run (privacy/{name} exists)"
                    + (
                        " with no checkpoint to resume from (it stopped before its first round "
                        "ended, or its checkpoint was removed): use a new run directory"
                        if resume
                        else ": use a new run directory, or --resume (resume=true) to continue it"
                    )
                )


class ProgressFile:
    """``RUN/progress.jsonl``: one JSON line per finished round (the strategy's round record)
    and per central validation, appended as they happen; ``fedrec simulate`` follows it for
    its progress display, and ``tail -f`` does for ``flwr run``."""

    def __init__(self, path: Path, then: Callable[[dict[str, Any]], None] | None) -> None:
        self.path, self.then = path, then

    def __call__(self, info: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(dumps(info) + "\n")
        if self.then is not None:
            self.then(info)


def run_federation(
    grid: Grid,
    cfg: FedConfig,
    run: Path,
    *,
    resume: bool = False,
    baselines: str = "popularity,itemknn",
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The whole server side of one run; returns metrics.json's content."""
    t0 = time.perf_counter()
    run.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(cfg.data)
    ds, split = dataset_and_split(data_dir, cfg.protocol, cfg.seed)
    model = model_for(cfg, ds, split)
    if cfg.cold_prior_backbone:  # the prior's encoder: fail before any round, not after the last
        check_prior_backbone(cfg.cold_prior_backbone)
    state = travelling_state(model)
    offset, opt_state = 0, dict[str, torch.Tensor]()
    average = ModelAverage(cfg.ema_decay) if cfg.ema_decay > 0 else None
    check_run_dir(run, cfg, resume)
    if resume and (ck := load_checkpoint(run)) is not None:
        offset, state, opt_state = ck
        if average is not None:
            average = resumed_average(run, cfg.ema_decay, offset)
        log.info("resuming after round %d from %s", offset, run / "checkpoint")
    # atomic: a run interrupted here leaves the old config.json or the new one, never half
    write_json(run / "config.json", {"command": "simulate", "federation": cfg.as_dict()})
    if not resume:  # a fresh start: lines from a run that stopped before its first round go
        (run / "progress.jsonl").unlink(missing_ok=True)
    on_round = ProgressFile(run / "progress.jsonl", on_round)
    load_travelling(model, state)
    bank = ProfileBank(model)
    trace: dict[int, dict[str, Any]] = {}

    def central_eval(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd += offset
        current = from_record(arrays)
        if rnd > offset:
            if average is not None and rnd > average.rounds:
                average.update(current)
            ema_state = average.state() if average is not None else None
            save_checkpoint(run, rnd, current, strategy.optimizer.state(), ema_state)
        due = cfg.evaluate_every and (rnd % cfg.evaluate_every == 0 or rnd == cfg.num_rounds)
        if split.valid is None or not due:
            return None
        entry: dict[str, Any] = {}
        if average is not None and average.rounds:
            load_travelling(model, average.value())
            m = evaluate(ModelScorer(model, bank), split.valid, ks=(10,), with_auc=False)
            entry = {"valid_NDCG@10_average": m["NDCG@10"]}
        load_travelling(model, current)
        m = evaluate(ModelScorer(model, bank), split.valid, ks=(10,), with_auc=False)
        trace[rnd] = {"valid_NDCG@10": m["NDCG@10"], "valid_HR@10": m["HR@10"], **entry}
        on_round({"round": rnd, "valid_NDCG@10": m["NDCG@10"]})
        return MetricRecord({"valid-NDCG@10": m["NDCG@10"], "valid-HR@10": m["HR@10"]})

    strategy = FedRecStrategy(
        cfg,
        template=state,
        ledger=run / "privacy" / "ledger.jsonl",
        round_offset=offset,
        on_round=on_round,
    )
    strategy.optimizer.load(opt_state)
    # a federated evaluation reply cannot count more test queries than the split has (clients
    # evaluate their own users' test items); unknown (None) when the server holds none
    test = split.tests.get("test")
    strategy.max_queries = len(test.users) if test is not None and len(test.users) else None
    strategy.n_items = split.n_items  # the shape segment-count tables must have
    runner: FedRecStrategy | UserLevelDP | SecureUserDP = strategy
    user_dp: dict[str, Any] | None = None
    secure: SecureUserDP | None = None
    interaction: InteractionPlan | None = None
    if cfg.dp and cfg.dp_noise == "secure":
        clients = len(list(grid.get_node_ids()))
        dim = sum(t.numel() for t in state.values())
        interaction = plan_interaction(cfg, clients, dim, clients)
        runner = secure = SecureUserDP(
            strategy, interaction, log_path=run / "privacy" / "secagg.jsonl", divisor=1
        )
        log.info(
            "per-interaction DP-SGD without a trusted server: every round all %d clients take "
            "one full-batch step, project to %.3g, round on a grid of %.4g and add Skellam shares "
            "of mu %.4g (%.4g counted per round: noise std %.4g on the summed change) inside "
            "SecAgg+ (%d neighbours, threshold %d, at least %d survivors), calibrated for %d "
            "releases at epsilon %.3g, delta %.3g",
            clients,
            cfg.update_norm_max,
            interaction.encoding.scale,
            interaction.mu_client,
            interaction.mu_total,
            math.sqrt(2 * interaction.mu_total) / interaction.encoding.scale,
            interaction.neighbours,
            interaction.threshold,
            interaction.min_survivors,
            cfg.num_rounds,
            cfg.epsilon,
            cfg.delta,
        )
    elif cfg.user_dp and cfg.secure_agg:
        clients = len(list(grid.get_node_ids()))
        sampled = sample_size(cfg, clients)
        secure_plan = plan_secure(cfg, sampled, sum(t.numel() for t in state.values()), clients)
        runner = secure = SecureUserDP(
            strategy, secure_plan, log_path=run / "privacy" / "secagg.jsonl"
        )
        user_dp = {"sampled": sampled, "clients": clients}
        log.info(
            "user-level DP with secure aggregation: %d of %d clients per round, %d neighbours, "
            "threshold %d, at least %d survivors, clip %.3g, Skellam mu %.4g per client "
            "(%.4g counted per round), calibrated for %d releases at epsilon %.3g, delta %.3g",
            sampled,
            clients,
            secure_plan.neighbours,
            secure_plan.threshold,
            secure_plan.min_survivors,
            cfg.user_clip,
            secure_plan.mu_client,
            secure_plan.mu_total,
            cfg.num_rounds,
            cfg.user_epsilon,
            cfg.user_delta,
        )
    elif cfg.user_dp:
        reseed_numpy()
        clients = len(list(grid.get_node_ids()))
        sampled = sample_size(cfg, clients)
        z = user_noise_multiplier(cfg)
        runner = UserLevelDP(strategy, num_sampled=sampled, noise_multiplier=z)
        user_dp = {"noise_multiplier": z, "sampled": sampled, "clients": clients}
        log.info(
            "user-level DP: %d of %d clients per round, clip %.3g, noise multiplier %.4f "
            "(calibrated for %d releases at epsilon %.3g, delta %.3g, no amplification)",
            sampled,
            clients,
            cfg.user_clip,
            z,
            cfg.num_rounds,
            cfg.user_epsilon,
            cfg.user_delta,
        )
    if cfg.dp and cfg.dp_noise == "server":
        from fedrec.server.interaction_dp import ServerNoise
        from fedrec.shared.privacy.calibration import calibrated_noise

        noise = ServerNoise(strategy, calibrated_noise(cfg, cfg.sample_rate))
        log.info(
            "per-interaction DP-SGD with the noise at the (trusted) server: noise multiplier "
            "%.4f at q %.3g, std %.4g added to the sum of every round's changes",
            noise.sigma,
            cfg.sample_rate,
            noise.std,
        )
    if cfg.dp and cfg.segment_prior:  # a release too costly for the budget: say so now
        from fedrec.shared.privacy.calibration import calibrated_noise

        try:
            calibrated_noise(cfg)
        except ValueError as err:
            raise ValueError(
                f"run config 'segment-noise' = {cfg.segment_noise} does not fit the budget "
                f"epsilon = {cfg.epsilon}: {err}"
            ) from None
    train_config = ConfigRecord(
        {**cfg.to_flat(), "catalog": catalog_digest(ds.item_texts()), "run-dir": str(run.resolve())}
    )
    remaining = cfg.num_rounds - offset
    if remaining > 0:
        result = runner.start(
            grid=grid,
            initial_arrays=to_record(state),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=train_config,
            evaluate_config=train_config,
            evaluate_fn=central_eval,
        )
        if result.arrays is not None and len(result.arrays):
            load_travelling(model, from_record(result.arrays))
    ema_info: dict[str, Any] | None = None
    if average is not None and average.rounds:
        # the last round's model and the average, each scored alone (the model without a cold
        # or segment prior): a paired comparison, the same run and noise
        ema_info = {"decay": cfg.ema_decay, "rounds_averaged": average.rounds}
        states = {"last_round": travelling_state(model), "average": average.value()}
        for name, st in states.items():
            load_travelling(model, st)
            alone = ModelScorer(model, bank)
            ema_info[name] = {k: evaluate(alone, es) for k, es in split.tests.items()}
            if split.valid is not None:
                ema_info[name]["valid"] = evaluate(alone, split.valid)
    user_level = None
    privacy = None
    if interaction is not None and secure is not None:
        privacy = interaction_summary(cfg, interaction, secure.records)
    elif secure is not None and user_dp is not None:
        assert isinstance(secure.plan, SecurePlan)
        user_level = secure_summary(cfg, secure.plan, secure.records, user_dp["clients"])
    elif user_dp is not None:
        releases = offset + sum(1 for r in strategy.rounds if r.get("aggregated"))
        user_level = user_level_summary(
            cfg,
            noise_multiplier=user_dp["noise_multiplier"],
            releases=releases,
            sampled=user_dp["sampled"],
            clients=user_dp["clients"],
        )
    return write_outputs(
        run,
        cfg,
        ds,
        split,
        model,
        bank,
        rounds=strategy.rounds,
        central=trace,
        federated=strategy.federated_eval,
        upload_bytes=nbytes(state),
        baselines=baselines,
        seconds=time.perf_counter() - t0,
        user_level=user_level,
        privacy=privacy,
        average=ema_info,
        segments=(
            strategy.segment_sum,
            strategy.segment_tables,
            strategy.segment_noise_tables,
            strategy.segment_combined,
            strategy.segment_trimmed,
        ),
    )


def make_server_app() -> ServerApp:
    """fedrec's ServerApp: its settings are the run config (``[tool.flwr.app.config]`` with
    ``flwr run``'s overrides; ``fedrec simulate`` passes the whole config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid

        if isinstance(grid, InMemoryGrid):  # a simulation: Flower's engine is in this process
            from fedrec.server import sim_runtime

            sim_runtime.install()
        run_cfg, server = split_run_config(dict(context.run_config))
        out = Path(str(server.get("run-dir", f"runs/flwr-{int(time.time())}")))
        run_federation(
            grid,
            run_cfg,
            out,
            resume=str(server.get("resume", "false")).lower() == "true",
            baselines=str(server.get("baselines", "popularity,itemknn")),
        )

    return app


app = make_server_app()
