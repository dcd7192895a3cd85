"""miss_backend: Inductor with the MiSS pass (pre-grad) and the MiSS lowerings.

    compiled = torch.compile(model, backend=miss_backend)            # or backend="miss"
    compiled = torch.compile(model, backend=make_backend(merge=True))  # frozen adapters folded into W
    compiled = torch.compile(model, backend="miss", mode="max-autotune")  # modes and options as Inductor's

The backend rewrites the Dynamo graph (and the bodies of its higher-order ops) before handing it to
Inductor, so every compile reports what it did, and the pass runs once per graph. Inductor's FX
graph cache and AOTAutograd's cache must still know which version of the pass, the ops and their
lowerings built a graph: Inductor's pre-grad custom pass slot holds a CustomGraphPass that only
carries the pass's uuid, a hash of every module of this package (the pass, ops and lowerings call
reference.py, config.py, ...), so a warm cache never serves code built from other sources.

merge=True folds frozen blocks into W under Inductor's freezing: blocks, base weights and every
other parameter the graph reads become compile-time constants. An in-place change afterwards
(load_adapter, `copy_` under no_grad, an optimizer step) is caught by their version counters, and a
new storage (`p.data = t`) by its address, on the next call, which raises with the fix instead of
serving the old weights (about 0.3 us per frozen parameter and call). Writes into `p.data`
(`p.data.copy_(new)`) bypass version counters and cannot be seen: recompile by hand after them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import graph_breaks, lowering, ops, passes, reference  # noqa: F401  (lowering and ops register with torch)
from .pass_forms import attribute, is_call
from .passes import PassReport, rewrite_miss_linears

__all__ = ["miss_backend", "make_backend", "inductor_options", "MissGraphPass", "source_files", "frozen_parameters",
           "FrozenCheck"]

logger = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent


def source_files(package_dir: Path = _PACKAGE_DIR) -> tuple[str, ...]:
    """Every module of the package, sorted: all that the pass, the ops and the lowerings may import,
    today or after a module is split in two."""
    return tuple(sorted(str(path) for path in package_dir.rglob("*.py")))


class MissGraphPass(CustomGraphPass):
    def __init__(self, merge: bool = False) -> None:
        self.merge = merge
        self.reports: list[PassReport] = []

    def __call__(self, graph: fx.Graph) -> None:
        # As a pre-grad pass of its own (without the backend); idempotent.
        rewrite_miss_linears(graph, merge=self.merge)

    def rewrite(self, gm: fx.GraphModule) -> PassReport:
        report = rewrite_miss_linears(gm.graph, merge=self.merge)
        gm.recompile()
        self.reports.append(report)
        logger.info("%s", report)
        return report

    def uuid(self) -> bytes:
        return hashlib.sha256(_sources_digest(source_files()) + f"merge={self.merge}".encode()).digest()


@functools.cache
def _sources_digest(paths: tuple[str, ...]) -> bytes:
    return get_hash_for_files(paths)


# Read when the package is imported, once: what runs is what was imported, even if the files
# change later (as Inductor keys its own code).
_sources_digest(source_files())


class _CacheKey(CustomGraphPass):
    """Inductor's pre-grad slot: rewrites nothing (the backend already did), only puts the pass's
    uuid into the FX graph and AOTAutograd cache keys."""

    def __init__(self, graph_pass: MissGraphPass) -> None:
        self.graph_pass = graph_pass

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return self.graph_pass.uuid()


def inductor_options(mode: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Inductor config patches for torch.compile's `mode` and `options`, mapped and checked as stock
    Inductor does (torch._inductor.list_mode_options; an unknown mode or option raises RuntimeError)."""
    if options and "pre_grad_custom_pass" in {key.replace("-", "_") for key in options}:
        raise ValueError(
            "miss_backend: options={'pre_grad_custom_pass': ...} would replace the slot the backend uses for "
            "its cache key (the MiSS pass runs before Inductor). Run your own pass as a post_grad_custom_pre_pass "
            "or post_grad_custom_post_pass instead."
        )
    if mode is not None and options is not None:  # torch.compile refuses the pair before us; a direct call too
        raise RuntimeError("Either mode or options can be specified, but both can't be specified at the same time.")
    return dict(torch._TorchCompileInductorWrapper(mode, options, dynamic=None).config)


