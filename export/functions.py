"""Readable graphs: the nodes translating each miss op become one call of an ONNX local function.

After export, nodes carry the FX node they came from (`namespace` metadata). Each group from a
miss op becomes a FunctionProto in domain "miss", named per variant (MissLinear for balance/mini,
BatLinear for bat, StackedMissLinear for adapter stacks) with the layer as its overload, and the
graph calls it once per adapted Linear. Small integer constants used only by the group move
inside as Constant nodes. A group whose nodes are interleaved with outside consumers is left
inline (never reordered).
"""

from __future__ import annotations

import onnx
from onnx import helper

__all__ = ["group_into_functions", "DOMAIN"]

DOMAIN = "miss"
_FUNCTION_NAMES = {"miss.linear.default": "MissLinear", "miss.bat_linear.default": "BatLinear",
                   "miss.stacked_linear.default": "StackedMissLinear"}
_SMALL_CONSTANT = 64  # elements


def _group_key(node: onnx.NodeProto) -> tuple[str, str] | None:
    metadata = {prop.key: prop.value for prop in node.metadata_props}
    namespace = metadata.get("namespace", "")
    innermost = namespace.rsplit("/", 1)[-1]  # "linear: miss.linear.default"
    for target, name in _FUNCTION_NAMES.items():
        if innermost.endswith(target):
            return namespace, name
    return None


def _layer_name(namespace: str) -> str:
    # ": Model/model: ...LlamaModel/.../model.layers.0.self_attn.q_proj: ...MissLinear/linear: miss.linear.default"
    scopes = [part.split(":")[0].strip() for part in namespace.split("/")[:-1]]
    return next((scope for scope in reversed(scopes) if scope), "layer")


def group_into_functions(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place; returns how many groups became function calls."""
    graph = model.graph
    groups: dict[str, list[int]] = {}
    names: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        key = _group_key(node)
        if key is not None:
            groups.setdefault(key[0], []).append(index)
            names[key[0]] = key[1]
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {value.name for value in graph.input}
    graph_outputs = {value.name for value in graph.output}
    replacements: dict[int, onnx.NodeProto | None] = {}
    functions = []
    for namespace, indices in groups.items():
        members = set(indices)
        nodes = [graph.node[i] for i in indices]
        produced = {out for node in nodes for out in node.output if out}
        outside_uses = {name: i for i, node in enumerate(graph.node) if i not in members for name in node.input}
        if any(name in outside_uses and outside_uses[name] < indices[-1] for name in produced):
            continue  # interleaved: leave inline
        inputs, constants = [], []
        for node in nodes:
            for name in node.input:
                if not name or name in produced or name in inputs or name in [c.output[0] for c in constants]:
                    continue
                init = initializers.get(name)
                used_elsewhere = name in outside_uses or name in graph_inputs
                if init is not None and not used_elsewhere and init.data_type == onnx.TensorProto.INT64 \
                        and _numel(init) <= _SMALL_CONSTANT:
                    constants.append(helper.make_node("Constant", [], [name], value=init))
                else:
                    inputs.append(name)
        outputs = [name for name in dict.fromkeys(out for node in nodes for out in node.output)
                   if name in outside_uses or name in graph_outputs]
        overload = _layer_name(namespace)
        body = [_strip_metadata(node) for node in constants + nodes]
        functions.append(helper.make_function(DOMAIN, names[namespace], inputs, outputs, body,
                                              list(model.opset_import), overload=overload))
        call = helper.make_node(names[namespace], inputs, outputs, domain=DOMAIN, overload=overload,
                                name=f"{overload}.{names[namespace]}")
        for i in indices[:-1]:
            replacements[i] = None
        replacements[indices[-1]] = call
    if not functions:
        return 0
    kept = [replacements.get(i, node) for i, node in enumerate(graph.node)]
    del graph.node[:]
    graph.node.extend(node for node in kept if node is not None)
    used = {name for node in graph.node for name in node.input} | graph_inputs
    for function in functions:
        used |= set(function.input)
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    model.functions.extend(functions)
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(functions)


def _numel(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count


def _strip_metadata(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.metadata_props[:]
    return copy
