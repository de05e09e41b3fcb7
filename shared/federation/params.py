"""What travels between server and clients: the trainable adapter tensors, checked on arrival.

The global model is the frozen backbone + the tensors listed by :func:`travelling_state`:

- the LoRA adapter in PEFT's state-dict format (``get_peft_model_state_dict``): A and B with
  ``fedavg``; only B with ``ffa`` (A is the shared seeded init on every side and never moves);
- the head: item bias ``(n_items,)``, recency logits ``(history_len,)``, score scale and profile
  gate (scalars), under ``head.*``.

Nothing else is ever put in a message (no item ids, histories or texts). Incoming updates are
validated by :func:`check_update` before they touch the global model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fedrec.shared.model.towers import RecModel

HEAD = ("item_bias", "pos_logits", "log_scale", "profile_gate")


class UpdateError(ValueError):
    """A client update that cannot be aggregated (missing key, wrong shape, NaN/Inf, ...)."""


def travelling_state(model: RecModel) -> dict[str, torch.Tensor]:
    """Name -> float32 tensor (detached copy) of everything a round trains and sends."""
    out: dict[str, torch.Tensor] = {}
    lora = model.lora_layer()
    frozen_a = not lora.lora_A["default"].weight.requires_grad
    for name, t in get_peft_model_state_dict(model.backbone).items():
        if frozen_a and ".lora_A." in name:
            continue
        out[name] = t.detach().clone().float()
    for name in HEAD:
        p = getattr(model, name, None)
        if isinstance(p, torch.nn.Parameter) and p.requires_grad:
            out[f"head.{name}"] = p.detach().clone().float()
    return out


@torch.no_grad()
def load_travelling(model: RecModel, state: Mapping[str, torch.Tensor]) -> None:
    """Write ``state`` (as from :func:`travelling_state`) into ``model``; strict on keys."""
    expected = travelling_state(model)
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        raise UpdateError(
            f"state keys differ: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    lora = {k: v for k, v in state.items() if not k.startswith("head.")}
    result = set_peft_model_state_dict(model.backbone, lora)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if bad:
        raise UpdateError(f"PEFT did not accept adapter keys {bad}")
    for name in HEAD:
        if f"head.{name}" in state:
            getattr(model, name).copy_(state[f"head.{name}"])


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def check_update(
    update: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return ``update`` as float32 tensors if it matches ``expected`` exactly, else raise.

    Rejects: a missing or an unexpected key, a wrong shape, a non-float dtype, NaN or Inf.
    """
    missing, extra = set(expected) - set(update), set(update) - set(expected)
    if missing:
        raise UpdateError(f"missing tensor(s) {sorted(missing)}")
    if extra:
        raise UpdateError(f"unexpected tensor(s) {sorted(extra)}")
    out = {}
    for name, ref in expected.items():
        t = update[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise UpdateError(f"'{name}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if not t.dtype.is_floating_point:
            raise UpdateError(f"'{name}' has dtype {t.dtype}, expected a float tensor")
        if not bool(torch.isfinite(t).all()):
            raise UpdateError(f"'{name}' contains NaN or Inf")
        out[name] = t.float()
    return out


def nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(int(t.numel()) * 4 for t in state.values())
