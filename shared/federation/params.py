"""What travels between server and clients: the trainable adapter tensors, checked on arrival.

The global model is the frozen backbone + the tensors listed by :func:`travelling_state`:

- the LoRA adapter in PEFT's state-dict format (``get_peft_model_state_dict``): A and B with
  ``fedavg``; only B with ``ffa`` (A is the shared seeded init on every side and never moves);
- the head: item bias ``(n_items,)``, recency logits ``(history_len,)``, score scale and profile
  gate (scalars), with ``item-factors`` k > 0 the item factors ``(n_items, k)`` (and with
  profiles the profile's map into their space ``(k, dim)``), with ``item-offsets`` k > 0 the
  item offsets ``(n_items, k)``, with ``user-map`` r > 0 the user
  map (``(dim, r)``, or ``(r, r)`` with ``user-map-space = catalog``), and with
  ``id-residual`` (no DP only) the per-item ID table ``(n_items, dim)``, under ``head.*``.

Nothing else is ever put in a message (no item ids, histories or texts). Incoming updates are
validated by :func:`check_update` before they touch the global model.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import get_peft_model_state_dict

from fedrec.shared.model.towers import RecModel

HEAD = (
    "item_bias",
    "pos_logits",
    "log_scale",
    "profile_gate",
    "id_emb",
    "item_fac",
    "item_off",
    "profile_fac",
    "user_map",
)


class UpdateError(ValueError):
    """A client update that cannot be aggregated (missing key, wrong shape, NaN/Inf, ...)."""


def _adapter_tensors(model: RecModel) -> dict[str, torch.Tensor]:
    """PEFT state-dict name -> the model's own adapter Parameter, for the names
    ``get_peft_model_state_dict`` gives (checked to be exactly those, and the same values);
    looked up once per model: PEFT's call walks the whole backbone's state dict (milliseconds,
    every round on every client)."""
    cached = model.__dict__.get("_fedrec_adapter_tensors")
    if cached is not None:
        return cached
    reference = get_peft_model_state_dict(model.backbone)
    own = {
        name.replace(".default.", "."): p
        for name, p in model.backbone.named_parameters()
        if ".lora_" in name
    }
    if set(own) != set(reference) or any(
        not torch.equal(own[k].detach(), reference[k]) for k in reference
    ):
        raise RuntimeError(
            "the adapter's parameters do not match PEFT's state dict (a PEFT version with "
            f"other names?): {sorted(own)} vs {sorted(reference)}"
        )
    model.__dict__["_fedrec_adapter_tensors"] = own
    return own


def _travelling(model: RecModel) -> dict[str, torch.Tensor]:
    """Name -> the model's own Parameter, for everything a round trains and sends: the
    adapter (without A under FFA-LoRA, where A is frozen) and the trainable head tensors."""
    frozen_a = not model.lora_layer().lora_A["default"].weight.requires_grad
    out = {k: p for k, p in _adapter_tensors(model).items() if not (frozen_a and ".lora_A." in k)}
    for name in HEAD:
        p = getattr(model, name, None)
        if isinstance(p, torch.nn.Parameter) and p.requires_grad:
            out[f"head.{name}"] = p
    return out


def travelling_parameters(model: RecModel) -> dict[str, torch.Tensor]:
    """Name -> the model's own Parameter (not a copy), for each travelling tensor."""
    return _travelling(model)


def travelling_state(model: RecModel) -> dict[str, torch.Tensor]:
    """Name -> float32 tensor (detached copy) of everything a round trains and sends."""
    return {k: p.detach().clone().float() for k, p in _travelling(model).items()}


@torch.no_grad()
def load_travelling(model: RecModel, state: Mapping[str, torch.Tensor]) -> None:
    """Write ``state`` (as from :func:`travelling_state`) into ``model``; strict on keys and
    shapes, checked before anything is written."""
    expected = _travelling(model)
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        raise UpdateError(
            f"state keys differ: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    bad = [k for k, p in expected.items() if tuple(state[k].shape) != tuple(p.shape)]
    if bad:
        raise UpdateError(
            "state shapes differ: "
            + ", ".join(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in bad)
        )
    for k, p in expected.items():
        p.copy_(state[k])


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})


def flat_keys(template: Mapping[str, torch.Tensor]) -> list[str]:
    """The travelling tensors' order in a flattened update (the client's masked vector and the
    server's decoded sum both sort by name)."""
    return sorted(template)


def flatten(state: Mapping[str, torch.Tensor], keys: list[str]) -> np.ndarray:
    """``state``'s tensors in the order of ``keys``, as one float64 vector."""
    return np.concatenate([state[k].detach().double().reshape(-1).numpy() for k in keys])


