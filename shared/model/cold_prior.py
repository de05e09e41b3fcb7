"""A popularity prior for items never trained, predicted from their catalog text.

A cold item has no ID vector and no learned bias: the model ranks it by its text vector alone.
How popular an item will be is partly legible from its text (a film's year and genres in
MovieLens), and the collaborative baselines' whole advantage on warm items is popularity. This
module fits a ridge regression from the **frozen** backbone's normalized, mean-pooled text
embedding of an item (public data) onto ``log(1 + n_i)``, ``n_i`` the item's number of training
interactions, over the trained items; the ridge strength is chosen by 5-fold cross-validation on
those items (seeded), never on evaluation queries. An item never trained then gets the bias

    ``b_i = weight * (pred_i - mean of pred over the trained items)``

added to its score. Centred so that a cold item predicted as popular as the average trained item
keeps the 0 it had before: only the spread between cold items, and their place against the
trained ones, changes. ``weight`` (logits per unit of log count) is chosen on a pseudo-cold
holdout (``simulations/cold_prior.py``). Warm items are untouched.

Two targets. **Counts** (central training, ``train.cold_prior``): the above; the counts are
training data, which ``train-central`` (no DP) may use and a DP federation may not (it would need
them released under its guarantee, which fedrec does not do). **The model's own item bias** (the
federation, run config ``cold-prior``): the same regression onto the learned biases ``b_i`` of
the trained items, uncentred, so a cold item gets the bias its text predicts (``weight`` 1 is
that bias in its own units). It reads only the released model and the public catalog texts:
post-processing, no privacy cost. Which items count as trained is the model's ``warm`` mask: on
the server the catalog minus the items the protocol declares new (public, not derived from
interactions; :func:`fedrec.shared.federation.data_and_model.warm_items`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# ridge strengths tried by cross-validation (features are unit vectors)
LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
FOLDS = 5


@dataclass(frozen=True)
class TextPrior:
    """``pred(x) = (x - x_mean) @ coef + y_mean``, fitted on the trained items."""

    coef: np.ndarray  # (dim,)
    x_mean: np.ndarray  # (dim,)
    y_mean: float
    lam: float
    cv_mse: dict[float, float]  # held-out mean squared error per ridge strength

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.x_mean) @ self.coef + self.y_mean


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, float]:
    xm, ym = x.mean(0), float(y.mean())
    xc = x - xm
    coef = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - ym))
    return coef, xm, ym


def fit_text_prior(
    features: np.ndarray,
    target: np.ndarray,
    trained: np.ndarray,
    *,
    lambdas: tuple[float, ...] = LAMBDAS,
    seed: int = 0,
) -> TextPrior:
    """Ridge from ``features`` (n_items, dim) onto ``target`` (n_items,) over the ``trained``
    items (bool, n_items), the strength chosen by 5-fold cross-validation on them."""
    x = np.asarray(features, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    trained = np.asarray(trained, dtype=bool)
    if x.ndim != 2 or x.shape[0] != target.shape[0] or trained.shape != target.shape:
        raise ValueError(
            f"cold prior: features {x.shape}, targets {target.shape} and trained "
            f"{trained.shape} must describe the same items"
        )
    if not np.isfinite(x).all() or not np.isfinite(target[trained]).all():
        raise ValueError("cold prior: features and targets must be finite")
    if int(trained.sum()) < 2 * FOLDS:
        raise ValueError(
            f"cold prior: {int(trained.sum())} trained items; the cross-validation needs at "
            f"least {2 * FOLDS}"
        )
    if not lambdas or min(lambdas) <= 0:
        raise ValueError(f"cold prior: ridge strengths {lambdas} must be > 0")
    xw, yw = x[trained], target[trained]
    folds = np.array_split(np.random.default_rng(seed).permutation(len(yw)), FOLDS)
    cv: dict[float, float] = {}
    for lam in lambdas:
        err = 0.0
        for f in folds:
            keep = np.ones(len(yw), dtype=bool)
            keep[f] = False
            coef, xm, ym = _ridge(xw[keep], yw[keep], lam)
            err += float((((xw[f] - xm) @ coef + ym - yw[f]) ** 2).sum())
        cv[float(lam)] = err / len(yw)
    best = min(cv, key=lambda k: (cv[k], k))
    coef, xm, ym = _ridge(xw, yw, best)
    return TextPrior(coef=coef, x_mean=xm, y_mean=ym, lam=best, cv_mse=cv)


@torch.no_grad()
def frozen_features(
    model: Any, texts: list[str] | None = None, batch_size: int = 256
) -> np.ndarray:
    """Normalized frozen-backbone embeddings (no adapter) of ``texts`` (default: the catalog),
    in eval mode (no dropout: a model fresh from training is still in train mode)."""
    texts = model.item_texts if texts is None else texts
    was_training = model.training
    model.eval()
    try:
        out = [
            F.normalize(model.encode_texts(texts[s : s + batch_size], adapted=False), dim=-1)
            for s in range(0, len(texts), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out).double().numpy()


def own_backbone(model: Any, backbone: str) -> bool:
    """Whether a prior on ``backbone`` reads ``model``'s own frozen backbone: '', its name, or
    another name or folder for the same directory
    (:func:`fedrec.shared.backbone.same_backbone`)."""
    from fedrec.shared.backbone import same_backbone

    return backbone == "" or same_backbone(backbone, str(model.cfg.backbone))


def prior_features(model: Any, backbone: str = "") -> np.ndarray:
    """The catalog's text embeddings a prior on ``backbone`` regresses on: the model's own frozen
    backbone (:func:`frozen_features`) for '' or its own name; else that encoder's normalized,
    mean-pooled embeddings (:class:`fedrec.shared.backbone.TextEncoder`, cached on disk: the
    embeddings the text-popularity baseline reads)."""
    if own_backbone(model, backbone):
        return frozen_features(model)
    from fedrec.shared.backbone import TextEncoder

    return TextEncoder(backbone).encode_cached(model.item_texts)


# the prior's other encoder and its fingerprint, loaded once per process
_ENCODERS: dict[str, tuple[Any, str]] = {}


def encode_for_prior(model: Any, texts: list[str]) -> torch.Tensor:
    """Frozen embeddings of new ``texts`` by the encoder the model's prior reads. Another encoder
    must be on this machine and, when the saved model recorded its fingerprint, be the same
    one (else a clear error: its biases would be wrong silently)."""
    if not model.cold_prior_backbone:
        return model.encode_texts(texts, adapted=False)
    from fedrec.shared.backbone import TextEncoder, backbone_fingerprint, resolve_backbone

    name = model.cold_prior_backbone
    try:
        path = resolve_backbone(name)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"this model's cold prior reads the encoder {name!r}, which new items must be "
            f"embedded by: {e}"
        ) from None
    if str(path) not in _ENCODERS:
        _ENCODERS[str(path)] = (TextEncoder(path), backbone_fingerprint(path))
    encoder, found = _ENCODERS[str(path)]
    want = getattr(model, "cold_prior_fingerprint", "")
    if want and found != want:
        raise ValueError(
            f"this model's cold prior was fitted on encoder {name!r} with fingerprint {want}, but "
            f"{path} has {found}: new items would get wrong biases. Point it at the encoder the "
            "run used"
        )
    return torch.as_tensor(encoder.encode(texts))


@torch.no_grad()
def attach_cold_prior(
    model: Any,
    weight: float,
    *,
    counts: np.ndarray | None = None,
    features: np.ndarray | None = None,
    backbone: str = "",
) -> dict[str, Any]:
    """Fit the prior and store it in the model: ``cold_prior`` (dim + 1: the weighted linear
    function of a frozen text embedding, for items added later) and ``cold_prior_items`` (its
    value for every catalog item never trained, 0 for the trained ones). ``weight`` 0 stores
    zeros (no prior).

    With ``counts`` (training interactions per catalog item; central training): the target is
    ``log(1 + n_i)``, centred on the trained items' mean prediction. Without: the target is the
    model's own learned item bias (``b_i`` of the trained items), not centred, so that ``weight``
    1 gives a cold item the bias its text predicts; that reads nothing but the released model and
    the public catalog (post-processing: what a DP federation may do).

    ``backbone``: the encoder of ``features`` ('' = the model's own frozen backbone; another
    one's name or folder is stored with the prior, so that items added later are embedded by it;
    ``features`` default to :func:`prior_features` of it)."""
    if not (np.isfinite(weight) and weight >= 0):
        raise ValueError(f"cold prior weight {weight!r} must be a finite number >= 0")
    warm = model.warm.numpy()
    if counts is not None:
        counts = np.asarray(counts)
        if counts.shape != warm.shape:
            raise ValueError(f"cold prior: {counts.shape[0]} counts for {warm.shape[0]} items")
        if ((counts > 0) != warm).any():
            raise ValueError("cold prior: the counts do not match the model's trained items")
        target = np.log1p(counts.astype(np.float64))
        what = "log(1 + training interactions), centred on the trained items"
    else:
        if model.item_bias is None:
            raise ValueError(
                "cold prior without counts regresses the learned item bias, but this model has "
                "none (item_bias = false)"
            )
        target = model.item_bias.detach().double().numpy()
        what = "the model's learned item bias (post-processing of the model)"
    if "/" in backbone:  # a folder: kept as an absolute path with the model
        from pathlib import Path

        backbone = str(Path(backbone).resolve())
    x = prior_features(model, backbone) if features is None else np.asarray(features)
    if x.ndim != 2 or x.shape[0] != warm.shape[0]:
        raise ValueError(f"cold prior: features {x.shape} for {warm.shape[0]} catalog items")
    prior = fit_text_prior(x, target, warm)
    center = float(prior.predict(x[warm]).mean()) if counts is not None else 0.0
    coef = weight * prior.coef
    intercept = weight * (prior.y_mean - float(prior.x_mean @ prior.coef) - center)
    items = (x @ coef + intercept) * ~warm
    own = own_backbone(model, backbone)
    model.set_cold_prior(
        torch.as_tensor(np.append(coef, intercept), dtype=torch.float32),
        torch.as_tensor(items, dtype=torch.float32),
        "" if own else backbone,
    )
    return {
        "backbone": str(model.cfg.backbone) if own else backbone,
        "weight": float(weight),
        "lambda": prior.lam,
        "cv_mse": {str(k): round(v, 5) for k, v in prior.cv_mse.items()},
        "trained_items": int(warm.sum()),
        "cold_items": int((~warm).sum()),
        "target": what + "; ridge on frozen text embeddings",
    }


def attach_cold_prior_paired(
    model: Any,
    weight: float,
    score: Callable[[], dict[str, Any]],
    *,
    backbone: str = "",
    counts: np.ndarray | None = None,
) -> dict[str, Any]:
    """:func:`attach_cold_prior` on ``backbone``; when that is another encoder than the model's
    own, the same model with its own backbone's prior is scored first (``score()``, the caller's
    evaluation) and recorded as ``own_backbone``: a paired comparison on one trained model."""
    own = None
    if not own_backbone(model, backbone):
        own = attach_cold_prior(model, weight, counts=counts)
        own["metrics"] = score()
    prior = attach_cold_prior(model, weight, counts=counts, backbone=backbone)
    if own is not None:
        prior["own_backbone"] = own
    return prior


@torch.no_grad()
def clear_cold_prior(model: Any) -> None:
    """Remove the prior (zeros, on the model's own width): e.g. before a model object is
    trained again."""
    model.set_cold_prior(torch.zeros(model.dim + 1), torch.zeros_like(model.cold_prior_items))


__all__ = [
    "LAMBDAS",
    "TextPrior",
    "attach_cold_prior",
    "attach_cold_prior_paired",
    "clear_cold_prior",
    "encode_for_prior",
    "fit_text_prior",
    "frozen_features",
    "own_backbone",
    "prior_features",
]
