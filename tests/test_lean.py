"""The lean backward of dpolab.models.lean against autograd on the model's own modules: the same forward bit
for bit, the same gradients, and fewer saved activations. bench/gpu_check.sh runs it with
DPOLAB_TEST_DEVICE=cuda (bf16 autocast on the GPU)."""

import copy
import os

import pytest
import torch
from torch import nn

from dpolab.models.lean import RMSNormFn, SiluMul, SwiGLUDown, make_lean

DEVICE = torch.device(os.environ.get("DPOLAB_TEST_DEVICE", "cpu"))


def llama(mlp_bias: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, mlp_bias=mlp_bias)
    model = LlamaForCausalLM(config).to(DEVICE).train()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide their gradients' mistakes
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def loss_and_grads(model, ids, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for backward, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(seen.values())


IDS = torch.randint(0, 101, (3, 17), generator=torch.Generator().manual_seed(1)).to(DEVICE)


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_lean_model_has_the_same_outputs_and_gradients(mlp_bias):
    model = llama(mlp_bias)
    lean = copy.deepcopy(model)
    assert make_lean(lean) == 2 * 3 + 1  # per layer the MLP and two norms, and the final norm
    logits, grads = loss_and_grads(model, IDS)
    lean_logits, lean_grads = loss_and_grads(lean, IDS)
    assert torch.equal(logits, lean_logits)  # the forward is the model's own ops
    assert grads.keys() == lean_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(lean_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_lean_model_under_bf16_autocast_matches_autograd():
    """Autocast runs the linears in bf16 and the norms in fp32; backward must cast where autocast did."""
    model = llama(mlp_bias=True)
    lean = copy.deepcopy(model)
    make_lean(lean)
    logits, grads = loss_and_grads(model, IDS, autocast=True)
    lean_logits, lean_grads = loss_and_grads(lean, IDS, autocast=True)
    assert lean_logits.dtype == logits.dtype == torch.bfloat16 and torch.equal(logits, lean_logits)
    for name, g in grads.items():
        assert lean_grads[name].dtype == g.dtype == torch.float32
        torch.testing.assert_close(lean_grads[name], g, rtol=2e-2, atol=1e-4, msg=name)


def test_lean_model_saves_fewer_activations():
    """Per token and layer autograd keeps gate, silu(gate), up and their product (4 × intermediate) and each
    norm's input, 1/rms and output; lean keeps gate and up (2 × intermediate fewer) and each norm's input and
    1/rms (a hidden-size vector fewer per norm: two a layer, and the final norm)."""
    model = llama()
    lean = copy.deepcopy(model)
    make_lean(lean)
    tokens, layers, hidden, inter = IDS.numel(), 2, 64, 176
    fewer = 4 * tokens * (layers * (2 * inter + 2 * hidden) + hidden)  # fp32 bytes
    assert saved_bytes(model, IDS) - saved_bytes(lean, IDS) == fewer


def test_functions_against_autograd_on_their_own():
    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(5, 7, 12, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = torch.randn(9, 12, generator=g, dtype=torch.float64, requires_grad=True), \
        torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(SiluMul.apply, (gate, up))
    torch.autograd.gradcheck(SwiGLUDown.apply, (gate, up, w, b))
    torch.autograd.gradcheck(SwiGLUDown.apply, (gate, up, w, None))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_backward_against_autograd(dtype):
    """Llama's norm computes in fp32 whatever its input, so gradcheck's float64 does not apply: autograd on the
    same formula is the reference, with an fp32 or a bf16 input (as under autocast) and fp32 weights."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, 12, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(12, generator=g)).requires_grad_()
    up = torch.randn(5, 7, 12, generator=g)

    def llama_norm(x, w):
        h = x.to(torch.float32)
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    grads = [torch.autograd.grad((f(x, w) * up).sum(), (x, w))
             for f in (llama_norm, lambda x, w: RMSNormFn.apply(x, w, 1e-6))]
    for ours, theirs in zip(grads[1], grads[0]):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


def test_lora_down_proj_keeps_its_module():
    """With LoRA on down_proj the MLP calls that module (SiluMul only), and the adapters' gradients match."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "q_proj"], init_lora_weights=False)
    model = get_peft_model(llama(), config)
    lean = copy.deepcopy(model)
    make_lean(lean)
    logits, grads = loss_and_grads(model, IDS)
    lean_logits, lean_grads = loss_and_grads(lean, IDS)
    assert torch.equal(logits, lean_logits) and grads.keys() == lean_grads.keys() and len(grads) == 8
    for name, g in grads.items():
        torch.testing.assert_close(lean_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_other_forms_are_left_alone():
    """An MLP whose forward is not Llama's (GELU, or another order of ops) and a norm of another formula."""

    class GeluMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class OffsetNorm(nn.Module):  # Gemma's (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(4)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    model = nn.Sequential(GeluMLP(), OffsetNorm())
    assert make_lean(model) == 0 and "forward" not in vars(model[0]) and "forward" not in vars(model[1])


def test_a_hooked_down_proj_is_called_as_a_module():
    """A hook on down_proj (DeepSpeed ZeRO-3 gathers a module's weight in one) must see its module called."""
    model = llama()
    make_lean(model)
    calls = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.append(m))
    loss_and_grads(model, IDS)
    assert len(calls) == 2
