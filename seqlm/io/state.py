"""Trainer state without pickle: tensors to safetensors, everything else to JSON.

``flatten(obj)`` walks nested dicts / lists / tuples (an optimizer's ``state_dict()``, RNG
states, counters) and returns ``(tensors, skeleton)``: every tensor is moved into
``tensors`` under a dotted name and replaced in the skeleton by ``{"__tensor__": name}``.
The skeleton is plain JSON (dicts with non-string keys and tuples are tagged so they come
back as they were). ``unflatten`` is the inverse. Loading runs no code: safetensors holds
raw arrays and JSON only data, so nothing in a checkpoint can name a callable.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch

_TAGS = ("__tensor__", "__tuple__", "__items__", "__float__")


class StateFormatError(ValueError):
    """A trainer-state file does not describe a state this module wrote."""


def flatten(obj: Any, prefix: str = "state") -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, name):
        if isinstance(o, torch.Tensor):
            tensors[name] = o.detach().to("cpu").contiguous().clone()
            return {"__tensor__": name}
        if isinstance(o, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in o):
                return {k: walk(v, f"{name}.{k}") for k, v in o.items()}
            items = []
            for i, (k, v) in enumerate(o.items()):
                if not isinstance(k, (str, int, bool)) and k is not None:
                    raise TypeError(f"trainer state: key {k!r} at {name} is not a str/int")
                items.append([k, walk(v, f"{name}.{k if isinstance(k, (int, str)) else i}")])
            return {"__items__": items}
        if isinstance(o, tuple):
            return {"__tuple__": [walk(v, f"{name}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{name}.{i}") for i, v in enumerate(o)]
        if isinstance(o, float) and not math.isfinite(o):
            return {"__float__": repr(o)}  # strict JSON has no nan/inf
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        if isinstance(o, torch.dtype):  # e.g. an optimizer's foreach/fused flags never are; be strict
            raise TypeError(f"trainer state: {name} holds a torch.dtype; store its name instead")
        raise TypeError(f"trainer state: {name} holds a {type(o).__name__}, which is neither a "
                        f"tensor nor JSON data")

    skeleton = walk(obj, prefix)
    return tensors, skeleton


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(o):
        if isinstance(o, list):
            return [walk(v) for v in o]
        if isinstance(o, dict):
            if len(o) == 1:
                (k, v), = o.items()
                if k == "__tensor__":
                    if v not in tensors:
                        raise StateFormatError(f"tensor {v!r} is missing from the tensor file")
                    return tensors[v]
                if k == "__tuple__":
                    return tuple(walk(x) for x in v)
                if k == "__items__":
                    return {key: walk(val) for key, val in v}
                if k == "__float__":
                    if v not in ("nan", "inf", "-inf"):
                        raise StateFormatError(f"bad float {v!r}")
                    return float(v)
            return {k: walk(v) for k, v in o.items()}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise StateFormatError(f"unexpected JSON value {o!r}")  # pragma: no cover - json.loads types

    try:
        return walk(skeleton)
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, StateFormatError):
            raise
        raise StateFormatError(str(e)) from None


def dumps(skeleton: Any) -> bytes:
    return json.dumps(skeleton, indent=1, allow_nan=False).encode()
