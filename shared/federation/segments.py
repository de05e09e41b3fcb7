"""A private segment prior for new users: each client's (segment, item) counts, released once.

With run config ``segment-prior`` (profile fields, e.g. ``age`` or ``age,gender``), every client
that trains in the run's first round also sends its training interactions counted per
(segment, item) cell, where a user's segment is fixed by their profile fields alone. Under local
DP every cell gets Gaussian noise of standard deviation ``segment-noise`` on the client, before
the table leaves it; the server sums the tables it receives (with ``robust`` aggregation it
combines them cell by cell instead, :func:`combine_tables`). After the last round a user the
federation never trained on (a new user, protocol C) is ranked by
``segment-weight * log prior(item | segment) + the model's score``, the prior an empirical-Bayes
shrinkage of the noisy segment counts toward the noisy global popularity
(:class:`SegmentPrior`). Users who trained are scored by the model alone.

Privacy (the local unit: one interaction added or removed). A client's table changes in exactly
one cell by exactly 1 (the interaction's item, its user's segment); the cells are fixed by the
config and the public catalog, never by the data (age in fixed bands, :data:`AGE_EDGES`; values
outside the known ones go to an ``unknown`` cell). So the release is the Gaussian mechanism with
L2 sensitivity 1 and noise multiplier ``segment-noise``. It is charged to the client's budget in
the same history as its DP-SGD steps, as one run at sample rate 1 (:func:`release_run`): under
``replace-one`` adjacency with noise multiplier ``2 * segment-noise`` (a replacement moves a
clipped sum by up to two clip norms; this run's replace-one curve is the release's own, and it
dominates the add/remove case), under ``add-remove`` with group ``k`` with noise multiplier
``k * segment-noise`` (group privacy over k steps of sensitivity 1/k: an upper bound, looser than
the release's own curve). The profile fields that pick a user's segment are not protected by the
per-interaction guarantee, as with ``use-profile``; the counts are.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

# MovieLens-1M's published age groups (under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+): fixed
# in advance, never quantiles of the users' ages (those would come from the private data)
AGE_EDGES = (18.0, 25.0, 35.0, 45.0, 50.0, 56.0)
GENDERS = ("F", "M")
SEGMENT_FIELDS = ("age", "gender")
FLOOR = 1e-8  # added before the log: an item no segment member took


def parse_fields(spec: str) -> tuple[str, ...]:
    """``"age,gender"`` -> ``("age", "gender")``; ``""`` -> ``()`` (no prior). ValueError naming
    the run-config key for an unknown or repeated field."""
    fields = tuple(f.strip() for f in spec.split(",") if f.strip())
    for f in fields:
        if f not in SEGMENT_FIELDS:
            raise ValueError(
                f"run config 'segment-prior' = {spec!r} is invalid: unknown profile field {f!r}; "
                f"use a comma list of {SEGMENT_FIELDS} (their cells are fixed in advance), or "
                "'' for none"
            )
    if len(set(fields)) != len(fields):
        raise ValueError(f"run config 'segment-prior' = {spec!r} is invalid: a field is repeated")
    return fields


def _cells(field: str) -> int:
    # every known value, plus one cell for a missing or unrecognized value
    return (len(AGE_EDGES) + 1 if field == "age" else len(GENDERS)) + 1


def n_segments(fields: Sequence[str]) -> int:
    n = 1
    for f in fields:
        n *= _cells(f)
    return n


def _value(field: str, raw: str) -> int:
    unknown = _cells(field) - 1
    raw = raw.strip()
    if field == "age":
        try:
            age = float(raw)
        except ValueError:
            return unknown
        if not np.isfinite(age):
            return unknown
        return int(np.searchsorted(np.asarray(AGE_EDGES), age, side="right"))
    return GENDERS.index(raw.upper()) if raw.upper() in GENDERS else unknown


def segment_of(profile: Mapping[str, Any] | None, fields: Sequence[str]) -> int:
    """The segment (a cell index in ``[0, n_segments(fields))``) of a user's profile fields."""
    index = 0
    for f in fields:
        value = _value(f, str((profile or {}).get(f, "")))
        index = index * _cells(f) + value
    return index