@dataclass
class _Warnings:
    """What this backend's warnings said, which layers it adapted, and whether Dynamo ran checkpointed
    regions eagerly, since the last torch.compiler.reset(); and the graph breaks it has read."""

    said: set[tuple] = field(default_factory=set)
    adapted: set[str] = field(default_factory=set)
    breaks: graph_breaks.BreakLog = field(default_factory=graph_breaks.BreakLog)

    def clear(self) -> None:
        self.said.clear()
        self.adapted.clear()

    @property
    def eager_checkpoints(self) -> bool:
        """Whether _warn_if_checkpoints_ran_eagerly said so since the last reset."""
        return any(key[0] == "checkpoint" for key in self.said)

    def warn_once(self, key: tuple, message: str, *args: object) -> None:
        if key not in self.said:
            self.said.add(key)
            logger.warning(message, *args)


def _warn_if_not_adapted(report: PassReport, gm: fx.GraphModule, state: _Warnings) -> None:
    """WARNING, once per layer (or per graph) until torch.compiler.reset(), when the pass left MiSS
    layers untouched or found none in a graph of Linears; a full rewrite, a graph without Linears and
    a graph of plain Linears after one this backend adapted (the LM head split off by a graph break,
    as gradient checkpointing makes) stay quiet; layers adapted before and plain now (adapters
    disabled) warn. So does a graph of plain Linears after Dynamo ran checkpointed regions eagerly
    (_warn_if_checkpoints_ran_eagerly said why). The price: a model without adapters compiled after
    either, by the same backend and without a reset, is not warned about."""
    warned = state.said
    state.adapted.update(item.layer for item in report.rewritten)
    untouched = [(layer, why) for layer, why in report.skipped if ("untouched", layer, why) not in warned]
    if untouched:
        warned.update(("untouched", layer, why) for layer, why in untouched)
        named = "; ".join(f"{layer} ({why})" for layer, why in untouched[:3])
        more = f"; and {len(untouched) - 3} more" if len(untouched) > 3 else ""
        logger.warning(
            "miss_backend: %d MiSS layer(s) left untouched (they run as they are, under plain Inductor: right "
            "numbers, not the fast path): %s%s. miss_compile.explain(model, *inputs) lists every layer with its "
            "reason.", len(untouched), named, more)
    if report.rewritten or report.skipped or state.eager_checkpoints:
        return
    graphs = [module.graph for module in gm.modules() if isinstance(module, fx.GraphModule)]  # with HOP bodies
    linears = sorted({passes.layer_name(node) for graph in graphs for node in graph.nodes if _is_linear(node)})
    if state.adapted and state.adapted.isdisjoint(linears):
        return
    if linears and ("none", tuple(linears)) not in warned:
        warned.add(("none", tuple(linears)))
        logger.warning(
            "miss_backend: no MiSS layer among the %d Linear layer(s) of this graph (%s%s): it compiles as plain "
            "Inductor. A model without MiSS adapters, or with them disabled or merged, has none; "
            "miss_compile.explain(model, *inputs) shows what the pass saw.",
            len(linears), ", ".join(linears[:3]), ", ..." if len(linears) > 3 else "")


def _warn_if_checkpoints_ran_eagerly(state: _Warnings) -> None:
    """WARNING, once until torch.compiler.reset(), when a graph break recorded since this backend last
    looked fell inside an activation checkpoint: Dynamo then runs the whole checkpointed region eagerly,
    and no graph of it reaches a backend, so the MiSS layers inside are neither compiled nor rewritten
    with nothing else to say so. A reset Dynamo did not tell this backend about (it tells only backends
    of compiles made since the previous reset) is seen in the record and starts afresh too."""
    fresh, reset = state.breaks.fresh()
    if reset:
        state.clear()
    side_effects = [item for item in fresh if graph_breaks.side_effect_in_checkpoint(item)]
    others = [item for item in fresh
              if graph_breaks.inside_checkpoint(item) and not graph_breaks.side_effect_in_checkpoint(item)]
    if side_effects:
        state.warn_once(
            ("checkpoint", "side effects"),
            "miss_backend: Dynamo ran activation-checkpointed regions eagerly because their forward changes "
            "Python state (gradient checkpointing on transformers >= 5.25 does: its attention forward sets a "
            "context variable), so the MiSS layers inside are neither compiled nor rewritten: right numbers, "
            "eager speed. Set torch._dynamo.config.%s = True before compiling (and torch.compiler.reset() if "
            "this model was compiled already): Dynamo then traces those regions and does not re-run Python "
            "side effects of checkpointed forwards in the backward's recompute (a process-wide setting; "
            "transformers' set-and-reset needs no re-run).", graph_breaks.CHECKPOINT_SIDE_EFFECTS)
    if others:
        state.warn_once(
            ("checkpoint", "break"),
            "miss_backend: Dynamo ran activation-checkpointed regions eagerly: a graph break inside one (%s) "
            "makes it run the whole region eagerly, so the MiSS layers inside are neither compiled nor rewritten: "
            "right numbers, eager speed. transformers 5.25 breaks there when output_hidden_states or "
            "output_attentions is asked for under gradient checkpointing (its output capture reads a "
            "ContextVar): leave those off in training steps. TORCH_LOGS=graph_breaks shows every break.",
            graph_breaks.describe(others[0]))


