"""Personalized ranking and cold start with a trained fedrec model, on a device or a server.

    from fedrec.shared.inference import Recommender
    rec = Recommender.load("runs/central-A")
    rec.recommend(history=[1, 50, 181], k=10)                  # known items, time order
    rec.cold_start(query="space adventure with robots", k=10)  # a new user, free text
    rec.add_items({5000: "Robots in Space (2026). Genres: Sci-Fi"})  # a new item, text only

Item vectors are computed once per (backbone, adapter, head, catalog) and cached on disk
(``RUN/index/<hash>.pt``), so a warm ``recommend`` is one matrix-vector product.

Explanations are exact: before normalization the user vector is a weighted sum
``sum_j w_j e_j + g p (+ q)``, so an item's score splits into one term per history item, one for
the profile, one for the query, and the item bias; ``share`` is each term's fraction of the sum
of absolute terms.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.shared.federation.segments import (
    FLOOR,
    GENDERS,
    SEGMENT_FIELDS,
    RunPrior,
    describe,
    load_run_prior,
    segment_of,
)
from fedrec.shared.model.artifacts import load_model
from fedrec.shared.model.cold_prior import encode_for_prior
from fedrec.shared.model.examples import right_aligned
from fedrec.shared.model.towers import RecModel


@dataclass
class Recommendation:
    item_id: int
    score: float
    title: str
    because: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item_id": self.item_id, "score": round(self.score, 5)}
        out["title"] = self.title
        if self.because:
            out["because"] = self.because
        return out


def _file_hash(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


class Recommender:
    """Ranks the catalog for a history, a profile or a query; accepts new items at once."""

    def __init__(self, model: RecModel, item_ids: Sequence[int], titles: Sequence[str]) -> None:
        if model.item_fac_ctx is not None:
            raise ValueError(
                "this model has context item factors (model.factor_context=true, a central-"
                "training experiment): the recommender scores symmetric item factors only; "
                "train without factor_context to serve the model"
            )
        self.model = model
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.titles = list(titles)
        self.position = {int(i): k for k, i in enumerate(self.item_ids)}
        self.items: torch.Tensor = torch.empty(0)
        self.bias: torch.Tensor = torch.empty(0)
        self.fac: torch.Tensor | None = None  # (n_items, k) item factors, 0 for untrained items
        self.off: torch.Tensor | None = None  # (n_items, k) item offsets, 0 for untrained items
        self._texts: dict[str, torch.Tensor] = {}
        # a federated run's segment prior for new users (``segment-prior``), or None
        self.segment: RunPrior | None = None
        self.segment_error: str | None = None  # why a run with the setting has no prior here
        # per catalog position, the segment prior's column (-1: an item added after loading)
        self._segment_cols = np.empty(0, dtype=np.int64)

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, run: str | Path, *, backbone: str | None = None) -> Recommender:
        """Load base model + adapter + head from a run directory; build or reuse the index."""
        run = Path(run)
        model, meta = load_model(run, backbone=backbone)
        rec = cls(model, meta["item_ids"], meta.get("titles") or meta["item_texts"])
        key = _file_hash(
            [
                run / "adapter" / "adapter_model.safetensors",
                run / "model" / "head.safetensors",
                run / "model" / "model.json",
            ]  # fmt: skip
        )
        index = run / "index" / f"{key}.pt"
        cached = _load_index(index, (len(meta["item_texts"]), model.dim))
        if cached is not None:
            rec.items = cached
        else:
            rec.items = rec._embed_catalog()
            index.parent.mkdir(parents=True, exist_ok=True)
            tmp = index.with_suffix(f".{os.getpid()}.tmp")
            torch.save(rec.items, tmp)
            os.replace(tmp, index)
        with torch.no_grad():
            rec.bias = model.biases().detach().clone()
            fac = model.factors()
            fac = None if fac is None else fac.detach().clone()
            if model.item_off is not None:
                rec.off = fac
            else:
                rec.fac = fac
        try:
            rec.segment = load_run_prior(run, len(rec.item_ids))
        except ValueError as e:  # the model still ranks; asking for the prior says why not
            rec.segment_error = str(e)
        rec._segment_cols = np.arange(len(rec.item_ids))  # the catalog as loaded
        return rec

    @torch.no_grad()
    def _embed_catalog(self, batch_size: int = 256) -> torch.Tensor:
        return self.model.item_embeddings(self.model.text_embeddings(batch_size))

    # --- helpers -----------------------------------------------------------------------------
    def _positions(self, ids: Iterable[int], what: str) -> list[int]:
        out = []
        for i in ids:
            if int(i) not in self.position:
                raise KeyError(
                    f"{what}: item id {i} is not in the catalog ({len(self.item_ids)} items); "
                    "add it first with add_items({id: text})"
                )
            out.append(self.position[int(i)])
        return out

    @torch.no_grad()
    def _text(self, text: str, *, adapted: bool) -> torch.Tensor:
        key = f"{int(adapted)}:{text}"
        if key not in self._texts:
            self._texts[key] = self.model.encode_texts([text], adapted=adapted)[0]
        return self._texts[key]

    @torch.no_grad()
    def _rank(
        self,
        history: list[int],
        profile: str | None,
        query: str | None,
        k: int,
        exclude: set[int],
        explain: bool,
        segment: int | None = None,
    ) -> list[Recommendation]:
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k={k!r}: ask for at least one recommendation (k >= 1)")
        m = self.model
        ctx = torch.as_tensor(
            right_aligned([np.asarray(history, dtype=np.int64)], m.cfg.history_len)
        )
        valid = ctx[0] >= 0
        w = m.history_weights(ctx >= 0)[0][valid]  # (n_hist,)
        hist_items = ctx[0][valid]
        # (n_hist, dim) one row per history item; the user map is linear, so mapping each row
        # keeps their sum the model's mapped history vector (a query is not a history: unmapped)
        terms = [m.map_history(w.unsqueeze(1) * self.items[hist_items])]
        labels: list[dict[str, Any]] = [
            {"item_id": int(self.item_ids[i]), "title": self.titles[i]} for i in hist_items.tolist()
        ]
        prof_row = None
        if profile and m.cfg.use_profile:
            prof_row = len(labels)
            terms.append(m.profile_term(self._text(profile, adapted=False)).unsqueeze(0))
            labels.append({"profile": profile})
        if query:
            terms.append(F.normalize(self._text(query, adapted=True), dim=-1).unsqueeze(0))
            labels.append({"query": query})
        parts = torch.cat(terms)  # (n_terms, dim)
        raw_norm = parts.sum(0).norm()  # |unnormalized user vector|
        if raw_norm < 1e-12:
            parts = parts * 0.0  # nothing to personalize on: the ranking is by item bias
        # the recency tower normalizes the user vector; the additive one keeps its length
        norm = torch.tensor(1.0) if m.additive else raw_norm.clamp(min=1e-12)
        contrib = m.log_scale.exp() * (parts @ self.items.T) / norm  # (n_terms, n_items)
        if self.fac is not None:
            # item factors: each history item j adds w_j <f_j, f_i> (a trained item's only)
            n_hist = hist_items.shape[0]
            contrib[:n_hist] += (w.unsqueeze(1) * self.fac[hist_items]) @ self.fac.T
            if prof_row is not None and m.profile_fac is not None:
                p = F.normalize(self._text(profile or "", adapted=False), dim=-1)
                contrib[prof_row] += (m.profile_fac @ p) @ self.fac.T
        if self.off is not None:
            # item offsets: <P^T u, g_i> is linear in u, so each term's share of u adds its part
            contrib += ((parts / norm) @ m.offset_basis) @ self.off.T
        if segment is not None and self.segment is not None:
            # the run's evaluation ranks a new user by weight * log prior + the model, added in
            # float64 as there; an item added after loading has no column: no member of the
            # segment took it, as for a catalog item none took (the prior's floor)
            row = self.segment.prior.log_prior(np.array([segment]))[0]
            cols = self._segment_cols
            log_prior = self.segment.weight * np.where(cols >= 0, row[cols], np.log(FLOOR))
            scores = (contrib.sum(0) + self.bias).double() + torch.as_tensor(log_prior)
            # in the explanation the prior's term is shifted by its catalog median, so that its
            # share is what it adds over a typical item (the shift changes no ranking)
            shifted = torch.as_tensor(log_prior - np.median(log_prior), dtype=contrib.dtype)
            contrib = torch.cat([contrib, shifted.unsqueeze(0)])
            labels.append({"segment": describe(self.segment.fields, segment)})
        else:
            scores = contrib.sum(0) + self.bias
        scores[self._positions(exclude, "exclude")] = -torch.inf
        k = min(k, int(torch.isfinite(scores).sum()))
        # descending score, ties by ascending item id: the catalog is in ascending id order
        order = np.argsort(-scores.numpy(), kind="stable")[:k]
        # one reason per distinct input: an item the history holds twice is one reason, its
        # terms summed (every term of one item has the same sign: positive recency weights)
        first: dict[int, int] = {}
        row_of: list[int] = []
        reasons: list[dict[str, Any]] = []
        for lab in labels:
            item = lab.get("item_id")
            if item is not None and item in first:
                row_of.append(first[item])
                continue
            if item is not None:
                first[item] = len(reasons)
            row_of.append(len(reasons))
            reasons.append(lab)
        if len(reasons) < len(labels):
            merged = torch.zeros(len(reasons), contrib.shape[1], dtype=contrib.dtype)
            contrib = merged.index_add_(0, torch.tensor(row_of), contrib)
        labels = reasons
        out = []
        for i in order.tolist():
            because: list[dict[str, Any]] = []
            if explain:
                c = contrib[:, i]
                total = float(c.abs().sum() + self.bias[i].abs())
                for j in torch.argsort(-c.abs()).tolist()[:3]:
                    because.append(
                        {
                            **labels[j],
                            "share": round(float(c[j].abs()) / total, 3) if total else 0.0,
                        }
                    )
                if total and float(self.bias[i].abs()) / total >= 0.05:
                    because.append(
                        {"popularity": True, "share": round(float(self.bias[i].abs()) / total, 3)}
                    )
            out.append(
                Recommendation(int(self.item_ids[i]), float(scores[i]), self.titles[i], because)
            )
        return out

    # --- the public API (docs/model.md, "Inference and explanations") -------------------
    @property
    def uses_profile(self) -> bool:
        """Whether the model reads a profile text (trained with ``use_profile``); a model that
        does not ignores ``profile=`` (with a warning)."""
        return bool(self.model.cfg.use_profile)

    def _profile(self, profile: str | None) -> str | None:
        if profile is None or not profile.strip():
            return None
        if not self.uses_profile:
            warnings.warn(
                "this model was trained without profiles (use_profile=false): the profile is "
                "ignored",
                UserWarning,
                stacklevel=3,
            )
            return None
        return profile

    def recommend(
        self,
        history: Sequence[int],
        k: int = 10,
        exclude: Iterable[int] | None = None,
        *,
        profile: str | None = None,
        explain: bool = False,
    ) -> list[Recommendation]:
        """Top ``k`` items for a user with this history (item ids, oldest first) and, for a
        model trained with profiles, the user's profile text (as the model saw it in training,
        e.g. from ``Dataset.user_text``).

        The history items are excluded from the ranking, and so is ``exclude``.
        """
        history = list(history)
        if not history:
            raise ValueError(
                "recommend() needs a non-empty history; use cold_start() for a new user"
            )
        pos = self._positions(history, "history")
        excl = set(history) | set(exclude or ())
        return self._rank(pos, self._profile(profile), None, k, excl, explain)

    @torch.no_grad()
    def score_batch(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """``(len(histories), n_items)`` scores, catalog in ``item_ids`` order, many users at once.

        The raw scores: nothing is excluded (a caller ranking with them should drop each
        user's history items). One matrix product for the whole batch.
        """
        if not histories:
            raise ValueError("score_batch() got no histories")
        pos = [
            np.asarray(self._positions(h, f"history {b}"), dtype=np.int64)
            for b, h in enumerate(histories)
        ]
        ctx = torch.as_tensor(right_aligned(pos, self.model.cfg.history_len))
        # the text part from this index's vectors (its order); the factor part below likewise
        users = self.model.user_embeddings(self.items, ctx, factors=False)  # (batch, dim)
        scores = self.model.log_scale.exp() * users @ self.items.T + self.bias
        if self.fac is not None:
            # the factor part from this index's own rows (its order, new items at 0)
            w = self.model.history_weights(ctx >= 0)  # (batch, L)
            uf = (w.unsqueeze(-1) * self.fac[ctx.clamp(min=0)]).sum(1)  # (batch, k)
            scores = scores + uf @ self.fac.T
        if self.off is not None:
            scores = scores + (users @ self.model.offset_basis) @ self.off.T
        return scores.numpy()

    def cold_start(
        self,
        profile: str | None = None,
        query: str | None = None,
        history: Sequence[int] = (),
        k: int = 10,
        *,
        explain: bool = False,
        segment: Mapping[str, Any] | None = None,
    ) -> list[Recommendation]:
        """Top ``k`` for a new user from a profile text, a free-text query, 1-3 items and/or,
        for a federated run trained with ``segment-prior``, the user's profile fields
        (``segment={"age": 25, "gender": "F"}``): then ranked as the run's evaluation ranked its
        new users, ``segment-weight x log prior(item | segment)`` plus the model's score. A field
        the run's prior does not use is ignored; one it uses and ``segment`` lacks puts the user
        in that field's ``unknown`` cell (close to global popularity)."""
        cell = self._segment(segment)
        if (
            not (profile and profile.strip())
            and not (query and query.strip())
            and not history
            and cell is None
        ):
            raise ValueError(
                "cold_start() needs a profile, a query, a segment or at least one history item"
            )
        pos = self._positions(history, "history")
        return self._rank(pos, self._profile(profile), query, k, set(history), explain, cell)

    def _segment(self, segment: Mapping[str, Any] | None) -> int | None:
        if segment is None:
            return None
        if not isinstance(segment, Mapping):
            raise ValueError(f"segment={segment!r}: expected a mapping like {{'age': 25}}")
        unknown = sorted(set(segment) - set(SEGMENT_FIELDS), key=str)
        if unknown:
            raise ValueError(
                f"segment field {unknown[0]!r} is not a segment field; use {SEGMENT_FIELDS}"
            )
        age, gender = segment.get("age"), segment.get("gender")
        if age is not None:
            try:
                years = float(age) if not isinstance(age, bool) else float("nan")
            except (TypeError, ValueError):
                years = float("nan")
            if not 0 < years < 130:
                raise ValueError(f"segment age={age!r}: give the user's age in years (1 to 129)")
        if gender is not None and str(gender).strip().upper() not in GENDERS:
            raise ValueError(f"segment gender={gender!r}: give one of {GENDERS}")
        if self.segment is None:
            raise ValueError(
                self.segment_error
                or "this model has no segment prior (a federated run trained with segment-prior "
                "has one): rank a new user by profile text, query or items instead"
            )
        return segment_of(segment, self.segment.fields)

    @torch.no_grad()
    def add_items(self, items: Mapping[int, str]) -> None:
        """Add new items by text; they rank at once: by text, and by the model's cold prior (a
        popularity predicted from the text, :mod:`fedrec.shared.model.cold_prior`) if it has
        one, else with no bias (never trained)."""
        if not items:
            raise ValueError("add_items() got no items")
        for i, text in items.items():
            if int(i) in self.position:
                raise ValueError(f"item id {i} is already in the catalog")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"item {i}: its text is empty; new items are ranked by text")
        ids = [int(i) for i in items]
        texts = [items[i] for i in ids]
        emb = F.normalize(self.model.encode_texts(texts), dim=-1)
        bias = torch.zeros(len(ids))
        if bool(self.model.cold_prior.any()):
            bias = self.model.cold_prior_of(encode_for_prior(self.model, texts))
        self.items = torch.cat([self.items, emb])
        self.bias = torch.cat([self.bias, bias])
        if self.fac is not None:  # a new item has no trained factors
            self.fac = torch.cat([self.fac, torch.zeros(len(ids), self.fac.shape[1])])
        if self.off is not None:  # nor trained offsets
            self.off = torch.cat([self.off, torch.zeros(len(ids), self.off.shape[1])])
        self.item_ids = np.concatenate([self.item_ids, np.asarray(ids, dtype=np.int64)])
        self.titles += [items[i] for i in ids]
        self._segment_cols = np.concatenate([self._segment_cols, np.full(len(ids), -1)])
        self._sort_by_id()

    def _sort_by_id(self) -> None:
        """Keep the catalog in ascending id order (the tie rule relies on it)."""
        order = np.argsort(self.item_ids, kind="stable")
        self.item_ids = self.item_ids[order]
        t = torch.as_tensor(order)
        self.items, self.bias = self.items[t], self.bias[t]
        if self.fac is not None:
            self.fac = self.fac[t]
        if self.off is not None:
            self.off = self.off[t]
        self.titles = [self.titles[i] for i in order.tolist()]
        self._segment_cols = self._segment_cols[order]
        self.position = {int(i): k for k, i in enumerate(self.item_ids)}


def _load_index(path: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    """The cached catalog embeddings at ``path`` if they are a finite float tensor of ``shape``
    (loaded with ``weights_only``: a planted pickle cannot run code), else None: the caller
    recomputes them and replaces the file."""
    if not path.is_file():
        return None
    try:
        t = torch.load(path, weights_only=True)
    except Exception:  # a truncated or foreign file: rebuilt
        return None
    ok = (
        isinstance(t, torch.Tensor)
        and t.dtype.is_floating_point
        and tuple(t.shape) == shape
        and bool(torch.isfinite(t).all())
    )
    return t if ok else None