def unflatten(
    vec: np.ndarray, template: Mapping[str, torch.Tensor], keys: list[str]
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten`: ``vec`` cut into ``template``'s shapes and dtypes."""
    out, at = {}, 0
    for k in keys:
        n = template[k].numel()
        out[k] = torch.as_tensor(vec[at : at + n], dtype=template[k].dtype).reshape(
            template[k].shape
        )
        at += n
    return out


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode every array of a record (see :func:`decode_array`); :class:`UpdateError` if any
    is malformed."""
    return {k: torch.from_numpy(decode_array(k, a)) for k, a in record.items()}


_NPY_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 10_000  # numpy's own default limit for np.load


@functools.lru_cache(maxsize=1024)
def _npy_header(header: bytes, encoding: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    """Parse an ``.npy`` header dict. Memoized: every client's tensor of one name carries the
    same header, so a round with N clients parses each distinct header once."""
    try:
        d = ast.literal_eval(header.decode(encoding))
        dtype = np.lib.format.descr_to_dtype(d["descr"])
        shape = tuple(int(n) for n in d["shape"])
        fortran = d["fortran_order"]
    except (ValueError, TypeError, KeyError, SyntaxError, UnicodeDecodeError, MemoryError,
            RecursionError) as err:  # fmt: skip
        raise UpdateError(f"malformed .npy header ({type(err).__name__}: {err})") from None
    if not isinstance(fortran, bool) or any(n < 0 for n in shape):
        raise UpdateError(f"malformed .npy header {header[:200]!r}")
    return dtype, shape, fortran


def decode_array(name: str, a: Array) -> np.ndarray:
    """A Flower ``Array`` (``numpy.ndarray`` serialization: ``.npy`` bytes) as a writable,
    native-byte-order NumPy array, or :class:`UpdateError` saying what is wrong with it.

    Same result as ``Array.numpy()`` (``np.load(allow_pickle=False)``, tested), but the header is
    parsed once per distinct header rather than once per array, and the data is read in place:
    decoding was about half of the server's aggregation time with ``Array.numpy()``. Anything a
    client can send wrong (another serialization type, bytes that are not ``.npy``, a truncated
    or oversized payload, object dtypes) is an :class:`UpdateError`, so the strategy rejects that
    one reply instead of failing the round.
    """
    if a.stype != "numpy.ndarray":
        raise UpdateError(f"'{name}': serialization type {a.stype!r}, expected 'numpy.ndarray'")
    data = a.data
    if not isinstance(data, bytes) or len(data) < 10 or data[:6] != _NPY_MAGIC:
        raise UpdateError(f"'{name}': the payload is not .npy bytes")
    major = data[6]
    if major == 1:
        hlen, start, enc = int.from_bytes(data[8:10], "little"), 10, "latin1"
    elif major in (2, 3) and len(data) >= 12:
        hlen, start = int.from_bytes(data[8:12], "little"), 12
        enc = "latin1" if major == 2 else "utf8"
    else:
        raise UpdateError(f"'{name}': unsupported .npy format version {major}")
    if hlen > _MAX_HEADER or start + hlen > len(data):
        raise UpdateError(f"'{name}': .npy header length {hlen} is invalid")
    try:
        dtype, shape, fortran = _npy_header(data[start : start + hlen], enc)
    except UpdateError as err:
        raise UpdateError(f"'{name}': {err}") from None
    if dtype.hasobject:
        raise UpdateError(f"'{name}': object arrays are not accepted")
    count, off = math.prod(shape), start + hlen
    if len(data) - off != count * dtype.itemsize:
        raise UpdateError(
            f"'{name}': {len(data) - off} data bytes, the header ({dtype}, {shape}) needs "
            f"{count * dtype.itemsize}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=off)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    native = dtype.newbyteorder("=") if not dtype.isnative else dtype
    return np.array(arr, dtype=native, order="C", copy=True)


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
        t = t.float()  # checked AFTER the cast: a float64 1e300 is inf in float32
        if not _finite(t):
            raise UpdateError(f"'{name}' contains NaN or Inf (as float32)")
        out[name] = t
    return out


def change_norm(update: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the whole change ``update - current`` over every tensor (in float64)."""
    sq = sum(float((update[k].double() - current[k].double()).pow(2).sum()) for k in current)
    return math.sqrt(sq)


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf. NumPy's check when the dtype allows (a tenth of torch's per-call overhead,
    which dominates for the small tensors of one update), else torch's (e.g. bfloat16)."""
    if t.dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(t.detach().cpu().numpy()).all())
    return bool(torch.isfinite(t).all())


def nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(int(t.numel()) * 4 for t in state.values())