def _is_linear(node: fx.Node) -> bool:
    return is_call(node, (F.linear, torch._C._nn.linear))


def make_backend(merge: bool = False, config_patches: dict[str, Any] | None = None) -> Callable:
    """A torch.compile backend. merge=True folds frozen adapters into W and turns on Inductor's
    freezing, so inference costs the base model; blocks (and every parameter) are then compile-time
    constants: after an in-place change the compiled model raises until recompiled
    (torch.compiler.reset()). Freezing must also be on while Dynamo traces (it decides there whether
    parameters are constants): run the first call under `torch.no_grad()` and
    `torch._inductor.config.patch(freezing=True)`; the backend warns when that was not the case.

    torch.compile's `mode` and `options` apply as for stock Inductor, over `config_patches`."""
    graph_pass = MissGraphPass(merge=merge)
    patches = {"pre_grad_custom_pass": _CacheKey(graph_pass)}
    if merge:
        patches["freezing"] = True
    patches.update(config_patches or {})

    warnings = _Warnings()

    def backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *, mode: str | None = None,
                options: dict[str, Any] | None = None) -> Callable:
        # torch.compile(..., mode=, options=) reach a custom backend as these keywords (when not default).
        all_patches = {**patches, **inductor_options(mode, options)}
        report = graph_pass.rewrite(gm)
        _warn_if_checkpoints_ran_eagerly(warnings)
        _warn_if_not_adapted(report, gm, warnings)
        if merge and any(item.merged for item in report.rewritten):
            _warn_unless_parameters_are_constants(backend)
        # Freezing from make_backend, options= or the global config: parameters are constants from here on.
        frozen = frozen_parameters(gm) if all_patches.get("freezing", torch._inductor.config.freezing) else []
        compiled = compile_fx(gm, example_inputs, config_patches=all_patches)
        return _checked(compiled, FrozenCheck(frozen)) if frozen else compiled

    backend.graph_pass = graph_pass  # reports of every graph compiled, for tests and explain()
    backend.reset = warnings.clear  # torch.compiler.reset() calls it: a fresh start warns again
    backend.__name__ = "miss_backend" if not merge else "miss_backend_merged"
    return backend


def _warn_unless_parameters_are_constants(backend: Callable) -> None:
    """Dynamo hands parameters to a backend as constants only when Inductor's freezing is on, and
    grad off, while it traces; otherwise they arrive as inputs and W + dW is rebuilt on every call
    (right numbers, but a pass over W per call: 2.5x the base GEMM at one token, 2048x2048)."""
    if torch._inductor.config.freezing and not torch.is_grad_enabled():
        return
    if getattr(backend, "_warned_inputs", False):
        return
    backend._warned_inputs = True
    logger.warning(
        "make_backend(merge=True): the model was traced with %s, so W + dW is recomputed on every "
        "call instead of once. Trace and run under torch.no_grad() with freezing on: "
        "`with torch.no_grad(), torch._inductor.config.patch(freezing=True): compiled(...)` "
        "(or set torch._inductor.config.freezing = True before the first call).",
        "gradients enabled" if torch.is_grad_enabled() else "torch._inductor.config.freezing off",
    )


# --- frozen constants: never serve stale ones


