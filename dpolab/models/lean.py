"""Leaner backward for the two decoder parts every Llama-family layer has: the SwiGLU MLP and the RMSNorm.

Same forward, fewer activations held for backward. Autograd keeps every intermediate an op needs: for
``down(silu(gate) · up)`` that is gate, silu(gate), up and their product (4 × the intermediate size per
token and layer); for an RMSNorm, its fp32 input and its normalised output. Here the MLP keeps gate and up
and recomputes silu(gate) · up in backward (an elementwise pass; when ``down_proj`` is a plain
``nn.Linear`` its input is not kept either), and the norm keeps its input and 1/rms. On SmolLM2-135M with
252-token prompts (8 rows of 349 tokens) that takes the saved activations from 3.93 GB to 2.58 GB and the
training run's peak from about 8.5 GB to 7.55 GB (docs/performance.md).

The forward runs the model's own ops in the model's order, so outputs are bit-identical. The MLP's backward
runs the ops autograd would run, on recomputed inputs; the norm's is its closed form
``∂x = r·(g − n·mean(g·n))`` with ``n = x·r``, ``r = 1/rms(x)``, equal to autograd's to float rounding
(tests/test_lean.py). A module is changed only when its ``forward`` is, op for op, Llama's (compared by
bytecode, so Mistral, Qwen2, SmolLM and every other copy of it qualify and anything else is left alone).
Under autocast the forward's dtypes are recorded and backward casts as autocast did.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

Tensor = torch.Tensor


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum ``grad`` over its leading dimensions down to ``like``'s shape, in ``like``'s dtype."""
    return grad.reshape(-1, like.shape[-1]).sum(0).to(like.dtype)


def silu_mul_grads(grad: Tensor, gate: Tensor, up: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of silu(gate) · up for gate and up, given silu(gate) = ``s``, as autograd chains them."""
    return torch.ops.aten.silu_backward(grad * up, gate), grad * s


class SiluMul(torch.autograd.Function):
    """silu(gate) · up, keeping gate and up (not silu(gate) as well)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        return silu_mul_grads(grad, gate, up, F.silu(gate))


class SwiGLUDown(torch.autograd.Function):
    """linear(silu(gate) · up, weight, bias), keeping gate, up and the weight; the product is recomputed."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        h = F.silu(gate) * up
        out = F.linear(h, weight, bias)  # under autocast: in autocast's dtype, as the model's own linear
        ctx.save_for_backward(gate, up, weight, bias)
        ctx.dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up, weight, bias = ctx.saved_tensors
        s = F.silu(gate)
        h = (s * up).to(ctx.dtype)
        grad = grad.to(ctx.dtype)
        w = weight.to(ctx.dtype)
        grad_h = (grad @ w).to(gate.dtype)  # (.., I)
        grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(h.reshape(-1, h.shape[-1])).to(weight.dtype) \
            if ctx.needs_input_grad[2] else None
        grad_b = _reduce_to(grad, bias) if bias is not None and ctx.needs_input_grad[3] else None
        return (*silu_mul_grads(grad_h, gate, up, s), grad_w, grad_b)


class RMSNormFn(torch.autograd.Function):
    """weight · (x / rms(x)), computed in fp32 as Llama's RMSNorm, keeping x and 1/rms(x)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        h = x.to(torch.float32)
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        normed = (h * r).to(x.dtype)
        ctx.save_for_backward(x, r, weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, r, weight = ctx.saved_tensors
        n = x.to(torch.float32) * r
        grad_w = _reduce_to(grad * n.to(x.dtype), weight) if ctx.needs_input_grad[1] else None
        g = (grad * weight).to(x.dtype).to(torch.float32)  # the casts of the forward's .to(x.dtype), undone
        grad_x = r * (g - n * (g * n).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


def mlp_forward(self, x: Tensor) -> Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if type(down) is nn.Linear and not (down._forward_pre_hooks or down._forward_hooks):
        # a plain linear (not LoRA's or a quantised one, and no hook, as DeepSpeed's ZeRO-3 puts on every module
        # to gather its weight, that expects to be called): its input is recomputed in backward too
        return SwiGLUDown.apply(gate, up, down.weight, down.bias)
    return down(SiluMul.apply(gate, up))


def norm_forward(self, hidden_states: Tensor) -> Tensor:
    return RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


def _same_code(module: nn.Module, reference) -> bool:
    code, ref = type(module).forward.__code__, reference.__code__
    return (code.co_code, code.co_names, code.co_consts) == (ref.co_code, ref.co_names, ref.co_consts)


def make_lean(model: nn.Module) -> int:
    """Give every Llama-form SwiGLU MLP and RMSNorm of ``model`` the lean backward; the number changed."""
    from transformers.activations import SiLUActivation  # deferred: transformers is a heavy import
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    changed = 0
    for module in model.modules():
        silu = isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation))
        if silu and _same_code(module, LlamaMLP.forward):
            module.forward = types.MethodType(mlp_forward, module)
        elif _same_code(module, LlamaRMSNorm.forward):
            module.forward = types.MethodType(norm_forward, module)
        else:
            continue
        changed += 1
    return changed
