"""`fedrec suite`: suite files are validated, a tiny suite really runs, the report is built
from the results files (real subprocesses: `fedrec baselines`, `fedrec simulate`, a bench)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from fedrec.simulations.suite import load_suite, sim_settings


def _write(tmp_path, text: str):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[experiment]]\nname="a"\nkind="nope"\n', "kind 'nope'"),
        ('[[experiment]]\nname="a"\nkind="baselines"\n[[experiment]]\nname="a"\nkind="central"\n',
         "duplicate name"),
        ('[[experiment]]\nname="a b"\nkind="baselines"\n', "'name' must be"),
        ('[[experiment]]\nname="a"\nkind="bench"\n', "needs 'module'"),
        ('[[experiment]]\nname="a"\nkind="simulate"\nset={num-rounds=0}\n', "num-rounds"),
        ('[[experiment]]\nname="a"\nkind="simulate"\nset={nonsense=1}\n', "unknown key"),
        ('[[experiment]]\nname="a"\nkind="central"\ncolour="red"\n', "unknown key(s)"),
        ("[suite]\nname='x'\n", "no [[experiment]]"),
        ("[suite\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_bad_suite_files_are_rejected_with_the_reason(tmp_path, body, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_suite(str(_write(tmp_path, body)))


def test_shipped_suites_parse():
    for name in ("quick", "full"):
        suite = load_suite(name)
        assert suite.experiments and len({e.name for e in suite.experiments}) == len(
            suite.experiments
        )


def test_suite_wide_silos_is_not_passed_to_one_user_per_client_runs(tmp_path):
    from fedrec.simulations.suite import command

    suite = load_suite("full")
    by_name = {e.name: e for e in suite.experiments}
    user = " ".join(command(suite, by_name["A-user-eps8"], tmp_path))
    silo = " ".join(command(suite, by_name["A-fed-eps8"], tmp_path))
    assert "partition=user" in user and "silos=" not in user
    assert "partition=silo" in silo and "silos=10" in silo


def test_the_default_experiment_is_exactly_fedrec_simulates_defaults():
    """`A-default` is `fedrec simulate --preset cross-device --out RUN` with no settings:
    every suite-wide setting must be set back to the default."""
    from fedrec.shared.federation.config import parse_run_config

    suite = load_suite("full")
    e = {x.name: x for x in suite.experiments}["A-default"]
    assert parse_run_config(sim_settings(suite, e)) == parse_run_config({})


def test_suite_list_needs_no_out_folder_and_running_does():
    """`fedrec suite full --list` (as the README shows it) prints every experiment's command;
    running a suite without --out is a usage error that says what to add."""
    from typer.testing import CliRunner

    from fedrec.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["suite", "full", "--list"])
    assert listed.exit_code == 0, listed.output
    names = [e.name for e in load_suite("full").experiments]
    assert all(n in listed.output for n in names)
    assert "OUT/runs/A-fed-eps8" in listed.output
    ran = runner.invoke(app, ["suite", "full"])
    assert ran.exit_code == 2
    assert "--out DIR is required" in ran.output


def test_a_tiny_suite_runs_resumes_and_reports(tmp_path, synth_dir, tiny_backbone):
    suite = _write(
        tmp_path,
        f"""