def frozen_parameters(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """(what, tensor) for the tensors freezing makes constants: those that merged layers fold first
    (named by layer), then every other parameter or buffer the graph reads through get_attr (freezing
    folds unmutated buffers too: a stack, a mask). Graph inputs (placeholders) are read on every call;
    a graph that writes a buffer itself is no false alarm, since the check records after each call."""
    frozen: dict[int, tuple[str, torch.Tensor]] = {}
    graphs = [module for module in gm.modules() if isinstance(module, fx.GraphModule)]  # with HOP bodies
    for module in graphs:
        for node in module.graph.find_nodes(op="call_function", target=reference.fold_weight):
            layer = _folded_layer(node)
            weight, blocks = node.args[0], node.args[1]
            for role, arg in [("base weight", weight), *[("block", block) for block in blocks]]:
                for tensor in _read_parameters(module, arg):
                    what = f"the {role} {tuple(tensor.shape)} of merged layer {layer!r}"
                    frozen.setdefault(id(tensor), (what, tensor))
    for module in graphs:
        for node in module.graph.find_nodes(op="get_attr"):
            tensor = attribute(module, node.target)
            if isinstance(tensor, torch.Tensor):
                kind = "parameter" if isinstance(tensor, nn.Parameter) else "buffer"
                what = f"{kind} {_readable(node.target)} {tuple(tensor.shape)}"
                frozen.setdefault(id(tensor), (what, tensor))
    return list(frozen.values())


def _folded_layer(fold: fx.Node) -> str:
    """The layer a fold belongs to: the first node downstream that carries the layer's module stack
    (the pass gives it to the node that replaces the layer's output)."""
    node = fold
    for _ in range(4):
        if node.meta.get("nn_module_stack") or not node.users:
            break
        node = next(iter(node.users))
    return _readable(passes.layer_name(node))


def _read_parameters(module: fx.GraphModule, arg: object) -> list[torch.Tensor]:
    """The parameters behind `arg`, through views such as Conv1D's weight.t()."""
    found, pending = [], [arg]
    while pending:
        node = pending.pop()
        if not isinstance(node, fx.Node):
            continue
        if node.op == "get_attr":
            tensor = attribute(module, node.target)
            if isinstance(tensor, torch.Tensor):
                found.append(tensor)
        else:
            pending.extend(node.all_input_nodes)
    return found


def _readable(name: str) -> str:
    """A parameter or layer as the user's model names it: without Dynamo's source prefixes (a model
    traced under freezing is Dynamo's args[0], not self)."""
    name = re.sub(r"^L\['args'\]\[0\]\.", "", name)
    for prefix in ("L__args___0_", "L__self___", "L_self_"):
        name = name.removeprefix(prefix)
    name = re.sub(r"_*dict_+modules_+", ".", name)  # attribute names of modules reached through __dict__
    return re.sub(r"__+", ".", name).strip("._")


class FrozenCheck:
    """Version counter and storage of every frozen parameter; a list compare per call.

    Compared with what they were when the graph last returned, not when it was compiled: a graph may
    write a parameter itself (PEFT's bat forward reassigns `block.data` to the same values on CPU);
    only writes between calls make its constants stale."""

    def __init__(self, frozen: list[tuple[str, torch.Tensor]]) -> None:
        self.names = [what for what, _ in frozen]
        self.tensors = [tensor for _, tensor in frozen]
        self.record()

    def record(self) -> None:
        self.versions = [tensor._version for tensor in self.tensors]
        self.storages = [tensor.data_ptr() for tensor in self.tensors]

    def __call__(self) -> None:
        if ([tensor._version for tensor in self.tensors] != self.versions
                or [tensor.data_ptr() for tensor in self.tensors] != self.storages):
            self._raise()

    def _raise(self) -> None:
        changed = [what for what, tensor, version, storage in
                   zip(self.names, self.tensors, self.versions, self.storages, strict=True)
                   if tensor._version != version or tensor.data_ptr() != storage]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise RuntimeError(
            f"miss_backend: {changed[0]}{more} changed in place after this graph was compiled with it as a "
            "compile-time constant (Inductor's freezing was on: make_backend(merge=True) folds blocks into W "
            "under it, and options={'freezing': True} or torch._inductor.config.freezing make every parameter "
            "a constant), so the graph would serve the old weights. Recompile: torch.compiler.reset(), then "
            "call the compiled model again under torch.no_grad() and freezing. To swap adapters in place "
            "without recompiling, compile with the unmerged miss_backend and freezing off."
        )


def _checked(compiled: Callable, check: FrozenCheck) -> Callable:
    """`compiled`, with `check` before every call. Arguments pass through as they come: Inductor's
    result may carry a `_boxed_call` attribute copied by functools.wraps from a boxed inner function
    while itself taking *args (Dynamo calls it so), so its calling convention is not ours to guess."""

    def run(*args: Any, **kwargs: Any) -> Any:
        check()
        out = compiled(*args, **kwargs)
        check.record()
        return out

    run.__dict__.update(getattr(compiled, "__dict__", {}))  # whatever its callers read off it
    return run


# backend="miss" resolves through the `torch_dynamo_backends` entry point (pyproject.toml).
miss_backend = make_backend()