def segments_of(
    user_fields: Mapping[int, Mapping[str, Any]], user_ids: Sequence[int] | np.ndarray,
    fields: Sequence[str],
) -> np.ndarray:  # fmt: skip
    """``segment_of`` for each of ``user_ids`` (a dataset's ``user_fields``), int64."""
    return np.array([segment_of(user_fields.get(int(u)), fields) for u in user_ids], dtype=np.int64)


def describe(fields: Sequence[str], segment: int) -> str:
    """A segment in words, e.g. ``"age 25-34, gender F"`` (the inverse of :func:`segment_of`)."""
    parts = []
    for f in reversed(fields):
        segment, value = divmod(segment, _cells(f))
        if value == _cells(f) - 1:
            parts.append(f"{f} unknown")
        elif f == "age":
            if value == 0:
                span = f"under {int(AGE_EDGES[0])}"
            elif value == len(AGE_EDGES):
                span = f"{int(AGE_EDGES[-1])}+"
            else:
                span = f"{int(AGE_EDGES[value - 1])}-{int(AGE_EDGES[value]) - 1}"
            parts.append(f"age {span}")
        else:
            parts.append(f"gender {GENDERS[value]}")
    return ", ".join(reversed(parts))


def count_table(
    items_per_user: Sequence[np.ndarray],
    segments: Sequence[int] | np.ndarray,
    n_items: int,
    n_seg: int,
) -> np.ndarray:
    """``(n_seg, n_items)`` float64: user ``u``'s items counted in row ``segments[u]``."""
    table = np.zeros((n_seg, n_items), dtype=np.float64)
    for items, seg in zip(items_per_user, segments, strict=True):
        np.add.at(table[seg], np.asarray(items, dtype=np.int64), 1.0)
    return table


