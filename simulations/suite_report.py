"""The report of a suite's results folder: ``report.md``, ``summary.json`` and the plots.

Reads only what the experiments wrote (``runs/<name>/metrics.json``, ``config.json``,
``bench.json``, ``suite.json``); an experiment that has not run (or failed) is listed as such,
never filled in. Run it alone with ``fedrec suite NAME --out OUT --report-only``.
"""

from __future__ import annotations

import json
import math
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fedrec.shared.federation.config import FedConfig
from fedrec.shared.rundir import write_json
from fedrec.simulations.suite import Experiment, Suite, machine

BASELINE_ORDER = ("popularity", "itemknn", "als", "bpr", "zeroshot", "random")
TESTS = {"A": ["test"], "B": ["cold_items"], "C": ["k=0", "k=3"]}
COLS = {"A": ["HR@10", "NDCG@10", "Recall@20", "NDCG@20"], "B": ["Recall@10", "NDCG@10",
        "Recall@20"], "C": ["Recall@10", "NDCG@10"]}  # fmt: skip


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# what each kind's metrics.json must hold for the report to read it
_NEEDS = {"baselines": ("baselines",), "central": ("model", "baselines"),
          "simulate": ("model", "baselines", "privacy")}  # fmt: skip


def _results(path: Path, kind: str) -> dict[str, Any] | None:
    """A run's ``metrics.json`` if it is an object with what its kind writes, else None."""
    doc = _load(path)
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), dict) for k in
                                            _NEEDS.get(kind, ())):  # fmt: skip
        return None
    model = doc.get("model")
    if model is not None and not isinstance(model.get("metrics"), dict):
        return None
    return doc


def collect(suite: Suite, out: Path) -> list[dict[str, Any]]:
    """One entry per experiment: its status and whatever results files it has."""
    rows = []
    for e in suite.experiments:
        run = out / "runs" / e.name
        done = _load(run / "suite.json")
        failed = _load(run / "failed.json")
        metrics = _results(run / "metrics.json", e.kind) if done else None
        status = "done" if done else ("failed" if failed else "not run")
        if done and e.kind != "bench" and metrics is None:
            status = "unreadable metrics.json"  # reported as missing, never half-used
        rows.append(
            {
                "exp": e,
                "run": run,
                "status": status,
                "suite": done or failed or {},
                "metrics": metrics,
                "config": _load(run / "config.json") if done else None,
                "bench": _load(run / "bench.json") if done else None,
            }
        )
    return rows


def _privacy(r: dict[str, Any]) -> tuple[str, float]:
    """A label for the privacy column and the epsilon to plot (inf = no DP)."""
    m, e = r["metrics"], r["exp"]
    if e.kind == "central":
        return "none (central)", math.inf
    p = m.get("privacy", {})
    parts, eps = [], math.inf
    if p.get("dp"):
        eps = float(p["epsilon_max"])
        parts.append(f"{eps:.2f} / interaction (delta {p['delta']:g})")
    u = p.get("user_level") or {}
    if u.get("enabled"):
        parts.append(f"{u['epsilon']:.2f} / user (delta {u['delta']:g})")
        eps = min(eps, float(u["epsilon"])) if p.get("dp") else float(u["epsilon"])
    return ("; ".join(parts) or "none"), eps


def _fed_desc(cfg: dict[str, Any]) -> str:
    f = cfg.get("federation", {})
    part = "1 user/client" if f.get("partition") == "user" else f"{f.get('silos')} silos"
    desc = f"{f.get('aggregator')}, {part}, {f.get('num_rounds')} rounds"
    with warnings.catch_warnings():  # the run's own config: its warnings were given then
        warnings.simplefilter("ignore")
        fc = FedConfig(**f)
    if fc.examples == "sequence":
        desc += f", sliding windows of {fc.history_len}"
        if fc.dp_group() > 1:
            desc += f", epsilon for groups of {fc.dp_group()}"
    if fc.id_residual:
        desc += f", per-item ID table (lr {fc.id_lr():g})"
    return desc


