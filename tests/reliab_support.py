"""Helpers of the reliability tests: bitwise snapshots of everything an optimizer touches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def bits(value: Any) -> Any:
    """A comparable, bit-exact image of a value: tensors become their raw bytes.

    Integer (byte) views, not ``==``: NaN payloads, -0.0 and +0.0 all count.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout == torch.sparse_coo:
            return ("coo", tuple(t.shape), bits(t._indices()), bits(t._values()))
        if t.is_meta:
            return ("meta", tuple(t.shape), t.dtype)
        if t._is_zerotensor():  # (torch._efficientzerotensor) no memory to read
            return ("zero tensor", tuple(t.shape), t.dtype)
        if t.is_neg():  # a negated view's memory: negating it again clears the bit
            return ("negated view", bits(torch._neg_view(t)))
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        return (t.dtype, tuple(t.shape), t.device.type, raw.numpy().tobytes())
    if isinstance(value, Mapping):
        return {repr(k): bits(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(bits(v) for v in value)
    if callable(value):
        return ("callable", id(value))
    return repr(value)


def differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Names of the entries whose bits differ (or that appeared or vanished)."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def torch_face_tensors(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Every tensor of a ``tfadam.Adam``: params, grads, slots, accumulators, groups, counters."""
    found: dict[str, Any] = {"_calls": getattr(opt, "_calls", None)}
    found["state keys"] = sorted(
        (repr(type(k)), ",".join(sorted(map(str, v))) if isinstance(v, Mapping) else repr(v))
        for k, v in opt.state.items()
    )
    for gi, group in enumerate(opt.param_groups):
        for key, value in group.items():
            if key != "params":
                found[f"group{gi}.{key}"] = value
        for pi, param in enumerate(group["params"]):
            found[f"group{gi}.param{pi}"] = param
            found[f"group{gi}.param{pi}.grad"] = param.grad
            entry = opt.state.get(param, {})
            if isinstance(entry, Mapping):
                for slot, tensor in entry.items():
                    found[f"group{gi}.param{pi}.{slot}"] = tensor
            else:
                found[f"group{gi}.param{pi}.state"] = entry
    return {name: bits(value) for name, value in found.items()}


def tf1_face_tensors(opt: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Every tensor of a ``tfadam.AdamOptimizer`` plus ``extra`` (variables, grads, global_step)."""
    found: dict[str, Any] = {"_applied": opt._applied}
    accumulators = opt._get_beta_accumulators()
    found["accumulators"] = accumulators
    for position, (var, slots) in enumerate(opt._slots.items()):
        found[f"slots{position}.var"] = var
        for name, tensor in slots.items():
            found[f"slots{position}.{name}"] = tensor
    found.update(extra)
    return {name: bits(value) for name, value in found.items()}
