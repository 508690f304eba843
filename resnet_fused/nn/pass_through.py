"""Pass-through twins: the class fuse_ gives a norm or an activation whose computation the fused module
before it took over. A twin subclasses the original class (isinstance, repr, parameters, buffers and
state_dict keys unchanged) and returns its input.

Twins are made on first use, for any class, and named after it so that pickle finds them again in a
process that has not made them yet (this module's __getattr__ makes them by name): torch.nn's classes as
``_PassThrough<Name>``, other libraries' as ``_PassThrough<Name>__<its module path, dots as __>``.
"""

from __future__ import annotations

import importlib
import sys

from torch import nn

_PREFIX, _SEP = "_PassThrough", "__"
_TWINS: dict[type, type] = {}


def _pass_through_forward(self, x, *args, **kwargs):
    return x


def _name(cls: type) -> str:
    if getattr(nn, cls.__name__, None) is cls:
        return _PREFIX + cls.__name__
    return _PREFIX + cls.__name__ + _SEP + cls.__module__.replace(".", _SEP)


def pass_through(cls: type) -> type:
    """cls's pass-through twin (made once)."""
    twin = _TWINS.get(cls)
    if twin is None:
        name = _name(cls)
        twin = type(name, (cls,), {"forward": _pass_through_forward, "__module__": __name__, "__qualname__": name,
                                   "__doc__": f"{cls.__name__}, computed by the fused module before it"})
        _TWINS[cls] = twin
        setattr(sys.modules[__name__], name, twin)
    return twin


def _original(name: str) -> type:
    """The class a twin's name names (the inverse of _name)."""
    cls_name, _, module = name.removeprefix(_PREFIX).partition(_SEP)
    if not module:
        return getattr(nn, cls_name)
    return getattr(importlib.import_module(module.replace(_SEP, ".")), cls_name)


def __getattr__(name: str):
    if name.startswith(_PREFIX):
        try:
            cls = _original(name)
        except (ImportError, AttributeError) as e:
            raise AttributeError(f"module {__name__!r} cannot make {name!r}: {e}") from e
        return pass_through(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
