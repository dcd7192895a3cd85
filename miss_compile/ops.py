"""The MiSS custom ops (`torch.ops.miss.*`): eager kernels, fake kernels and autograd, side by side.

miss::linear          y = x @ W.T + b + sum_k S(a_k) @ E(D_k)     balance and mini (E repeats a mini block)
miss::bat_linear      y = x @ fold(W, D_1, ..., D_n).T + b         bat, adapters folded in order
miss::stacked_linear  y[b] = x[b] @ W.T + b + S(x[b]) @ stack[id_b]  one balance/mini block per batch row,
                      inference only (gradient for x, none for the stack)

`a_k` is the adapter input of adapter k: x cast to D_k's dtype, then dropout (both outside the op,
so the op stays deterministic and dropout's own autograd keeps its mask). It may be x itself, or x
already zero-padded to a multiple of r (PEFT pads). S(a_k) is summed in a_k's dtype and cast to
D_k's before the GEMM (a no-op unless autocast lowered D_k). The math is reference.py's; the backward
formulas are written here so balance/mini save only the chunk sums S(a_k) [tokens, r], never x.

Under torch.autocast each op computes what PEFT's eager code computes there (see the end of the file).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fold_rule, reference

__all__ = ["miss_linear", "bat_linear", "stacked_linear", "bat_forward", "reads_x", "chunk_sum_for", "stacked_product"]


def _check_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    torch._check(weight.dim() == 2, lambda: f"miss: weight must be [out, in], got {tuple(weight.shape)}")
    torch._check(
        x.shape[-1] == weight.shape[1],
        lambda: f"miss: x has {x.shape[-1]} features, weight {tuple(weight.shape)} expects {weight.shape[1]}",
    )
    torch._check(
        bias is None or tuple(bias.shape) == (weight.shape[0],),
        lambda: f"miss: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}",
    )


def _check_miss_linear(x: Tensor, adapter_inputs: list[Tensor], weight: Tensor, bias: Tensor | None,
                       blocks: list[Tensor]) -> None:
    _check_linear(x, weight, bias)
    torch._check(len(adapter_inputs) == len(blocks), lambda: "miss.linear: one adapter input per block")
    out_features = weight.shape[0]
    for a, block in zip(adapter_inputs, blocks, strict=True):
        shape, a_shape = tuple(block.shape), tuple(a.shape)
        torch._check(block.dim() == 2, lambda: f"miss.linear: block must be [r, out] or [r, mini_r], got {shape}")  # noqa: B023
        torch._check(
            out_features % block.shape[1] == 0,
            lambda: f"miss.linear: block {shape} does not tile out_features={out_features}",  # noqa: B023
        )
        torch._check(
            a.shape[:-1] == x.shape[:-1] and a.shape[-1] >= x.shape[-1],
            lambda: f"miss.linear: adapter input {a_shape} does not match x {tuple(x.shape)}",  # noqa: B023
        )


def reads_x(x: Tensor, adapter_inputs: list[Tensor], weight: Tensor, blocks: list[Tensor]) -> list[bool]:
    """Which adapters read x itself (no dropout, no cast) with x's dtype everywhere.

    For those, x @ W.T + S(x) @ D is x @ (W + dW).T, and the gradient they send to x is folded
    into the base one: grad @ (W + dW), one GEMM instead of two plus a tile.
    """
    return [a is x and block.dtype == weight.dtype == x.dtype for a, block in zip(adapter_inputs, blocks, strict=True)]


def chunk_sum_for(adapter_input: Tensor, block: Tensor) -> Tensor:
    """S(a) in a's dtype, then in the block's: PEFT's matmul under autocast sums x in the adapter's
    dtype and casts the sum, not x, to the autocast dtype."""
    chunk_sum = reference.chunk_sum(adapter_input, block.shape[0])
    return chunk_sum if chunk_sum.dtype == block.dtype else chunk_sum.to(block.dtype)  # .to() would alias the sum


def _expanded(block: Tensor, out_features: int) -> Tensor:
    return reference.expand_block(block, reference.block_variant(block.shape, out_features), out_features)


# --- miss::linear (balance, mini)


@torch.library.custom_op("miss::linear", mutates_args=())
def miss_linear(x: Tensor, adapter_inputs: list[Tensor], weight: Tensor, bias: Tensor | None,
                blocks: list[Tensor]) -> Tensor:
    _check_miss_linear(x, adapter_inputs, weight, bias, blocks)
    result = F.linear(x, weight, bias)
    for a, block in zip(adapter_inputs, blocks, strict=True):
        result = result + chunk_sum_for(a, block) @ _expanded(block, weight.shape[0])
    return result.to(x.dtype)


@miss_linear.register_fake
def _(x: Tensor, adapter_inputs: list[Tensor], weight: Tensor, bias: Tensor | None, blocks: list[Tensor]) -> Tensor:
    _check_miss_linear(x, adapter_inputs, weight, bias, blocks)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, adapter_inputs, weight, bias, blocks = inputs
    chunk_sums = [
        chunk_sum_for(a, block) if block.requires_grad else None
        for a, block in zip(adapter_inputs, blocks, strict=True)
    ]
    ctx.adapter_widths = [a.shape[-1] for a in adapter_inputs]
    ctx.adapter_dtypes = [a.dtype for a in adapter_inputs]
    # Adapters reading x fold into x's gradient where fold_rule says so (else the tile of grad @ D.T).
    fold = fold_rule.folds_for(x, weight, backward=True)
    ctx.reads_x = [reads and fold for reads in reads_x(x, adapter_inputs, weight, blocks)]
    ctx.has_bias = bias is not None
    # x itself is saved only if the base weight trains (not the MiSS case).
    saved_x = x if weight.requires_grad else None
    ctx.save_for_backward(saved_x, weight, *blocks, *[s for s in chunk_sums if s is not None])
    ctx.block_has_sum = [s is not None for s in chunk_sums]
    ctx.n_blocks = len(blocks)


def _tile(grad_chunk_sum: Tensor, width: int) -> Tensor:
    """Adjoint of the chunk sum: d a[..., i] = d S[..., i % r], for a of `width` features."""
    r = grad_chunk_sum.shape[-1]
    repeats = -(-width // r)
    return grad_chunk_sum.repeat(*([1] * (grad_chunk_sum.dim() - 1)), repeats)[..., :width]


def _fold_mini(grad_expanded: Tensor, block: Tensor) -> Tensor:
    r, mini_r = block.shape
    return grad_expanded.reshape(r, -1, mini_r).sum(1)


def _linear_backward(ctx: Any, grad: Tensor) -> tuple:
    saved_x, weight, *rest = ctx.saved_tensors
    blocks, sums = rest[: ctx.n_blocks], iter(rest[ctx.n_blocks :])
    out_features = weight.shape[0]
    grad_x = None
    if ctx.needs_input_grad[0]:
        folded = [block for block, reads in zip(blocks, ctx.reads_x, strict=True) if reads]
        variants = [reference.block_variant(block.shape, out_features) for block in folded]
        grad_weight_for_x = reference.fold_weight(weight, folded, variants)
        grad_x = grad @ grad_weight_for_x.to(grad.dtype)
    grad_weight = grad_bias = None
    if saved_x is not None:
        grad_weight = (grad.reshape(-1, out_features).t() @ saved_x.reshape(-1, saved_x.shape[-1])).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, out_features).sum(0)
    grad_inputs, grad_blocks = [], []
    for block, width, dtype, has_sum, folded_into_x in zip(blocks, ctx.adapter_widths, ctx.adapter_dtypes,
                                                           ctx.block_has_sum, ctx.reads_x, strict=True):
        expanded = _expanded(block, out_features)
        grad_adapter = grad.to(reference.compute_dtype(grad.dtype, block.dtype))
        if folded_into_x and ctx.needs_input_grad[0]:
            grad_inputs.append(None)  # already in grad_x (the input is x itself)
        else:
            grad_inputs.append(_tile(grad_adapter @ expanded.to(grad_adapter.dtype).t(), width).to(dtype))
        if has_sum:
            chunk_sum = next(sums)
            grad_expanded = chunk_sum.reshape(-1, block.shape[0]).t().to(grad_adapter.dtype) @ grad_adapter.reshape(
                -1, out_features
            )
            if reference.block_variant(block.shape, out_features) == "mini":
                grad_expanded = _fold_mini(grad_expanded, block)
            grad_blocks.append(grad_expanded.to(block.dtype))
        else:
            grad_blocks.append(None)
    return grad_x, grad_inputs, grad_weight, grad_bias, grad_blocks


miss_linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# --- miss::bat_linear


def _check_bat_linear(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: list[Tensor]) -> None:
    _check_linear(x, weight, bias)
    out_features, in_features = weight.shape
    for block in blocks:
        shape = tuple(block.shape)
        torch._check(block.dim() == 3 and block.shape[1] == block.shape[2],
                     lambda: f"miss.bat_linear: block must be [out/r, r, r], got {shape}")  # noqa: B023
        r = block.shape[-1]
        torch._check(
            block.shape[0] * r == out_features and in_features % r == 0,
            lambda: f"miss.bat_linear: block {shape} does not tile weight {tuple(weight.shape)}",  # noqa: B023
        )


def _dtypes(weight: Tensor, blocks: list[Tensor]) -> list[torch.dtype]:
    return [weight.dtype, *[block.dtype for block in blocks]]


def _bat_folds(weight: Tensor, blocks: list[Tensor]) -> list[Tensor]:
    """[W_0 = W, W_1, ..., W_n] in fp32 (or wider): W_k+1 = W_k + delta(W_k, D_k)."""
    folds = [weight.to(reference.accumulate_dtype(*_dtypes(weight, blocks)))]
    for block in blocks:
        folds.append(folds[-1] + reference.delta_weight(folds[-1], block, "bat"))
    return folds


def bat_forward(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: list[Tensor]) -> Tensor:
    """miss::bat_linear's forward, eager and as Inductor's decomposition (lowering.py): the blocks
    folded into W in fp32 or wider, then one linear in the promoted dtype of W and the blocks."""
    dtype = reference.compute_dtype(*_dtypes(weight, blocks))
    folded = _bat_folds(weight, blocks)[-1].to(dtype)
    return F.linear(x.to(dtype), folded, None if bias is None else bias.to(dtype)).to(x.dtype)


@torch.library.custom_op("miss::bat_linear", mutates_args=())
def bat_linear(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: list[Tensor]) -> Tensor:
    _check_bat_linear(x, weight, bias, blocks)
    return bat_forward(x, weight, bias, blocks)


@bat_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: list[Tensor]) -> Tensor:
    _check_bat_linear(x, weight, bias, blocks)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _bat_setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, bias, blocks = inputs
    ctx.has_bias = bias is not None
    ctx.x_dtype = x.dtype
    ctx.n_blocks = len(blocks)
    # The folded weight is recomputed in backward rather than kept alive (it is as big as W).
    ctx.save_for_backward(x, weight, *blocks)


def _bat_backward(ctx: Any, grad: Tensor) -> tuple:
    x, weight, *blocks = ctx.saved_tensors
    out_features, in_features = weight.shape
    dtype = reference.compute_dtype(*_dtypes(weight, blocks))
    folds = _bat_folds(weight, blocks)
    grad_c = grad.to(dtype).reshape(-1, out_features)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad_c @ folds[-1].to(dtype)).reshape(x.shape).to(ctx.x_dtype)
    grad_bias = grad_c.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    if not (ctx.needs_input_grad[1] or any(ctx.needs_input_grad[3])):
        return grad_x, None, grad_bias, [None] * len(blocks)
    # dL/dW_n, then back through W_k+1,pq = W_k,pq (I + D_p) + D_p for k = n-1 .. 0.
    grad_folded = grad_c.t().to(folds[-1].dtype) @ x.reshape(-1, in_features).to(folds[-1].dtype)
    grad_blocks: list[Tensor | None] = [None] * len(blocks)
    for k in reversed(range(len(blocks))):
        block = blocks[k]
        r = block.shape[-1]
        g = reference.to_bat_blocks(grad_folded, r)  # [out/r, in/r, r, r]
        w = reference.to_bat_blocks(folds[k], r)
        d = block.to(g.dtype)
        if ctx.needs_input_grad[3][k]:
            grad_blocks[k] = (w.transpose(-1, -2) @ g + g).sum(1).to(block.dtype)
        if k == 0 and not ctx.needs_input_grad[1]:
            break  # the frozen base weight needs no gradient: skip the last r x r GEMMs over W
        grad_folded = reference.from_bat_blocks(g + g @ d[:, None].transpose(-1, -2))
    grad_weight = grad_folded.to(weight.dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_weight, grad_bias, grad_blocks


bat_linear.register_autograd(_bat_backward, setup_context=_bat_setup_context)


# --- miss::stacked_linear (many balance/mini adapters, one per batch row)


def _check_stacked(x: Tensor, adapter_ids: Tensor, weight: Tensor, bias: Tensor | None, stack: Tensor) -> None:
    _check_linear(x, weight, bias)
    ids_shape, stack_shape = tuple(adapter_ids.shape), tuple(stack.shape)
    torch._check(x.dim() >= 2, lambda: f"miss.stacked_linear: x must be [batch, ..., in], got {tuple(x.shape)}")
    torch._check(
        adapter_ids.dim() == 1 and adapter_ids.shape[0] == x.shape[0],
        lambda: f"miss.stacked_linear: adapter_ids {ids_shape} must hold one id per batch row of x {tuple(x.shape)}",
    )
    torch._check(
        adapter_ids.dtype in (torch.int32, torch.int64),
        lambda: f"miss.stacked_linear: adapter_ids must be int64 or int32, got {adapter_ids.dtype}",
    )
    torch._check(
        stack.dim() == 3 and stack.shape[2] == weight.shape[0],
        lambda: f"miss.stacked_linear: stack must be [adapters, r, out={weight.shape[0]}], got {stack_shape}",
    )


def stacked_product(x: Tensor, adapter_ids: Tensor, stack: Tensor) -> Tensor:
    """S(x in the stack's dtype) @ stack[id of the row], row by row: [batch, ..., out] in the stack's dtype."""
    r, out_features = stack.shape[1:]
    tokens = math.prod(x.shape[1:-1])  # not -1: an empty batch has no size to infer
    chunk_sums = reference.chunk_sum(x.to(stack.dtype), r).reshape(x.shape[0], tokens, r)
    return torch.bmm(chunk_sums, stack[adapter_ids]).reshape(*x.shape[:-1], out_features)


@torch.library.custom_op("miss::stacked_linear", mutates_args=())
def stacked_linear(x: Tensor, adapter_ids: Tensor, weight: Tensor, bias: Tensor | None, stack: Tensor) -> Tensor:
    """Row b of x uses block stack[adapter_ids[b]]; negative ids count from the end, as in indexing
    (the stacks built by miss_compile.stacked keep a zero block last: id -1 is "no adapter")."""
    _check_stacked(x, adapter_ids, weight, bias, stack)
    n_adapters = stack.shape[0]
    if adapter_ids.numel() and not (adapter_ids.min() >= -n_adapters and adapter_ids.max() < n_adapters):
        raise IndexError(
            f"miss.stacked_linear: adapter_ids {adapter_ids.tolist()} out of range for a stack of {n_adapters} blocks"
        )
    return (F.linear(x, weight, bias) + stacked_product(x, adapter_ids, stack)).to(x.dtype)


@stacked_linear.register_fake
def _(x: Tensor, adapter_ids: Tensor, weight: Tensor, bias: Tensor | None, stack: Tensor) -> Tensor:
    _check_stacked(x, adapter_ids, weight, bias, stack)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _stacked_setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, adapter_ids, weight, bias, stack = inputs
    trains = [name for name, t in (("weight", weight), ("bias", bias), ("stack", stack))
              if t is not None and t.requires_grad]
    if trains:
        raise RuntimeError(
            f"miss.stacked_linear: {trains} require grad, but adapter stacks are for inference and have no "
            "gradient. Serving: run under torch.no_grad() or torch.inference_mode(), or freeze the base weights "
            "(requires_grad_(False)). Training: train each adapter on its own (set_active_adapters) and stack "
            "it afterwards"
        )
    ctx.save_for_backward(adapter_ids, weight, stack)
    ctx.in_features = x.shape[-1]
    ctx.x_dtype = x.dtype


def _stacked_backward(ctx: Any, grad: Tensor) -> tuple:
    """Gradient for x only (an upstream layer may train): grad @ W + tile(grad @ stack[id].T)."""
    adapter_ids, weight, stack = ctx.saved_tensors
    tokens = math.prod(grad.shape[1:-1])
    grad_adapter = grad.to(reference.compute_dtype(grad.dtype, stack.dtype)).reshape(grad.shape[0], tokens, stack.shape[2])
    grad_sums = torch.bmm(grad_adapter, stack[adapter_ids].to(grad_adapter.dtype).transpose(1, 2))
    grad_x = grad @ weight.to(grad.dtype) + _tile(grad_sums, ctx.in_features).reshape(*grad.shape[:-1], -1).to(grad.dtype)
    return grad_x.to(ctx.x_dtype), None, None, None, None


stacked_linear.register_autograd(_stacked_backward, setup_context=_stacked_setup_context)


# --- autocast: the dtypes eager code gets under torch.autocast
#
# PEFT's MissLinear under autocast: F.linear and the matmul S(a) @ D run in the autocast dtype, the
# chunk sum in the adapter input's dtype (S is cast, not x), the adds follow the operands, and the
# result is cast back to x's dtype. Without a rule of their own, an eager op's inner F.linear was
# autocast while a compiled graph ran the decomposition on uncast inputs (fp32, or mm of mixed
# dtypes). So, like an aten op in autocast's lower-precision list: cast x, weight, bias and blocks
# (floating, on the autocast device, not fp64) to the autocast dtype, run the op with autocast off
# (the kernel runs above autograd: the casts are differentiated), and return x's dtype as PEFT does. Adapter inputs keep their dtype (their sums are cast inside the op). Bat folds in fp32
# from the cast W and D (PEFT rounds only W_pq @ D_p to the autocast dtype): within bf16 rounding.

_AUTOCAST_KEPT_ARGS = {"linear": (1,), "bat_linear": (), "stacked_linear": ()}  # args not cast
_autocast_library = torch.library.Library("miss", "FRAGMENT")  # keeps the registrations alive


def _autocast_cast(value: Any, device_type: str, dtype: torch.dtype) -> Any:
    if isinstance(value, (list, tuple)):
        return [_autocast_cast(item, device_type, dtype) for item in value]
    eligible = (isinstance(value, Tensor) and value.is_floating_point()
                and value.device.type == device_type and value.dtype != torch.float64)
    return value.to(dtype) if eligible else value


def _autocast_kernel(op: torch._ops.OpOverload, device_type: str, kept: tuple[int, ...]) -> Any:
    autocast_key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(_keyset: Any, *args: Any) -> Tensor:
        dtype = torch.get_autocast_dtype(device_type)
        cast = [arg if index in kept else _autocast_cast(arg, device_type, dtype) for index, arg in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(autocast_key)):
            out = op(*cast)
        return out.to(args[0].dtype)

    return kernel


def _register_autocast_rules() -> None:
    for name, kept in _AUTOCAST_KEPT_ARGS.items():
        op = getattr(torch.ops.miss, name).default
        for device_type in ("cpu", "cuda", "xpu"):
            if torch.amp.is_autocast_available(device_type):
                key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
                _autocast_library.impl(name, _autocast_kernel(op, device_type, kept), key, with_keyset=True)


_register_autocast_rules()
