#!/usr/bin/env bash
# fedrec's two set-up commands (see README.md):
#   bash run.sh          set up .venv if needed, fetch ML-100K, run the main job
#   bash run.sh test     set up .venv if needed, run the test suite (without the slow tests:
#                        `bash run.sh test -m slow` runs only those, `-m "slow or not slow"` all)
# Other verbs: `bash run.sh setup` (only install), `bash run.sh fedrec ARGS...` (the CLI in .venv).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${FEDREC_VENV:-.venv}"
PY="${FEDREC_PYTHON:-python3.11}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV with $PY"
    "$PY" -m venv "$VENV"
  fi
  local want have
  want=$(sha256sum pyproject.toml | cut -c1-16)
  have=$(cat "$VENV/.fedrec-installed" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    echo "== installing fedrec and its pinned dependencies into $VENV (first time: a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch first and pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    echo "$want" > "$VENV/.fedrec-installed"
  fi
}

verb="${1:-main}"
[ $# -gt 0 ] && shift
case "$verb" in
  setup) setup ;;
  main)
    setup
    "$VENV/bin/fedrec" data fetch ml-100k
    # The main job: a federated simulation on ML-100K (Flower simulation runtime, the default
    # MiniLM backbone with LoRA) with fedrec simulate's default preset "secure": one user per
    # client, 471 of 943 per round, 10 rounds, user-level DP (epsilon 8 at delta 1e-5) with
    # secure aggregation and distributed noise, no trusted server (3 to 8 min on 2 cores).
    # `fedrec simulate --list-presets` lists the others. It rewrites its own run directory each
    # time (a run directory never mixes runs).
    rm -rf "${FEDREC_RUN:-runs/main}"
    "$VENV/bin/fedrec" simulate --out "${FEDREC_RUN:-runs/main}" "$@"
    ;;
  test)
    setup
    echo "== tests marked slow (real Flower processes, minutes each) run only when asked:" \
      "bash run.sh test -m slow (those only) or -m 'slow or not slow' (everything)"
    "$VENV/bin/python" -m pytest "$@"
    ;;
  fedrec)
    setup
    "$VENV/bin/fedrec" "$@"
    ;;
  *)
    echo "usage: bash run.sh [main|test|setup|fedrec ARGS...]" >&2
    exit 2
    ;;
esac
