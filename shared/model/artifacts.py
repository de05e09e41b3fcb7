"""Saving and loading a trained model in the run directory.

``RUN/adapter/``: the LoRA adapter in PEFT format (``adapter_config.json`` +
``adapter_model.safetensors``), loadable by ``peft.PeftModel.from_pretrained`` on the backbone.
``RUN/model/head.safetensors``: the non-LoRA parameters (item bias, ID residuals, item factors,
user tower) and the cold prior (``shared/model/cold_prior.py``; zeros without one).
``RUN/model/model.json``: the model config, the backbone's fingerprint, library versions and
the catalog (item ids and texts: public data), so a run directory is self-contained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedrec.shared.backbone import backbone_fingerprint, load_backbone, resolve_backbone
from fedrec.shared.model.config import ModelConfig, as_dict, from_dict
from fedrec.shared.model.towers import RecModel
from fedrec.shared.rundir import versions, write_json

HEAD = (
    "id_emb",
    "item_bias",
    "item_fac",
    "item_fac_ctx",
    "item_off",
    "profile_fac",
    "user_map",
    "user_map_basis",
    "pos_logits",
    "profile_gate",
    "log_scale",
)
# buffers a run directory may lack (written before they existed): zeros then, i.e. no cold prior
OPTIONAL_HEAD = ("cold_prior", "cold_prior_items")


def save_model(model: RecModel, run: Path, *, item_ids: list[int], titles: list[str]) -> None:
    run = Path(run)
    (run / "model").mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(str(run / "adapter"))
    head = {
        n: getattr(model, n).detach().contiguous() for n in HEAD if getattr(model, n) is not None
    }
    head["warm"] = model.warm.to(torch.uint8)
    head.update({n: getattr(model, n).detach().contiguous() for n in OPTIONAL_HEAD})
    save_file(head, str(run / "model" / "head.safetensors"))
    write_json(
        run / "model" / "model.json",
        {
            "config": as_dict(model.cfg),
            "backbone_path": str(resolve_backbone(model.cfg.backbone)),
            "backbone_fingerprint": backbone_fingerprint(resolve_backbone(model.cfg.backbone)),
            "versions": versions(),
            "item_ids": item_ids,
            "item_texts": model.item_texts,
            "titles": titles,
            # the encoder the cold prior reads ('' = this model's frozen backbone)
            "cold_prior_backbone": model.cold_prior_backbone,
            "cold_prior_backbone_fingerprint": (
                backbone_fingerprint(resolve_backbone(model.cold_prior_backbone))
                if model.cold_prior_backbone
                else ""
            ),
        },
    )


class ModelFileError(ValueError):
    """A run directory whose model files are missing or do not fit the backbone."""


def read_meta(run: Path) -> dict[str, Any]:
    path = Path(run) / "model" / "model.json"
    if not path.is_file():
        raise ModelFileError(
            f"{path} not found: {run} is not a trained fedrec run (train one with "
            "`fedrec train-central` or `fedrec simulate`)"
        )
    meta = _json_object(path)
    need = {"config": dict, "backbone_fingerprint": str, "item_ids": list, "item_texts": list}
    for key, kind in need.items():
        if not isinstance(meta.get(key), kind):
            raise ModelFileError(
                f"{path}: field '{key}' is missing or not a {kind.__name__}; the file is not "
                "one fedrec wrote (retrain, or restore it from the run)"
            )
    if len(meta["item_ids"]) != len(meta["item_texts"]):
        raise ModelFileError(
            f"{path}: {len(meta['item_ids'])} item ids for {len(meta['item_texts'])} item texts; "
            "the catalog is damaged (retrain, or restore the file from the run)"
        )
    return meta


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a :class:`ModelFileError` naming the file."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ModelFileError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a :class:`ModelFileError` naming the file."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise ModelFileError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); retrain, or "
            "restore the file from the run"
        ) from None


def load_model(run: Path, *, backbone: str | None = None) -> tuple[RecModel, dict[str, Any]]:
    """Rebuild the trained model of ``run`` (no catalog cache: inference uses the plain path)."""
    from peft import set_peft_model_state_dict

    run = Path(run)
    meta = read_meta(run)
    cfg = from_dict(ModelConfig, meta["config"], where=str(run / "model" / "model.json"))
    if backbone is not None:
        cfg = ModelConfig(**{**as_dict(cfg), "backbone": backbone})
    found = backbone_fingerprint(resolve_backbone(cfg.backbone))
    if found != meta["backbone_fingerprint"]:
        raise ModelFileError(
            f"{run}: the adapter was trained on backbone {meta['backbone_path']} (fingerprint "
            f"{meta['backbone_fingerprint']}), but {cfg.backbone!r} has fingerprint {found}. "
            "Load it with the backbone it was trained on."
        )
    adapter_dir = run / "adapter"
    adapter_cfg_path = adapter_dir / "adapter_config.json"
    if not adapter_cfg_path.is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ModelFileError(
            f"{adapter_dir}: adapter_config.json or adapter_model.safetensors missing"
        )
    adapter_cfg = _json_object(adapter_cfg_path)
    if adapter_cfg.get("r") != cfg.lora_r:
        raise ModelFileError(
            f"{adapter_cfg_path}: LoRA rank r={adapter_cfg.get('r')} but the model config says "
            f"lora_r={cfg.lora_r}; the adapter and model.json come from different runs"
        )
    base, tokenizer = load_backbone(cfg.backbone)
    model = RecModel(base, tokenizer, meta["item_texts"], cfg, with_cache=False)
    state = _tensors(adapter_dir / "adapter_model.safetensors")
    if not any("lora_A" in k for k in state) or not any("lora_B" in k for k in state):
        raise ModelFileError(f"{adapter_dir}: no LoRA A/B tensors in adapter_model.safetensors")
    try:
        result = set_peft_model_state_dict(model.backbone, state)
    except RuntimeError as e:  # size mismatch: another backbone or rank
        first = str(e).strip().splitlines()[-1]
        raise ModelFileError(
            f"{adapter_dir}: adapter does not fit {cfg.backbone}: {first}"
        ) from None
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelFileError(f"{adapter_dir}: unexpected adapter tensors {unexpected}")
    head = _tensors(run / "model" / "head.safetensors")
    if "warm" not in head or head["warm"].shape != model.warm.shape:
        raise ModelFileError(f"{run}/model/head.safetensors: 'warm' missing or mis-shaped")
    with torch.no_grad():
        for name in HEAD:
            param = getattr(model, name)
            if param is None:
                continue
            if name not in head or head[name].shape != param.shape:
                raise ModelFileError(
                    f"{run}/model/head.safetensors: '{name}' missing or mis-shaped"
                )
            param.copy_(head[name])
        model.warm.copy_(head["warm"].bool())
        present = [n for n in OPTIONAL_HEAD if n in head]
        if present and len(present) != len(OPTIONAL_HEAD):
            raise ModelFileError(
                f"{run}/model/head.safetensors: has {present} but not all of {list(OPTIONAL_HEAD)}"
            )
        prior_backbone = meta.get("cold_prior_backbone", "")
        if not isinstance(prior_backbone, str):
            raise ModelFileError(
                f"{run}/model/model.json: 'cold_prior_backbone' must be a string (an encoder's "
                "name or folder, '' for the model's own backbone)"
            )
        for name in present:
            buf = getattr(model, name)
            want = buf.shape
            if name == "cold_prior" and prior_backbone:  # another encoder's width + 1
                want = head[name].shape if head[name].ndim == 1 and len(head[name]) > 1 else want
            if head[name].shape != want or not torch.isfinite(head[name]).all():
                raise ModelFileError(
                    f"{run}/model/head.safetensors: '{name}' is mis-shaped or not finite"
                )
        if present:
            model.set_cold_prior(head["cold_prior"], head["cold_prior_items"], prior_backbone)
            model.cold_prior_fingerprint = str(meta.get("cold_prior_backbone_fingerprint") or "")
        if bool((model.cold_prior_items * model.warm).any()):
            raise ModelFileError(
                f"{run}/model/head.safetensors: 'cold_prior_items' is non-zero on trained items"
            )
    model.eval()
    model.requires_grad_(False)  # inference only: no autograd bookkeeping
    return model, meta
