"""Small helpers over Dynamo FX graphs (torch-level targets, `example_value` metadata)."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

Node = fx.Node


def meta_value(node: Any) -> Any:
    """The example (fake) value Dynamo recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape_of(node: Any) -> tuple[int, ...] | None:
    value = meta_value(node)
    if isinstance(value, torch.Tensor):
        return tuple(int(s) if isinstance(s, int) or not hasattr(s, "node") else s for s in value.shape)
    return None


def same_size(a: object, b: object) -> bool:
    """Sizes equal for every value the shape env allows. The pass reads shapes of graphs traced with dynamic
    sizes: a plain == on a SymInt would add a guard (and a recompile for the size it excludes)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001  (a size the shape env cannot compare is treated as different)
        return False


def same_shape(a: tuple | None, b: tuple | None) -> bool:
    """Shapes of equal rank whose sizes are `same_size`."""
    return a is not None and b is not None and len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def known_less(a: object, b: object) -> bool:
    """a < b for every value the shape env allows (no guard added)."""
    if isinstance(a, int) and isinstance(b, int):
        return a < b
    try:
        return bool(statically_known_true(a < b))
    except Exception:  # noqa: BLE001
        return False


def is_target(node: Any, *names: str) -> bool:
    """True when `node` calls a function or method whose short name is one of `names`.

    Matches torch functions (`torch.matmul`), Tensor methods (`call_method 'matmul'`), operator
    functions (`operator.matmul`) and aten overloads (`aten.matmul.default`) alike.
    """
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in names
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        short = target._schema.name.split("::")[-1]
    elif isinstance(target, torch._ops.OpOverloadPacket):
        short = target._qualified_op_name.split("::")[-1]
    else:
        short = getattr(target, "__name__", "")
    return short in names


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_parameter_like(node: Any) -> bool:
    """A model parameter or buffer (a Dynamo-lifted placeholder or a get_attr)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    if node.op == "placeholder":
        if re.search(r"_(parameters|buffers)_", node.name):
            return True
        return isinstance(meta_value(node), nn.Parameter)
    return False


def is_parameter(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":
        return "_parameters_" in node.name or isinstance(meta_value(node), nn.Parameter)
    return node.op == "get_attr"


_PATH_CLEAN = [(re.compile(r"\._modules\['([^']+)'\]"), r".\1"), (re.compile(r"\['([^']+)'\]"), r".\1")]


def module_path(node: Node) -> str:
    """Dotted path of the innermost module that produced `node` ('' if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    for pattern, repl in _PATH_CLEAN:
        path = pattern.sub(repl, path)
    path = re.sub(r"^L\.", "", path)
    path = re.sub(r"^(self|_fluxc_model)(\.|$)", "", path)  # Dynamo's name of the traced root module
    return path.lstrip(".")


def layer_number(path: str) -> int | None:
    """The last integer component of a module path ('model.layers.7.self_attn' -> 7)."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", path)
    return int(numbers[-1]) if numbers else None