def _table(protocol: str, rows: list[dict[str, Any]], base: dict[str, Any] | None) -> list[str]:
    out: list[str] = []
    for test in TESTS[protocol]:
        cols = COLS[protocol]
        head = f"| protocol {protocol}, {test} | " + " | ".join(cols) + " | privacy (epsilon) |"
        lines = [head, "|---" * (len(cols) + 2) + "|"]
        for r in rows:
            if r["status"] != "done" or r["metrics"] is None or r["exp"].protocol != protocol:
                continue
            if r["exp"].kind not in ("central", "simulate"):
                continue
            mm = r["metrics"]["model"]["metrics"].get(test)
            if mm is None:
                continue
            label = f"**{r['exp'].label}**"
            priv, _ = _privacy(r)
            if r["exp"].kind == "simulate":
                label += f" ({_fed_desc(r['config'] or {})})"
            lines.append(
                f"| {label} | " + " | ".join(f"{mm[c]:.4f}" for c in cols) + f" | {priv} |"
            )
        if base:
            for name in BASELINE_ORDER:
                b = base["baselines"].get(name)
                if b is None or test not in b["metrics"]:
                    continue
                mm = b["metrics"][test]
                lines.append(
                    f"| {name} | " + " | ".join(f"{mm[c]:.4f}" for c in cols) + " | none |"
                )
        out += [*lines, ""]
    return out


def _baselines_for(rows: list[dict[str, Any]], protocol: str) -> dict[str, Any] | None:
    for r in rows:
        if r["exp"].kind == "baselines" and r["exp"].protocol == protocol and r["metrics"]:
            return r["metrics"]
    return None


def _style(i: int) -> dict[str, str]:
    """Line style of the i-th series: ten colours with round markers, then the same colours
    dashed with square markers, then dotted with triangles, so that no two of up to 30 series
    in one legend look alike."""
    block = (i // 10) % 3
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":")[block], "marker": "os^"[block]}


