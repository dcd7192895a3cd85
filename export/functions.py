"""Readable graphs: the nodes translating each miss op become one call of an ONNX local function.

After export, nodes carry the FX node they came from (`namespace` metadata). Each group from a
miss op becomes a function in domain "miss", named per variant (MissLinear for balance/mini,
BatLinear for bat, StackedMissLinear for adapter stacks) with the layer as its overload, and the
graph calls it once per adapted Linear. Small integer constants used only by the group move
inside as Constant nodes. A group whose nodes are interleaved with outside consumers is left
inline (never reordered). Works on the onnx_ir model torch.onnx.export returns, in place.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["group_into_functions", "DOMAIN"]

DOMAIN = "miss"
_FUNCTION_NAMES = {"miss.linear.default": "MissLinear", "miss.bat_linear.default": "BatLinear",
                   "miss.stacked_linear.default": "StackedMissLinear"}
_SMALL_CONSTANT = 64  # elements


def _function_name(node: ir.Node) -> str | None:
    innermost = node.metadata_props.get("namespace", "").rsplit("/", 1)[-1]  # "linear: miss.linear.default"
    return next((name for target, name in _FUNCTION_NAMES.items() if innermost.endswith(target)), None)


def _layer_name(namespace: str) -> str:
    # ": Model/model: ...LlamaModel/.../model.layers.0.self_attn.q_proj: ...MissLinear/linear: miss.linear.default"
    scopes = [part.split(":")[0].strip() for part in namespace.split("/")[:-1]]
    return next((scope for scope in reversed(scopes) if scope), "layer")


def group_into_functions(model: ir.Model) -> int:
    """Rewrite `model` in place; returns how many groups became function calls."""
    groups: dict[str, list[ir.Node]] = {}
    names: dict[str, str] = {}
    for node in model.graph:
        name = _function_name(node)
        if name is not None:
            namespace = node.metadata_props["namespace"]
            groups.setdefault(namespace, []).append(node)
            names[namespace] = name
    position = {node: index for index, node in enumerate(model.graph)}
    made = sum(_make_function(model, names[namespace], _layer_name(namespace), members, position)
               for namespace, members in groups.items())
    if made:
        model.opset_imports[DOMAIN] = 1
    return made


def _interleaved(members: list[ir.Node], position: dict[ir.Node, int]) -> bool:
    """Whether a node outside the group reads a group value before the group's last node."""
    inside, last = set(members), position[members[-1]]
    return any(user not in inside and position.get(user, last) < last
               for node in members for value in node.outputs for user, _ in value.uses())


def _small_private_constant(value: ir.Value, inside: set[ir.Node]) -> bool:
    tensor = value.const_value
    return (value.is_initializer() and not value.is_graph_input() and tensor is not None
            and tensor.dtype == ir.DataType.INT64 and tensor.size <= _SMALL_CONSTANT
            and all(user in inside for user, _ in value.uses()))


def _make_function(model: ir.Model, name: str, overload: str, members: list[ir.Node],
                   position: dict[ir.Node, int]) -> bool:
    """Move `members` into function `name`/`overload` and call it where the group's last node was."""
    if _interleaved(members, position):
        return False
    graph, inside = model.graph, set(members)
    outer: list[ir.Value] = []  # values from outside the group, in first-use order
    for node in members:
        for value in node.inputs:
            if value is not None and value.producer() not in inside and value not in outer:
                outer.append(value)
    constants = [value for value in outer if _small_private_constant(value, inside)]
    inputs = [value for value in outer if value not in constants]
    outputs = [value for node in members for value in node.outputs
               if value.is_graph_output() or any(user not in inside for user, _ in value.uses())]

    call = ir.Node(DOMAIN, name, inputs, overload=overload, num_outputs=len(outputs), name=f"{overload}.{name}")
    graph.insert_after(members[-1], call)
    position[call] = position[members[-1]]  # where later groups look for readers of their values
    for old, new in zip(outputs, call.outputs, strict=True):
        new.name, new.type, new.shape = old.name, old.type, old.shape
        for user, index in list(old.uses()):
            if user not in inside:
                user.replace_input_with(index, new)
        for index, graph_output in enumerate(graph.outputs):
            if graph_output is old:
                graph.outputs[index] = new

    inner = {value: ir.Value(name=value.name, type=value.type, shape=value.shape) for value in outer}
    constant_nodes = [ir.Node("", "Constant", [], [ir.AttrTensor("value", value.const_value)], outputs=[inner[value]])
                      for value in constants]
    for node in members:
        for index, value in enumerate(node.inputs):
            if value in inner:
                node.replace_input_with(index, inner[value])
        node.metadata_props.clear()
    graph.remove(members)
    for value in constants:
        graph.initializers.pop(value.name)
    body = ir.Graph([inner[value] for value in inputs], outputs, nodes=[*constant_nodes, *members],
                    opset_imports={domain: version for domain, version in model.opset_imports.items() if domain != DOMAIN},
                    name=f"{overload}.{name}")
    function = ir.Function(DOMAIN, name, overload, graph=body, attributes=[])
    model.functions[function.identifier()] = function
    return True