def noised_counts(counts: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """One table's release under local DP: the whole-number ``counts`` (float64) plus Gaussian
    noise of std ``noise`` in every cell (L2 sensitivity 1: one interaction is one count), the
    noise rounded to a whole number before it is added. The rounding is post-processing of the
    Gaussian release, and it is what keeps it one: a float64 sum ``count + noise`` carries
    low-order bits that depend on the count (a count of 0 leaves the noise's own fine bits, a
    count of 1 or more rounds them away), which would tell a zero cell from a nonzero one
    (Mironov 2012 on floating-point noise). Rounding the noise, not the sum, makes the release
    exactly ``counts + D`` with ``D`` independent of the counts (rounding the sum differs at
    ties, which depend on the count's parity). The device draws ``rng`` from OS entropy; a
    validation scan may seed it."""
    if not (math.isfinite(noise) and noise > 0):
        raise ValueError(f"segment-noise={noise} must be a finite number > 0 under local DP")
    table = np.array(counts, dtype=np.float64)
    return table + np.rint(rng.normal(0.0, noise, size=table.shape))


def release_run(noise: float, adjacency: str, group: int) -> tuple[float, float, int]:
    """The accountant-history run that the release of one table at noise multiplier ``noise``
    (L2 sensitivity 1) is charged as, under the run's interaction-level adjacency (module doc)."""
    if not noise > 0:
        raise ValueError(f"segment-noise={noise} must be > 0 under local DP")
    scale = 2 if adjacency == "replace-one" else int(group)
    return (float(noise) * scale, 1.0, 1)


class SegmentPrior:
    """Per-segment item distributions from a summed (or robustly combined) noisy count table.

    ``p`` is the global popularity (the column sums, clipped at 0); a segment's row is shrunk
    toward its share of it, cell by cell: ``E + (c - E) * kappa E / (kappa E + var)``, with
    ``E = n_seg p`` the cell's expected count under global popularity and ``var`` the noise
    variance of the combined cell (0 without DP: the segment's own counts). Post-processing of the
    release."""

    def __init__(self, table: np.ndarray, *, noise_var: float, kappa: float) -> None:
        table = np.asarray(table, dtype=np.float64)
        total = np.maximum(table.sum(axis=0), 0.0)
        self.p = total / total.sum() if total.sum() > 0 else np.full(total.shape, 1 / total.size)
        rows = []
        for c in table:
            expected = max(float(c.sum()), 1.0) * self.p
            weight = kappa * expected / (kappa * expected + noise_var) if noise_var > 0 else 1.0
            row = np.maximum(expected + (c - expected) * weight, 0.0)
            rows.append(row / row.sum() if row.sum() > 0 else self.p)
        self.rows = np.stack(rows)

    def log_prior(self, segments: np.ndarray) -> np.ndarray:
        return np.log(self.rows[np.asarray(segments, dtype=np.int64)] + FLOOR)


class SegmentPriorScorer:
    """A :class:`~fedrec.shared.evaluation.Scorer`: ``base`` for users who trained (``warm``),
    ``weight * log prior(segment) + base`` for the others."""

    def __init__(
        self, base: Any, prior: SegmentPrior, user_segments: np.ndarray, weight: float
    ) -> None:
        self.base, self.prior, self.weight = base, prior, float(weight)
        self.user_segments = np.asarray(user_segments, dtype=np.int64)

    def score(
        self,
        users: np.ndarray,
        history: Sequence[np.ndarray],
        profiles: Sequence[str | None],
        warm: np.ndarray,
    ) -> np.ndarray:
        scores = np.array(self.base.score(users, history, profiles, warm), dtype=np.float64)
        cold = ~np.asarray(warm, dtype=bool)
        if cold.any():
            segs = self.user_segments[np.asarray(users)[cold]]
            scores[cold] = scores[cold] + self.weight * self.prior.log_prior(segs)
        return scores


def build_prior(
    total: np.ndarray,
    tables: int,
    *,
    dp: bool,
    noise: float,
    shrink: float,
    noise_tables: float | None = None,
) -> SegmentPrior:
    """The prior from the combination of ``tables`` released tables: under DP each cell of the
    sum carries noise of variance ``tables * noise**2`` (``noise_tables * noise**2`` when the
    tables were combined robustly, :func:`combine_tables`); without DP the counts are exact."""
    var = noise**2 * (tables if noise_tables is None else noise_tables) if dp else 0.0
    return SegmentPrior(total, noise_var=var, kappa=shrink)


COMBINE = ("none", "trimmed-mean", "median")  # the run config's ``robust`` values


def trimmed_count(n: int, how: str, trim: float) -> int:
    """How many values :func:`combine_tables` drops at each end of a cell's ``n`` values (the
    model's ``robust_mean``: the median when trimming would leave nothing)."""
    if how == "none":
        return 0
    k = int(trim * n)
    if how == "median" or n - 2 * k < 1:
        return (n - 1) // 2
    return k


# combine_variance simulates the noise for up to this many tables (above: the asymptotic formula)
_SIMULATED_TABLES = 200


@functools.lru_cache(maxsize=64)
def combine_variance(n: int, how: str, trim: float) -> float:
    """Variance of :func:`combine_tables`' per-cell result over ``n`` tables whose cells carry
    independent normal noise of variance 1, in units of that variance (the sum's is ``n``):
    ``n**2`` times the variance of the trimmed mean (or median) of ``n`` standard normal values.
    Up to :data:`_SIMULATED_TABLES` tables it is simulated (20,000 seeded draws, about 1 %
    standard error; the same number every call); above, the asymptotic variance of the trimmed
    mean, ``n (erf-part + 2 b c**2) / (1 - 2b)**2`` with ``b`` the fraction dropped at each end
    and ``c`` the normal quantile at ``1 - b`` (the median: ``n pi / 2``). It sets only the
    prior's shrinkage (how much a cell is trusted), never a privacy parameter, and it is the DP
    noise's part only: a robust combination also errs by how far the clients' true counts
    differ from one another, which a sum does not."""
    if n < 1:
        raise ValueError(f"combine_variance: n={n} must be >= 1")
    k = trimmed_count(n, how, trim)
    if k == 0:
        return float(n)
    if n <= _SIMULATED_TABLES:
        x = np.sort(np.random.default_rng(0).standard_normal((20_000, n)), axis=1)
        return float((x[:, k : n - k].mean(axis=1) * n).var())
    if 2 * k + 1 >= n:  # the median
        return n * math.pi / 2
    b = k / n
    c = NormalDist().inv_cdf(1 - b)
    inner = (2 * NormalDist().cdf(c) - 1) - 2 * c * NormalDist().pdf(c)
    return n * (inner + 2 * b * c * c) / (1 - 2 * b) ** 2


def combine_tables(tables: Sequence[np.ndarray], how: str, trim: float) -> tuple[np.ndarray, float]:
    """The released tables combined into one sum-like table, and its noise variance in units of
    one table's (:func:`combine_variance`). ``how`` (the run config's ``robust``): ``none``
    sums them; ``trimmed-mean`` / ``median`` take, cell by cell, the mean after dropping the
    :func:`trimmed_count` largest and smallest values (the median when that leaves one or two),
    times the number of tables. With ``k = trimmed_count(n, how, trim)`` > 0, up to ``k``
    tables, whatever they hold, leave every combined cell within ``n`` times the range of the
    other tables' values at that cell; with ``k`` = 0 (too few tables for ``trim``) it is the
    sum and gives no such bound. It estimates the sum only when the clients are alike (many
    users each, similar in size): the config refuses it for one-user clients. Post-processing of
    the releases: no privacy cost."""
    if how not in COMBINE:
        raise ValueError(f"combine_tables: how={how!r} is not one of {', '.join(COMBINE)}")
    if not tables:
        raise ValueError("combine_tables: no tables")
    stacked = np.stack([np.asarray(t, dtype=np.float64) for t in tables])
    n = stacked.shape[0]
    k = trimmed_count(n, how, trim)
    if k == 0:
        total = stacked.sum(axis=0)
    else:
        ordered = np.sort(stacked, axis=0)
        total = ordered[k : n - k].mean(axis=0) * n
    return total, combine_variance(n, how, trim)


def save_segment_sum(
    path: Path,
    total: np.ndarray,
    tables: int,
    *,
    noise_tables: float | None = None,
    combined: str = "none",
    trimmed: int = 0,
) -> None:
    """``RUN/segment_counts.npz``, atomically: the combined segment counts, how many tables,
    their DP noise variance in units of one table's (``noise_tables``; the number of tables for
    a sum), how they were combined (``combined``: the run's ``robust``) and how many values of
    each cell were dropped at each end (``trimmed``: 0 is a sum)."""
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(
        tmp,
        counts=total,
        tables=np.array(tables),
        noise_tables=np.array(float(tables if noise_tables is None else noise_tables)),
        combined=np.array(combined),
        trimmed=np.array(int(trimmed)),
    )
    tmp.replace(path)


def load_segment_sum(path: Path) -> tuple[np.ndarray, int]:
    with np.load(path) as f:
        return np.asarray(f["counts"], dtype=np.float64), int(f["tables"])


@dataclass
class Combination:
    """How a counts file's tables were combined (:func:`load_segment_meta`)."""

    noise_tables: float | None  # None: a file written before it was kept (a sum)
    combined: str = "none"
    trimmed: int = 0


def load_segment_meta(path: Path) -> Combination:
    """The file's combination; a file written before these keys were kept holds a sum."""
    with np.load(path) as f:
        if "noise_tables" not in f.files:
            return Combination(None)
        value = float(f["noise_tables"])
        combined = str(f["combined"]) if "combined" in f.files else "none"
        trimmed = int(f["trimmed"]) if "trimmed" in f.files else 0
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"noise_tables={value!r} is not a positive number")
    if combined not in COMBINE or trimmed < 0:
        raise ValueError(f"combined={combined!r}, trimmed={trimmed!r} are not a combination")
    return Combination(value, combined, trimmed)