[suite]
name = "tiny"
data = "{synth_dir}"
baselines = "popularity,itemknn"
[simulate]
backbone = "{tiny_backbone}"
max-length = 16
history-len = 8
num-rounds = 2
fraction-train = 0.5
local-steps = 2
sample-rate = 0.5
negatives = 10
slots = 6
lr = 0.5
evaluate-every = 1
[[experiment]]
name = "A-baselines"
kind = "baselines"
[[experiment]]
name = "A-fed-eps3"
kind = "simulate"
label = "fedrec federated eps 3"
set = {{ epsilon = 3.0 }}
[[experiment]]
name = "bench-agg"
kind = "bench"
module = "bench_aggregation"
args = ["--clients", "4,8", "--repeats", "1"]
[[experiment]]
name = "broken"
kind = "simulate"
set = {{ data = "{tmp_path / "missing"}" }}
""",
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fedrec", "suite", str(suite), "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 1, first.stderr  # the broken experiment fails; the rest ran
    assert "failed experiment(s): broken" in first.stderr + first.stdout
    summary = json.loads((out / "summary.json").read_text())
    status = {k: v["status"] for k, v in summary["experiments"].items()}
    assert status == {"A-baselines": "done", "A-fed-eps3": "done", "bench-agg": "done",
                      "broken": "failed"}  # fmt: skip
    report = (out / "report.md").read_text()
    fed = json.loads((out / "runs" / "A-fed-eps3" / "metrics.json").read_text())
    ndcg = fed["model"]["metrics"]["test"]["NDCG@10"]
    base = json.loads((out / "runs" / "A-baselines" / "metrics.json").read_text())
    pop = base["baselines"]["popularity"]["metrics"]["test"]["NDCG@10"]
    assert f"{ndcg:.4f}" in report and f"{pop:.4f}" in report  # numbers from the results files
    assert "Not run or failed: broken" in report and "updates/s" in report
    # one invocation: start-to-end span equals the done experiments' summed wall time
    done = sum(v["seconds"] for v in summary["experiments"].values() if v["status"] == "done")
    assert abs(summary["span_minutes"] - done / 60) < 0.2, (summary["span_minutes"], done)
    assert "min from start to end" in report
    for png in ("privacy_utility.png", "rounds.png"):
        assert (out / png).stat().st_size > 1000, png
    # a second invocation skips complete experiments and only retries the failed one
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.stderr.count("[skip]") == 3 and "[run ] broken" in again.stderr


def test_report_is_embedded_in_the_readme_between_markers(tmp_path):
    from fedrec.simulations.suite_report import embed_in_readme, markers

    out = tmp_path / "results"
    out.mkdir()
    (out / "report.md").write_text("# fedrec results\n\n| a | b |\n\n![rounds.png](rounds.png)\n")
    readme = tmp_path / "README.md"
    (b1, e1), (b2, e2) = markers("full"), markers("ablations")
    readme.write_text(f"intro\n{b1}\nold text\n{e1}\nmiddle\n{b2}\nother suite\n{e2}\noutro\n")
    embed_in_readme(out, readme, "full")
    text = readme.read_text()
    assert "old text" not in text and "## fedrec results" in text
    assert "![rounds.png](results/rounds.png)" in text
    assert text.startswith("intro\n") and text.endswith(
        f"{e1}\nmiddle\n{b2}\nother suite\n{e2}\noutro\n"
    )
    readme.write_text(f"no markers for this suite here\n{b2}\n{e2}\n")
    with pytest.raises(ValueError, match="needs exactly one"):
        embed_in_readme(out, readme, "full")
    assert readme.read_text() == f"no markers for this suite here\n{b2}\n{e2}\n"  # untouched
    # a marker quoted in prose (a code span) is not a block boundary; only whole lines are
    prose = f"write `{b1}` and `{e1}` on lines of their own\n"
    readme.write_text(f"{prose}{b1}\nold\n{e1}\n")
    embed_in_readme(out, readme, "full")
    assert readme.read_text().startswith(prose) and "old" not in readme.read_text()


def test_span_of_a_suite_run_in_pieces():
    """Experiments run on different days: the span says so instead of looking like one run."""
    from fedrec.simulations.suite_report import _span

    rows = [
        {"status": "done", "suite": {"finished": "2026-11-23 10:00:00 UTC", "seconds": 600}},
        {"status": "done", "suite": {"finished": "2026-11-24 10:00:00 UTC", "seconds": 60}},
        {"status": "failed", "suite": {"finished": "2026-11-25 10:00:00 UTC", "seconds": 60}},
        {"status": "not run", "suite": {}},
    ]
    assert _span(rows) == ("2026-11-23 09:50", "2026-11-24 10:00", 24 * 60 + 10)
    assert _span([{"status": "not run", "suite": {}}]) is None


def test_only_takes_commas_and_repeats_and_refuses_an_empty_or_unknown_list(tmp_path):
    """`--only a,b --only c` selects all three (a repeated option used to keep only its last
    value, silently); an empty list is an error, never "run everything"."""
    from typer.testing import CliRunner

    from fedrec.cli import _names, app

    assert _names(["A-baselines,B-baselines", " C-baselines ", ""]) == [
        "A-baselines", "B-baselines", "C-baselines"]  # fmt: skip
    runner = CliRunner()
    r = runner.invoke(app, ["suite", "full", "--out", str(tmp_path / "o"), "--only", ","])
    assert r.exit_code == 2 and "no experiment names" in r.output
    r = runner.invoke(app, ["suite", "full", "--out", str(tmp_path / "o"), "--only", "A-central",
                            "--only", "nope"])  # fmt: skip
    assert r.exit_code == 2 and "nope" in r.output
