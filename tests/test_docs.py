"""The documentation tells the truth about the repository: every path, results file, `fedrec`
command and `python -m` module that README.md and docs/*.md cite exists, the README's results
table is what the generator makes of the committed results, and the README stays short.

Run: ``.venv/bin/pytest tests/test_docs.py -q`` (a second or two; no model, no data).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Top-level entries a cited path may start with; any other first component is not a repository
# path (RUN/, runs/, deploy/, ~/.cache/...), unless it is one letter or two away from one of
# these: then it is a typo.
TOP_DIRS = ("app", "shared", "server", "client", "simulations", "tests", "docs", ".ci")
TOP_FILES = ("README.md", "run.sh", "pyproject.toml")
STRIP = "`'\",;:()[]<>*"

CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
FEDREC_CMD = re.compile(
    r"^(?:\$ )?(?:\.venv/bin/|bash run\.sh )?fedrec ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?"
)
PY_MODULE = re.compile(r"python -m (fedrec(?:\.[A-Za-z_]\w*)*)")


def code_texts(md: str) -> list[str]:
    """Inline code spans and the lines of fenced code blocks (where paths and commands are)."""
    blocks = FENCE.findall(md)
    rest = FENCE.sub("", md)
    out = [s for b in blocks for s in b.splitlines()]
    return out + CODE_SPAN.findall(rest)


def cited_paths(md: str) -> tuple[set[str], set[str]]:
    """(repository paths cited in code, words that look like a misspelt repository path)."""
    paths, typos = set(), set()
    for text in code_texts(md):
        for word in text.split():
            word = word.strip(STRIP)
            if word in TOP_FILES:
                paths.add(word)
                continue
            if "/" not in word or "=" in word or "*" in word:
                continue
            first = word.split("/", 1)[0]
            if first in TOP_DIRS:
                paths.add(word.rstrip("/"))
            elif first and difflib.get_close_matches(first, TOP_DIRS, n=1, cutoff=0.8):
                typos.add(word)
    return paths, typos


def cited_links(md: str) -> set[str]:
    """Markdown link and image targets that are files, not web addresses or anchors."""
    return {
        t.split("#", 1)[0]
        for t in LINK.findall(md)
        if not re.match(r"[a-z]+:", t) and not t.startswith("#")
    }


def cited_commands(md: str) -> set[tuple[str, str | None]]:
    """`fedrec COMMAND [SUBCOMMAND]` as typed in code (a span or a fenced line starting with it)."""
    out = set()
    for text in code_texts(md):
        m = FEDREC_CMD.match(text.strip())
        if m:
            out.add((m.group(1), m.group(2)))
    return out


def cited_modules(md: str) -> set[str]:
    return {m for text in code_texts(md) for m in PY_MODULE.findall(text)}


def module_file(module: str) -> Path | None:
    """The source file of a `fedrec...` module under pyproject's package-dir mapping."""
    parts = module.split(".")[1:]
    roots = {"shared": "shared", "server": "server", "client": "client",
             "simulations": "simulations"}  # fmt: skip
    base = REPO / roots[parts[0]] if parts and parts[0] in roots else REPO / "app"
    rel = parts[1:] if parts and parts[0] in roots else parts
    for cand in (base.joinpath(*rel).with_suffix(".py"), base.joinpath(*rel, "__init__.py")):
        if rel and cand.is_file():
            return cand
    if not rel and (base / "__main__.py").is_file():
        return base / "__main__.py"
    return None


def cli_commands() -> dict[str, set[str]]:
    """fedrec's commands and, for command groups, their subcommands (from the typer app)."""
    import typer

    from fedrec.cli import app

    group = typer.main.get_command(app)
    return {name: set(getattr(cmd, "commands", {}) or {}) for name, cmd in group.commands.items()}


# --- the extractor itself: it must find what a page cites, and a typo must fail ---------------


def test_extractor_finds_paths_links_commands_and_typos():
    md = (
        "See `simulations/results/suite-full/summary.json` and `RUN/privacy/ledger.jsonl`.\n"
        "Run `python -m fedrec.simulations.reaudit simulations/results --out x`.\n"
        "A typo: `simulatons/results/suite-full/`. Link: [r](docs/results.md#top), "
        "[web](https://flower.ai).\n"
        "```bash\nfedrec data fetch ml-100k   # `fedrec` in a fence\nfedrec simulate --quick\n```\n"
        "Prose mentioning fedrec simulate is not a command; `fedrec deploy init DIR` is.\n"
    )
    paths, typos = cited_paths(md)
    assert paths == {"simulations/results/suite-full/summary.json", "simulations/results"}
    assert typos == {"simulatons/results/suite-full/"}
    assert cited_links(md) == {"docs/results.md"}
    assert cited_commands(md) == {("data", "fetch"), ("simulate", None), ("deploy", "init")}
    assert cited_modules(md) == {"fedrec.simulations.reaudit"}
    assert module_file("fedrec.simulations.reaudit") == REPO / "simulations" / "reaudit.py"
    assert module_file("fedrec.simulations.no_such_bench") is None