@dataclass
class RunPrior:
    """A finished run's segment prior, as its evaluation used it (:func:`load_run_prior`)."""

    prior: SegmentPrior
    fields: tuple[str, ...]
    weight: float
    tables: int


def _number(section: Mapping[str, Any], key: str, where: str, *, zero: bool = False) -> float:
    value = section.get(key)
    number = float("nan")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if not np.isfinite(number) or number < 0 or (number == 0 and not zero):
        raise ValueError(
            f"{where}: {key}={value!r} is not a {'non-negative' if zero else 'positive'} number; "
            "the file is not as fedrec wrote it (restore it from the run)"
        )
    return number


def load_run_prior(run: Path, n_items: int) -> RunPrior | None:
    """The segment prior of the run in ``run`` (its ``config.json`` and ``segment_counts.npz``),
    built as the run's own evaluation built it (``server/outputs.py`` for ``fedrec simulate``,
    ``shared/model/run_central.py`` for ``train-central``); ``None`` for a run without one.
    ValueError (only) naming the file, and the key, when the run has the setting but its config
    or counts are damaged, missing or for another catalog."""
    run = Path(run)
    config = run / "config.json"
    if not config.is_file():
        return None
    try:
        doc = json.loads(config.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{config}: not readable JSON ({e}); restore it from the run") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{config}: expected a JSON object; restore it from the run")
    fed, train = doc.get("federation"), doc.get("train")
    if isinstance(fed, dict):  # fedrec simulate: the released tables, combined
        spec = fed.get("segment_prior")
        if not spec:
            return None
        dp = fed.get("dp")
        if not isinstance(dp, bool):
            raise ValueError(f"{config}: federation.dp={dp!r} is not true or false")
        noise = _number(fed, "segment_noise", f"{config} federation", zero=True)
        shrink = _number(fed, "segment_shrink", f"{config} federation")
        weight = _number(fed, "segment_weight", f"{config} federation")
    elif isinstance(train, dict):  # train-central: the exact counts, one table
        spec = train.get("segment_prior")
        if not spec:
            return None
        dp, noise, shrink = False, 0.0, 1.0
        weight = _number(train, "segment_weight", f"{config} train")
    else:
        return None
    if not isinstance(spec, str):
        raise ValueError(f"{config}: segment_prior={spec!r} is not a comma list of fields")
    fields = parse_fields(spec)
    path = run / "segment_counts.npz"
    if not path.is_file():
        raise ValueError(
            f"{path} not found: the run has segment-prior={spec!r} but no combined counts (no "
            "client sent a table, or the file was removed); its new users are ranked by the model "
            "alone, as its metrics.json says"
        )
    try:
        total, tables = load_segment_sum(path)
        noise_tables = load_segment_meta(path).noise_tables
    except Exception as e:  # noqa: BLE001 - a damaged file: zip, pickle, dtype, shape errors
        raise ValueError(
            f"{path}: not a segment-count file fedrec wrote ({type(e).__name__}: {e}); restore "
            "it from the run"
        ) from None
    want = (n_segments(fields), int(n_items))
    if total.shape != want or not np.isfinite(total).all() or tables < 1:
        raise ValueError(
            f"{path}: counts of shape {total.shape} ({tables} tables) do not fit this run's prior "
            f"(shape {want}: {want[0]} segments of {list(fields)} x {want[1]} catalog items); "
            "restore the file from the run"
        )
    prior = build_prior(total, tables, dp=dp, noise=noise, shrink=shrink, noise_tables=noise_tables)
    return RunPrior(prior, fields, weight, tables)
