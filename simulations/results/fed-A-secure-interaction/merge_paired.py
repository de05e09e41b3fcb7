"""Merge one run's rows of ``../fed-A-pooled-step/paired.py`` into this folder's ``paired.json``.

    python simulations/results/fed-A-secure-interaction/merge_paired.py /tmp/paired-S.json

``paired.py`` needs a run's ``model/`` and ``adapter/``, which are not committed, so each run's
rows are computed when it finishes and merged here. The ALS rows (fitted again each time) must
equal the committed ones; a run's row replaces an earlier row of the same run.
"""

import json
import sys
from pathlib import Path

PAIRED = Path(__file__).resolve().parent / "paired.json"


def main(new_file: str) -> None:
    old = json.loads(PAIRED.read_text())
    new = json.loads(Path(new_file).read_text())
    als_old = [r for r in old if "ALS seed" in r]
    if [r for r in new if "ALS seed" in r] != als_old:
        raise SystemExit(f"{new_file}: its ALS rows differ from {PAIRED}'s: not merged")
    runs = {r["run"]: r for r in old if "run" in r} | {r["run"]: r for r in new if "run" in r}
    PAIRED.write_text(json.dumps(als_old + [runs[k] for k in sorted(runs)], indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