def test_a_wrong_path_or_command_is_caught():
    wrong = "simulations/results/suite-ful/summary.json"
    paths, _ = cited_paths(f"`{wrong}`")
    assert [p for p in paths if not (REPO / p).exists()] == [wrong]
    commands = cli_commands()
    assert "simulate" in commands and "fetch" in commands["data"]
    assert "simulat" not in commands and "fetchh" not in commands["data"]


# --- the pages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_cited_path_exists(page: Path):
    md = page.read_text()
    paths, typos = cited_paths(md)
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"{page.name} cites paths that do not exist: {missing}"
    assert not typos, f"{page.name} cites what looks like a misspelt path: {sorted(typos)}"
    broken = sorted(t for t in cited_links(md) if not (page.parent / t).exists())
    assert not broken, f"{page.name} links to files that do not exist: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_cited_command_and_module_exists(page: Path):
    md = page.read_text()
    commands = cli_commands()
    bad = []
    for cmd, sub in sorted(cited_commands(md), key=str):
        if cmd not in commands:
            bad.append(f"fedrec {cmd}")
        elif commands[cmd] and sub is not None and sub not in commands[cmd]:
            bad.append(f"fedrec {cmd} {sub}")
    assert not bad, f"{page.name} cites commands fedrec does not have: {bad}"
    modules = sorted(m for m in cited_modules(md) if module_file(m) is None)
    assert not modules, f"{page.name} cites `python -m` modules that do not exist: {modules}"


def test_no_references_readers_cannot_open():
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"DESIGN|\bissue [0-9]", text), page.name


def test_readme_is_short():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; move detail into docs/"


def test_readme_results_table_is_generated_from_the_committed_results():
    """The README's table is the generator's output for simulations/results/suite-full, as
    `fedrec suite full --out simulations/results/suite-full --report-only --readme README.md`
    writes it: no number in it is typed in by hand."""
    from fedrec.simulations.suite import load_suite
    from fedrec.simulations.suite_report import headline, headline_markers

    begin, end = headline_markers("full")
    text = (REPO / "README.md").read_text()
    assert text.count(begin) == 1 and text.count(end) == 1
    block = text[text.index(begin) + len(begin) : text.index(end)].strip()
    out = REPO / "simulations" / "results" / "suite-full"
    want = "\n".join(headline(load_suite("full"), out, "simulations/results/suite-full")).strip()
    assert block == want, "README's table differs from the results: run the command above"


def test_headline_reads_the_numbers_from_the_results_files(tmp_path):
    """A changed metrics.json changes the table (the generator reads the files, it has no
    numbers of its own); an experiment that has not run shows as such."""
    import json
    import shutil

    from fedrec.simulations.suite import load_suite
    from fedrec.simulations.suite_report import headline

    src = REPO / "simulations" / "results" / "suite-full" / "runs"
    out = tmp_path / "suite-full"
    for name in ("A-central", "A-baselines"):
        shutil.copytree(src / name, out / "runs" / name)
    m = json.loads((out / "runs" / "A-central" / "metrics.json").read_text())
    m["model"]["metrics"]["test"]["NDCG@10"] = 0.98765
    (out / "runs" / "A-central" / "metrics.json").write_text(json.dumps(m))
    lines = headline(load_suite("full"), out, "X")
    central = next(ln for ln in lines if "`A-central`" in ln)
    assert "| 0.9877 |" in central and "not run" in central  # B-central, C-central absent
    assert any(ln.startswith("| popularity | none | 0.0449 |") for ln in lines)