def _plots(out: Path, rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    sims = [r for r in rows if r["exp"].kind == "simulate" and r["metrics"]]
    base_a = _baselines_for(rows, "A")
    central_a = [r for r in rows if r["exp"].kind == "central" and r["exp"].protocol == "A"
                 and r["metrics"]]  # fmt: skip

    # privacy-utility: NDCG@10 against epsilon for protocol A federated runs
    pu = [r for r in sims if r["exp"].protocol == "A"]
    if pu:
        fig, ax = plt.subplots(figsize=(7.5, 6))
        groups: dict[str, list[tuple[float, float]]] = {}
        finite = [e for r in pu if math.isfinite(e := _privacy(r)[1])]
        inf_x = (max(finite) * 2.5) if finite else 16.0
        for r in pu:
            _, eps = _privacy(r)
            f = (r["config"] or {}).get("federation", {})
            # a series is one federation set-up (aggregator, clients, rounds, sample rate):
            # only its epsilon varies along the line
            key = f"{_fed_desc(r['config'] or {})}, q {f.get('sample_rate')}"
            if (r["metrics"]["privacy"].get("user_level") or {}).get("enabled"):
                key += ", user-level DP"
            ndcg = r["metrics"]["model"]["metrics"]["test"]["NDCG@10"]
            groups.setdefault(key, []).append((eps if math.isfinite(eps) else inf_x, ndcg))
        markers = "os^Dvp<>h*"
        for i, (key, pts) in enumerate(sorted(groups.items())):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker=markers[i % 10],
                    color=f"C{i % 10}", label=key)  # fmt: skip
        # reference lines in grey, each labelled on the plot itself (no legend lookup needed)
        refs: list[tuple[str, float, str]] = []
        for name in ("popularity", "itemknn", "bpr", "als", "zeroshot"):
            b = (base_a or {}).get("baselines", {}).get(name)
            if b:
                refs.append((name, b["metrics"]["test"]["NDCG@10"], "--"))
        for r in central_a:
            refs.append((r["exp"].name, r["metrics"]["model"]["metrics"]["test"]["NDCG@10"], ":"))
        x_left = min(finite, default=1.0) * 0.8  # inf_x is above every finite epsilon
        ys = [y for _, y, _ in refs] + [p[1] for pts in groups.values() for p in pts]
        span = (max(ys) - min(ys)) or 1.0
        refs.sort(key=lambda t: t[1])
        for i, (name, y, ls) in enumerate(refs):
            ax.axhline(y, ls=ls, lw=1, color="0.45")
            # a label sits above its line, unless the next line up is too close: then below
            below = i + 1 < len(refs) and refs[i + 1][1] - y < 0.04 * span
            ax.text(x_left, y, f"{name} {y:.3f} (central, no DP)", fontsize=7, color="0.3",
                    va="top" if below else "bottom", ha="left")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlim(x_left * 0.95, inf_x * 1.3)
        # one tick per distinct budget: 7.99 and 8.00 are the same budget of 8
        ticks = sorted({float(f"{e:.1g}") if e < 1.5 else float(round(e)) for e in finite})
        ticks.append(inf_x)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["no DP"])
        ax.minorticks_off()
        ax.set(xlabel="epsilon (max over clients; log scale)", ylabel="test NDCG@10",
               title="Privacy-utility, ML-100K protocol A (test)")  # fmt: skip
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2,
                  title="fedrec federated (q = sample rate)", title_fontsize=7)  # fmt: skip
        fig.tight_layout()
        fig.savefig(out / "privacy_utility.png", dpi=110)
        plt.close(fig)
        made.append("privacy_utility.png")

    if sims:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for i, r in enumerate(sims):
            m = r["metrics"]["model"]
            ce = m.get("central_evaluation") or {}
            if ce and r["exp"].protocol == "A":
                ks = sorted(ce, key=int)
                axes[0].plot([int(k) for k in ks], [ce[k]["valid_NDCG@10"] for k in ks],
                             **_style(i), label=r["exp"].name)  # fmt: skip
            rs = m.get("rounds") or []
            if rs and r["metrics"]["privacy"].get("dp"):
                axes[1].plot([x["round"] for x in rs], [x["epsilon_max"] for x in rs],
                             markersize=4, **_style(i), label=r["exp"].name)  # fmt: skip
        # baselines: black, each its own dash pattern and a legend entry (the runs are coloured)
        patterns = ((0, (6, 2)), (0, (1, 1.5)), (0, (4, 1.5, 1, 1.5)), (0, (10, 3)))
        for j, name in enumerate(("popularity", "itemknn", "bpr", "als")):
            b = (base_a or {}).get("baselines", {}).get(name)
            if b and "valid" in b:
                axes[0].axhline(b["valid"]["NDCG@10"], ls=patterns[j], lw=1.3, color="black",
                                label=f"{name} (baseline, valid)")  # fmt: skip
        axes[0].set(title="validation NDCG@10 per round (protocol A)", xlabel="round")
        from matplotlib.ticker import MaxNLocator

        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are counts
        axes[1].set(title="epsilon per round (max over the round's clients)", xlabel="round",
                    ylabel="epsilon (per interaction)")  # fmt: skip
        for ax in axes:
            ax.legend(fontsize=7, handlelength=3)
        fig.tight_layout()
        fig.savefig(out / "rounds.png", dpi=110)
        plt.close(fig)
        made.append("rounds.png")

    # cold start: B Recall@10, C NDCG@10 at k=0 and k=3
    bars: dict[str, dict[str, float]] = {}
    for proto, test, metric in (("B", "cold_items", "Recall@10"), ("C", "k=0", "NDCG@10"),
                                ("C", "k=3", "NDCG@10")):  # fmt: skip
        key = f"{proto} {test}\n{metric}"
        for r in rows:
            if r["metrics"] and r["exp"].protocol == proto and r["exp"].kind != "bench":
                if r["exp"].kind == "baselines":
                    for name in ("popularity", "zeroshot", "itemknn", "random"):
                        b = r["metrics"]["baselines"].get(name)
                        if b and test in b["metrics"]:
                            bars.setdefault(name, {})[key] = b["metrics"][test][metric]
                else:
                    mm = r["metrics"]["model"]["metrics"].get(test)
                    if mm:
                        bars.setdefault(r["exp"].label, {})[key] = mm[metric]
    if bars:
        keys = sorted({k for v in bars.values() for k in v})
        fig, ax = plt.subplots(figsize=(9, 4.2))
        width = 0.8 / len(bars)
        for i, (name, vals) in enumerate(bars.items()):
            xs = [j + i * width for j in range(len(keys))]
            ax.bar(xs, [vals.get(k, 0.0) for k in keys], width, label=name, color=f"C{i % 10}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=8)
        ax.set(title="Cold start: new items (B) and new users (C)", ylabel="metric")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "cold_start.png", dpi=110)
        plt.close(fig)
        made.append("cold_start.png")

    scaling = [r for r in rows if r["bench"] and r["bench"].get("kind") == "simulation-scaling"]
    for r in scaling:
        pts = r["bench"]["points"]
        fig, ax = plt.subplots(figsize=(6, 4))
        st = r["bench"].get("settings", {})
        ax.plot([p["clients"] for p in pts], [p["seconds_median"] / 60 for p in pts], "o-")
        for p in pts:
            xy = (p["clients"], p["seconds_median"] / 60)
            ax.annotate(f"{p['clients_per_round']} per round", xy, textcoords="offset points",
                        xytext=(4, 6), fontsize=7)  # fmt: skip
        ax.set_ylim(0, max(p["seconds_median"] for p in pts) / 60 * 1.2)
        ax.margins(x=0.15)
        ax.set(xlabel="clients in the federation (ML-100K's 943 users split into N clients)",
               ylabel="wall time (min)",
               title="Simulation wall time vs number of clients\n"
                     f"{st.get('num-rounds', '?')} rounds, {st.get('fraction-train', '?')} of the "
                     "clients per round: the same share of the data at every N")  # fmt: skip
        ax.title.set_fontsize(9)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=110)
        plt.close(fig)
        made.append("scaling.png")
    return made