def test_readme_secure_headline_is_generated_from_the_committed_runs():
    """The README's first result (one user per device, no trusted server) is what
    `python -m fedrec.simulations.secure_report --readme README.md` writes from the committed
    runs in simulations/results/secure-agg/runs/: no number typed by hand."""
    from fedrec.simulations.secure_report import BEGIN, DEFAULT_RESULTS, END, headline

    text = (REPO / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    want = headline(REPO / DEFAULT_RESULTS, label=DEFAULT_RESULTS.as_posix())
    assert block == want, "README's secure headline differs from the runs: run the command above"


def test_secure_headline_reads_the_runs_and_refuses_mixed_settings(tmp_path):
    import json
    import shutil

    from fedrec.simulations.secure_report import DEFAULT_RESULTS, headline

    src = REPO / DEFAULT_RESULTS / "runs"
    private = sorted(
        p.name for p in src.iterdir()
        if json.loads((p / "config.json").read_text())["federation"]["secure_agg"]
    )  # fmt: skip
    assert len(private) >= 3  # the median of at least three runs
    for name in private:
        (tmp_path / "runs" / name).mkdir(parents=True)
        for f in ("metrics.json", "config.json"):
            shutil.copy(src / name / f, tmp_path / "runs" / name / f)
    m = json.loads((tmp_path / "runs" / private[0] / "metrics.json").read_text())
    m["model"]["metrics"]["test"]["NDCG@10"] = 0.98765
    (tmp_path / "runs" / private[0] / "metrics.json").write_text(json.dumps(m))
    assert "| 0.9877 |" in headline(tmp_path)
    # the epsilon names its adjacency, and the replace-one epsilon of the same release (the
    # largest over the runs) where the runs report it
    rep = max(
        json.loads((src / n / "metrics.json").read_text())["privacy"]["user_level"][
            "epsilon_replace_one"] for n in private
    )  # fmt: skip
    assert f"zero-out adjacency; at most {rep:.2f} if one user's data is replaced" in headline(
        tmp_path
    )
    c = json.loads((tmp_path / "runs" / private[1] / "config.json").read_text())
    c["federation"]["server_lr"] = 0.5
    (tmp_path / "runs" / private[1] / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="differ only in their seed"):
        headline(tmp_path)
    c["federation"]["server_lr"] = json.loads((src / private[0] / "config.json").read_text())[
        "federation"
    ]["server_lr"]
    (tmp_path / "runs" / private[1] / "config.json").write_text(json.dumps(c))
    # a twin: the central-DP run drops secure aggregation only; anything else is refused
    twin = tmp_path / "runs" / "central"
    twin.mkdir()
    shutil.copy(src / private[0] / "metrics.json", twin / "metrics.json")
    t = json.loads((src / private[0] / "config.json").read_text())
    t["federation"]["secure_agg"] = False
    (twin / "config.json").write_text(json.dumps(t))
    assert "with central DP" in headline(tmp_path)
    t["federation"]["num_rounds"] += 1
    (twin / "config.json").write_text(json.dumps(t))
    with pytest.raises(ValueError, match="not the same federation with central DP"):
        headline(tmp_path)
    t["federation"]["num_rounds"] -= 1
    t["federation"]["dp"] = True  # local DP is no twin at all
    (twin / "config.json").write_text(json.dumps(t))
    with pytest.raises(ValueError, match="local DP"):
        headline(tmp_path)


def test_readme_seeds_table_is_generated_from_the_committed_runs():
    """The README's medians over seeds are what `python -m fedrec.simulations.seeds_report
    --readme README.md` writes from the committed runs: no number typed by hand."""
    from fedrec.simulations.seeds_report import BEGIN, DEFAULT_RESULTS, END, headline

    text = (REPO / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    want = headline(REPO / DEFAULT_RESULTS)
    assert block == want, "README's seeds table differs from the runs: run the command above"


def test_seeds_table_reads_the_runs_and_refuses_what_a_median_cannot_mix(tmp_path):
    """The row is computed from the runs' files (a changed metric changes it; the median of
    three is the middle value; so is a seeded bar's over its own seeds), and the generator
    refuses runs whose settings differ beyond the seed, a baseline fitted on another split (the
    suite's or a seed's), a seed run whose config names another seed, a single run, and a run
    without the metric."""
    import json
    import shutil

    from fedrec.simulations.seeds_report import DEFAULT_RESULTS, Setting, headline

    src = REPO / DEFAULT_RESULTS
    s = Setting("x", "fed-A-silo10-batch", "q10-r3-lr16-seed*", (("test", "NDCG@10"),), "als")
    names = sorted(p.parent.name for p in (src / s.folder / "runs").glob(f"{s.runs}/config.json"))
    assert len(names) >= 3
    for name in names:
        (tmp_path / s.folder / "runs" / name).mkdir(parents=True)
        for f in ("metrics.json", "config.json"):
            shutil.copy(src / s.folder / "runs" / name / f, tmp_path / s.folder / "runs" / name / f)
    base = tmp_path / "suite-full" / "runs" / "A-baselines"
    base.mkdir(parents=True)
    shutil.copy(src / "suite-full" / "runs" / "A-baselines" / "metrics.json", base)
    runs = tmp_path / s.folder / "runs"

    def edit(path, change):
        d = json.loads(path.read_text())
        change(d)
        path.write_text(json.dumps(d))

    for name, v in zip(names[:3], (0.5, 0.1, 0.2), strict=True):  # median 0.2, mean 0.267
        edit(runs / name / "metrics.json",
             lambda d, v=v: d["model"]["metrics"]["test"].update({"NDCG@10": v}))  # fmt: skip
    als = json.loads((base / "metrics.json").read_text())["baselines"]["als"]["metrics"]
    row = headline(tmp_path, (s,)).splitlines()[2]
    assert f"**0.2000** (0.1000 to 0.5000) | als: {als['test']['NDCG@10']:.4f} |" in row
    # the bar over its own seeds, from `fedrec baselines --seed S` runs beside the suite's
    seeds = tmp_path / "baseline-seeds" / "runs"
    for seed, v in ((0, 0.3), (1, 0.1), (2, 0.2)):
        (seeds / f"A-seed{seed}").mkdir(parents=True)
        edit_base = json.loads((base / "metrics.json").read_text())
        edit_base["baselines"]["als"]["metrics"]["test"]["NDCG@10"] = v
        edit_base["baselines"]["als"]["seed"] = seed
        (seeds / f"A-seed{seed}" / "metrics.json").write_text(json.dumps(edit_base))
        (seeds / f"A-seed{seed}" / "config.json").write_text(
            json.dumps({"command": "baselines", "seed": seed})
        )
    row = headline(tmp_path, (s,)).splitlines()[2]
    cell = f"als: {als['test']['NDCG@10']:.4f} (seeds 0 to 2: median 0.2000, 0.1000 to 0.3000) |"
    assert cell in row
    # a bar the seed does not move gets no spread, even with seed runs that hold it
    pop = Setting("x", s.folder, s.runs, s.metrics, "popularity")
    assert "(seeds" not in headline(tmp_path, (pop,)).splitlines()[2]
    a2 = seeds / "A-seed2"
    cfg = json.loads((a2 / "config.json").read_text())
    (a2 / "config.json").write_text(json.dumps(cfg | {"seed": 1}))
    with pytest.raises(ValueError, match="are not both its folder's"):
        headline(tmp_path, (s,))
    (a2 / "config.json").write_text(json.dumps(cfg))
    edit(a2 / "metrics.json", lambda d: d["baselines"]["als"].update({"seed": 0}))
    with pytest.raises(ValueError, match="are not both its folder's"):
        headline(tmp_path, (s,))
    edit(a2 / "metrics.json", lambda d: d["baselines"]["als"].update({"seed": 2}))
    edit(a2 / "metrics.json", lambda d: d["baselines"]["als"]["trace"].pop())
    with pytest.raises(ValueError, match="another grid"):
        headline(tmp_path, (s,))
    edit(seeds / "A-seed1" / "metrics.json", lambda d: d["split"].update({"n_users": 1}))
    with pytest.raises(ValueError, match="differs from the suite's baselines run"):
        headline(tmp_path, (s,))
    shutil.rmtree(tmp_path / "baseline-seeds")
    # settings that differ beyond the seed
    edit(runs / names[1] / "config.json", lambda d: d["federation"].update({"lr": 1.5}))
    with pytest.raises(ValueError, match="differ only in their seed"):
        headline(tmp_path, (s,))
    shutil.copy(src / s.folder / "runs" / names[1] / "config.json", runs / names[1])
    # a baseline fitted on another split
    edit(base / "metrics.json", lambda d: d["split"].update({"n_train_interactions": 1}))
    with pytest.raises(ValueError, match="not on the same split"):
        headline(tmp_path, (s,))
    shutil.copy(src / "suite-full" / "runs" / "A-baselines" / "metrics.json", base)
    # a run without the metric
    edit(runs / names[0] / "metrics.json", lambda d: d["model"]["metrics"].pop("test"))
    with pytest.raises(ValueError, match="no test NDCG@10"):
        headline(tmp_path, (s,))
    # one run is no median
    for name in names[1:]:
        shutil.rmtree(runs / name)
    with pytest.raises(ValueError, match="a median needs two or more"):
        headline(tmp_path, (s,))