def _bench_lines(rows: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for r in rows:
        b = r["bench"]
        if not b:
            continue
        out.append(f"**{r['exp'].label}** (`{r['exp'].name}`, module `{r['exp'].module}`):")
        out.append("")
        for line in bench_summary(b):
            out.append(f"- {line}")
        out.append("")
    return out


def bench_summary(b: dict[str, Any]) -> list[str]:
    """Human-readable lines for the benchmarks' results files (medians, with their reference)."""
    if b.get("kind") in ("aggregation", "simulation-scaling", "dp-step", "segment-release"):
        return list(b.get("summary", []))
    if "round_seconds_dp" in b:  # bench_client
        return [
            f"client DP round median {b['round_seconds_dp']['median']:.2f} s (p90 "
            f"{b['round_seconds_dp']['p90']:.2f} s) vs {b['round_seconds_no_dp']['median']:.2f} s "
            f"without DP (ratio {b['dp_over_no_dp_median']:.2f}), {b['clients']} clients, "
            f"{b['torch_threads']} torch thread",
            f"upload per client per round {b['upload_bytes_per_round']:,} bytes",
            f"client set-up once per process {b['client_setup_seconds']:.1f} s; "
            f"peak RSS {b['peak_rss_mb']:.0f} MB",
        ]
    if "round_seconds_all" in b:  # bench_device
        return [
            f"device round median {b['round_seconds']['median']:.2f} s over {b['rounds']} rounds "
            f"({b['torch_threads']} torch threads); set-up {b['client_setup_seconds']:.1f} s",
            f"messages per round: up {b['upload_bytes_per_round']:,} bytes, down "
            f"{b['download_bytes_per_round']:,} bytes, vs {b['travelling_tensor_bytes']:,} bytes "
            f"of tensors (ratios {b['upload_over_tensors']:.3f}, {b['download_over_tensors']:.3f})",
            f"peak RSS {b['peak_rss_mb']:.0f} MB; install size "
            f"{b['install_bytes']['total'] / 2**20:.0f} MB",
        ]
    if "recommend" in b:  # bench_inference
        return [
            f"recommend (warm index, {b['catalog_items']} items): p50 {b['recommend']['p50_ms']} "
            f"ms, p99 {b['recommend']['p99_ms']} ms; with explanations p50 "
            f"{b['recommend_explain']['p50_ms']} ms",
            f"cold start from a free-text query p50 {b['cold_start_query']['p50_ms']} ms; "
            f"add_items (one item) p50 {b['add_items_one']['p50_ms']} ms",
            f"index build {b['index_build_s']} s; load with a warm index "
            f"{b['load_with_warm_index_s']} s",
        ]
    return [json.dumps(b)[:300]]


def _span(rows: list[dict[str, Any]]) -> tuple[str, str, float] | None:
    """When the suite's experiments ran: the first one's start and the last one's end (each
    ``suite.json`` records when it finished and how long it took), and the minutes between."""
    fmt = "%Y-%m-%d %H:%M:%S %Z"
    starts, ends = [], []
    for r in rows:
        rec = r["suite"]
        if r["status"] != "done" or "finished" not in rec or rec.get("seconds") is None:
            continue
        try:
            end = datetime.strptime(rec["finished"], fmt)
        except ValueError:
            continue
        ends.append(end)
        starts.append(end - timedelta(seconds=float(rec["seconds"])))
    if not ends:
        return None
    first, last = min(starts), max(ends)
    return (first.strftime("%Y-%m-%d %H:%M"), last.strftime("%Y-%m-%d %H:%M"),
            (last - first).total_seconds() / 60)  # fmt: skip


def write_report(suite: Suite, out: Path) -> dict[str, Any]:
    rows = collect(suite, out)
    mach = machine()
    v = mach["versions"]
    lines = [
        f"# fedrec results: suite `{suite.name}`",
        "",
        suite.description,
        "",
        f"Command: `fedrec suite {suite.name} --out {out}`. Machine: {mach['cpus']} CPU cores, "
        f"{mach['memory_gib']} GiB RAM, no GPU, {mach['platform']}. Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + ". Data: "
        + suite.data
        + " (one split per protocol, seed 0, shared by every row).",
        "",
        "## Experiments",
        "",
        "| experiment | kind | protocol | status | wall time (min) |",
        "|---|---|---|---|---|",
    ]
    total = 0.0
    for r in rows:
        e: Experiment = r["exp"]
        secs = r["suite"].get("seconds")
        total += float(secs or 0)
        t = f"{secs / 60:.1f}" if secs is not None else "-"
        lines.append(f"| `{e.name}` | {e.kind} | {e.protocol} | {r['status']} | {t} |")
    lines += ["", f"Sum of the experiments' wall times: {total / 60:.1f} min.", ""]
    span = _span(rows)
    if span is not None:
        start, end, minutes = span
        lines += [
            f"First experiment started {start}, last finished {end}: {minutes:.1f} min from "
            "start to end. Equal to the sum (up to the seconds between experiments) when the "
            "suite ran in one invocation; much longer when it ran in pieces (`--only`, resumed).",
            "",
        ]
    for proto in ("A", "B", "C"):
        base = _baselines_for(rows, proto)
        table = _table(proto, rows, base)
        if any(ln.startswith("| **") or ln.startswith("| pop") for ln in table):
            lines += [f"## Protocol {proto}", "", *table]
    made = _plots(out, rows)
    if made:
        lines += ["## Plots", ""] + [f"![{m}]({m})" for m in made] + [""]
    bench = _bench_lines(rows)
    if bench:
        lines += ["## Benchmarks", "", *bench]
    missing = [r["exp"].name for r in rows if r["status"] != "done"]
    if missing:
        lines += ["## Not in this report", "", "Not run or failed: " + ", ".join(missing), ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    summary = {
        "suite": suite.name,
        "machine": mach,
        "experiments": {r["exp"].name: {"status": r["status"], **r["suite"]} for r in rows},
        "plots": made,
        "total_seconds": round(total, 1),
        "span_minutes": None if span is None else round(span[2], 1),
    }
    write_json(out / "summary.json", summary)
    return summary


def markers(suite: str) -> tuple[str, str]:
    """The markers around suite ``suite``'s full results block (in ``docs/results.md``)."""
    return f"<!-- suite-results:{suite}:begin -->", f"<!-- suite-results:{suite}:end -->"


def headline_markers(suite: str) -> tuple[str, str]:
    """The markers around suite ``suite``'s compact headline table (in ``README.md``)."""
    return f"<!-- suite-headline:{suite}:begin -->", f"<!-- suite-headline:{suite}:end -->"


# The README's one table: which experiments of a suite make up each row, per protocol. A row
# names experiments, never numbers; an experiment that has not run shows as "not run".
HEADLINE: dict[str, list[tuple[str, dict[str, str]]]] = {
    "full": [
        ("fedrec trained centrally (no federation, no DP)",
         {"A": "A-central", "B": "B-central", "C": "C-central"}),
        ("fedrec trained centrally, with the cold prior (text-predicted popularity)",
         {"B": "B-central-prior"}),
        ("fedrec trained centrally, with the segment prior (exact age-band counts)",
         {"C": "C-central-segment"}),
        ("fedrec federated, 10 silos, local DP, sliding windows of two items, larger batches "
         "(the `silos` preset)", {"A": "A-fed-eps8-batch"}),
        ("fedrec federated, 10 silos, DP noise added once a round by a trusted server, sliding "
         "windows of two items (the `silos-trusted-server` preset)", {"A": "A-fed-eps8-server"}),
        ("fedrec federated, 10 silos, local DP, sliding windows of two items",
         {"A": "A-fed-eps8-windows"}),
        ("fedrec federated, 10 silos, local DP, disjoint examples", {"A": "A-fed-eps8",
                                                                    "B": "B-fed-eps8",
                                                                    "C": "C-fed-eps8"}),
        ("fedrec federated, 10 silos, local DP, disjoint examples, with the cold prior",
         {"B": "B-fed-eps8-prior"}),
        ("fedrec federated, 10 silos, local DP, disjoint examples, with the cold prior read by "
         "mpnet (on the server only)", {"B": "B-fed-eps8-prior-mpnet"}),
        ("fedrec federated, 10 silos, local DP, disjoint examples, with the segment prior",
         {"C": "C-fed-eps8-segment"}),
        ("fedrec federated, 10 silos, local DP, disjoint examples", {"A": "A-fed-eps3"}),
        ("fedrec federated, 10 silos, local DP, disjoint examples", {"A": "A-fed-eps1"}),
        ("fedrec federated, 10 silos, no DP, disjoint examples", {"A": "A-fed-nodp"}),
        ("fedrec federated, one user per device, local DP (`cross-device` preset)",
         {"A": "A-default"}),
        ("fedrec federated, one user per device, user-level DP, no trusted server (the "
         "default: `secure` preset, the main job)", {"A": "A-secure"}),
    ],
}  # fmt: skip
HEADLINE_BASELINES = (
    "popularity",
    "profile-popularity",
    "text-popularity",
    "itemknn",
    "als",
    "bpr",
)
# (protocol, test, metric) per column
HEADLINE_COLS = (("A", "test", "NDCG@10"), ("A", "test", "HR@10"),
                 ("B", "cold_items", "Recall@10"), ("C", "k=0", "NDCG@10"),
                 ("C", "k=3", "NDCG@10"))  # fmt: skip


def headline(suite: Suite, out: Path, shown: str) -> list[str]:
    """The compact table of suite ``suite``'s results folder ``out`` (shown in its source line
    as ``shown``): fedrec's headline rows of ``HEADLINE`` beside the baselines, protocol A test
    NDCG@10 / HR@10, B's cold-item Recall@10, C's NDCG@10 at k = 0 and 3. Every number is read
    from ``out/runs/<experiment>/metrics.json``; the privacy column is the A run's."""
    rows = {r["exp"].name: r for r in collect(suite, out)}
    head = "| ML-100K, test | privacy (epsilon, delta) | " + " | ".join(
        f"{p} {m}" + (f" {t}" if p == "C" else "") for p, t, m in HEADLINE_COLS
    )
    lines = [head + " |", "|---" * (len(HEADLINE_COLS) + 2) + "|"]

    def cell(r: dict[str, Any] | None, test: str, metric: str) -> str:
        if r is None:
            return "-"
        if r["status"] != "done" or r["metrics"] is None:
            return "not run"
        got = r["metrics"]["model"]["metrics"].get(test, {}).get(metric)
        return "-" if got is None else f"{got:.4f}"

    for label, exps in HEADLINE.get(suite.name, []):
        first = rows.get(next(iter(exps.values())))
        priv = "-"
        if first is not None and first["status"] == "done" and first["metrics"] is not None:
            priv = _privacy(first)[0]
        names = ", ".join(f"`{n}`" for n in exps.values())
        cells = [cell(rows.get(exps.get(p, "")), t, m) for p, t, m in HEADLINE_COLS]
        lines.append(f"| **{label}** ({names}) | {priv} | " + " | ".join(cells) + " |")
    bases = {p: _baselines_for(list(rows.values()), p) for p in ("A", "B", "C")}
    for name in HEADLINE_BASELINES:
        cells = []
        for p, t, m in HEADLINE_COLS:
            b = (bases[p] or {}).get("baselines", {}).get(name)
            got = None if b is None else b["metrics"].get(t, {}).get(m)
            cells.append("-" if got is None else f"{got:.4f}")
        lines.append(f"| {name} | none | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Generated from `{shown}/runs/*/metrics.json` (suite `{suite.name}`, one run per row, "
        "one split per protocol, seed 0) by `fedrec suite "
        f"{suite.name} --out {shown} --report-only --readme README.md`.",
    ]
    return lines


def _marker_at(text: str, marker: str) -> list[int]:
    """Offsets where ``marker`` stands on a line of its own (a marker quoted in prose or in a
    code span is not a block boundary)."""
    import re

    return [m.start() for m in re.finditer(rf"^{re.escape(marker)}[ \t]*$", text, re.MULTILINE)]


def _replace_block(text: str, begin: str, end: str, body: list[str]) -> str:
    b, e = _marker_at(text, begin)[0], _marker_at(text, end)[0]
    return text[: b + len(begin)] + "\n" + "\n".join(body).strip() + "\n" + text[e:]


def _has_block(text: str, begin: str, end: str) -> bool:
    b, e = _marker_at(text, begin), _marker_at(text, end)
    return len(b) == 1 and len(e) == 1 and b[0] < e[0]


def embed_in_readme(out: Path, readme: Path, suite: str) -> None:
    """Refresh suite ``suite``'s generated blocks in the markdown file ``readme``: the full
    report block (between ``markers(suite)``: ``out/report.md`` with headings demoted one level
    and image links made relative to the file) and the compact headline table (between
    ``headline_markers(suite)``). Either or both may be there (``docs/results.md`` holds the
    full blocks, ``README.md`` the headline); a file with neither is an error. All or nothing:
    the file is rewritten atomically, and left alone on an error."""
    import os

    begin, end = markers(suite)
    hbegin, hend = headline_markers(suite)
    text = readme.read_text()
    full, head = _has_block(text, begin, end), _has_block(text, hbegin, hend)
    if not full and not head:
        raise ValueError(
            f"{readme}: needs exactly one '{begin}' ... '{end}' block (where suite {suite!r}'s "
            f"report goes) or one '{hbegin}' ... '{hend}' block (its headline table); add the "
            "two lines where it should be"
        )
    rel = os.path.relpath(out, readme.parent)
    if full:
        body = []
        for line in (out / "report.md").read_text().splitlines():
            if line.startswith("#"):
                line = "#" + line
            if line.startswith("![") and "](" in line:
                name = line[line.index("](") + 2 : -1]
                line = line[: line.index("](") + 2] + f"{rel}/{name})"
            body.append(line)
        text = _replace_block(text, begin, end, body)
    if head:
        from fedrec.simulations.suite import load_suite

        text = _replace_block(text, hbegin, hend, headline(load_suite(suite), out, rel))
    tmp = readme.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(readme)
