"""Parity with TRL 1.16: the same inputs through TRL's own loss code, for every loss TRL implements.

TRL computes its losses inside the trainers' ``_compute_loss`` / ``get_batch_loss_metrics`` methods. We call
those methods unbound, with a minimal stand-in ``self`` and a stand-in model whose ``log_probs`` (or
``logits``) are tensors we choose, and precomputed reference log-probs. So TRL's real loss code runs on
known per-token log-probs, and we compare its scalar loss, and its gradient wrt the per-token log-probs,
with dpolab's mean loss on the per-sequence sums.
"""

from __future__ import annotations

import types
import zlib
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from dpolab.losses import LOSSES, f_divergence_inputs, wpo_weights
from tests.hand import combine, ld_pair_logps

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")

B, T = 5, 8  # pairs per batch, padded sequence length (one prompt token + up to T−1 completion tokens)


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def _stub(**attrs) -> types.SimpleNamespace:
    base = dict(accelerator=_Accelerator(), model=types.SimpleNamespace(training=True), aux_loss_enabled=False,
                _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    return types.SimpleNamespace(**{**base, **attrs})


class _Model:
    """Returns the chosen per-token log-probs (and zero metrics tensors) whatever the input."""

    def __init__(self, log_probs, log_sum_sq_probs=None, by_input=None):
        self.log_probs, self.log_sum_sq_probs, self.by_input = log_probs, log_sum_sq_probs, by_input or {}

    def __call__(self, input_ids=None, **kwargs):
        lp = self.by_input.get(id(input_ids), self.log_probs)
        z = torch.zeros_like(lp)
        return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool(),
                                     log_sum_sq_probs=self.log_sum_sq_probs, aux_loss=None)


def _dpo_batch(seed: int, dtype=torch.float64):
    """Per-token log-probs (2B, T−1) for [chosen; rejected], their masks and lengths, reference sums."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T, (2 * B,), generator=g)  # completion tokens per sequence
    completion_mask = (torch.arange(T)[None, :] >= 1) & (torch.arange(T)[None, :] <= lengths[:, None])
    shift_mask = completion_mask[:, 1:]  # (2B, T−1): which next-token log-probs are completion tokens
    token_logps = (-2.0 * torch.rand(2 * B, T - 1, generator=g, dtype=dtype) - 0.05) * shift_mask
    ref = token_logps.sum(-1) + torch.randn(2 * B, generator=g, dtype=dtype)  # reference sums near the policy
    return dict(token_logps=token_logps, completion_mask=completion_mask.long(), shift_mask=shift_mask,
                lengths=lengths, ref_chosen=ref[:B], ref_rejected=ref[B:],
                log_sum_sq=(-torch.rand(2 * B, T - 1, generator=g, dtype=dtype)) * shift_mask,
                margin=torch.rand(B, generator=g, dtype=dtype))


def trl_dpo_loss(batch, token_logps, *, loss_type, beta=0.1, label_smoothing=0.0, loss_weights=None,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, use_weighting=False, ld_alpha=None,
                 discopop_tau=0.05):
    """TRL 1.16's ``DPOTrainer._compute_loss`` on the given per-token log-probs (precomputed reference)."""
    types_ = loss_type if isinstance(loss_type, list) else [loss_type]
    stub = _stub(beta=beta, label_smoothing=label_smoothing, loss_types=types_,
                 loss_weights=loss_weights or [1.0] * len(types_), f_divergence_type=f_divergence_type,
                 f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=use_weighting, ld_alpha=ld_alpha,
                 precompute_ref_logps=True, args=types.SimpleNamespace(discopop_tau=discopop_tau))
    inputs = dict(input_ids=torch.ones(2 * B, T, dtype=torch.long), attention_mask=batch["completion_mask"].clone(),
                  completion_mask=batch["completion_mask"], ref_chosen_logps=batch["ref_chosen"],
                  ref_rejected_logps=batch["ref_rejected"])
    inputs["attention_mask"][:, 0] = 1
    model = _Model(token_logps, batch["log_sum_sq"])
    return trl_dpo.DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)


def ours(name, batch, token_logps, beta=0.1, **params):
    """dpolab's mean loss for a paired loss, from the sequence sums of the same per-token log-probs."""
    loss = LOSSES[name]
    logps = token_logps.sum(-1)  # (2B,): padding positions are zero
    kwargs = dict(params, beta=beta)
    if loss.needs_lengths:
        kwargs.update(chosen_lengths=batch["lengths"][:B], rejected_lengths=batch["lengths"][B:])
    return loss(logps[:B], logps[B:], batch["ref_chosen"], batch["ref_rejected"], **kwargs)[0]


def _value_and_grad(fn, token_logps):
    x = token_logps.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def assert_same(trl_fn, our_fn, token_logps, atol=1e-6, mask=None):
    """Same value and same gradient (on the real tokens when ``mask`` is given: padding never counts)."""
    v_trl, g_trl = _value_and_grad(trl_fn, token_logps)
    v_ours, g_ours = _value_and_grad(our_fn, token_logps)
    torch.testing.assert_close(v_ours, v_trl, atol=atol, rtol=1e-6)
    if mask is not None:
        g_trl, g_ours = g_trl * mask, g_ours * mask
    torch.testing.assert_close(g_ours, g_trl, atol=atol, rtol=1e-6)


# name in TRL 1.16's DPOTrainer, dpolab name, dpolab params, TRL kwargs
DPO_CASES = [
    ("sigmoid", "sigmoid", {}, {}),
    ("hinge", "hinge", {}, {}),
    ("ipo", "ipo", {}, {}),
    ("sigmoid_norm", "sigmoid_norm", {}, {}),
    ("exo_pair", "exo_pair", {"exo_epsilon": 1e-3}, {"label_smoothing": 1e-3}),
    ("nca_pair", "nca_pair", {}, {}),
    ("robust", "robust", {"label_smoothing": 0.2}, {"label_smoothing": 0.2}),
    ("bco_pair", "bco_pair", {}, {}),
    ("sppo_hard", "sppo_hard", {}, {}),
    ("aot", "aot", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    ("aot_unpaired", "aot_unpaired", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    ("apo_zero", "apo_zero", {}, {}),
    ("apo_down", "apo_down", {}, {}),
    ("discopop", "discopop", {"discopop_tau": 0.05}, {"discopop_tau": 0.05}),
    ("sft", "sft", {}, {}),
]


def test_every_trl_loss_name_is_covered():
    """Every loss_type TRL 1.16's DPOTrainer accepts is registered here and checked below."""
    trl_names = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    import inspect

    source = inspect.getsource(trl_dpo.DPOTrainer._compute_loss)
    assert {n for n in trl_names if f'loss_type == "{n}"' in source} == trl_names
    assert {c[0] for c in DPO_CASES} == trl_names
    for name in trl_names:
        assert LOSSES[name].trl_name == f"DPOTrainer loss_type='{name}'"


@pytest.mark.parametrize("trl_name,name,params,trl_kwargs", DPO_CASES, ids=[c[0] for c in DPO_CASES])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_trainer_losses(trl_name, name, params, trl_kwargs, beta):
    batch = _dpo_batch(seed=zlib.crc32(f"{trl_name}-{beta}".encode()) % 1000)  # the same in every process
    assert_same(lambda x: trl_dpo_loss(batch, x, loss_type=trl_name, beta=beta, **trl_kwargs),
                lambda x: ours(name, batch, x, beta=beta, **params).mean(), batch["token_logps"], mask=batch["shift_mask"])


def test_sigmoid_label_smoothing_is_where_dpolab_differs():
    """TRL 1.16's ``sigmoid`` ignores label_smoothing (its value equals ε = 0); dpolab's is cDPO."""
    batch = _dpo_batch(seed=3)
    x = batch["token_logps"]
    trl_value = trl_dpo_loss(batch, x, loss_type="sigmoid", label_smoothing=0.3)
    torch.testing.assert_close(trl_value, ours("sigmoid", batch, x).mean())
    assert abs(trl_value - ours("sigmoid", batch, x, label_smoothing=0.3).mean()) > 1e-3


def test_mpo_combination_matches_trl_loss_weights():
    """MPO: sigmoid + bco_pair + sft with weights (0.8, 0.2, 1.0), TRL's ``loss_weights``."""
    batch = _dpo_batch(seed=11)
    names, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    assert_same(lambda x: trl_dpo_loss(batch, x, loss_type=names, loss_weights=weights),
                lambda x: combine([ours(n, batch, x) for n in names], weights), batch["token_logps"], mask=batch["shift_mask"])


F_CASES = [(f, n) for f in ("forward_kl", "js_divergence", "alpha_divergence")
           for n in ("sigmoid", "hinge", "ipo", "sigmoid_norm", "exo_pair", "robust", "discopop")]


@pytest.mark.parametrize("f_type,name", F_CASES)
def test_f_divergences_match_trl(f_type, name):
    """f-DPO: dpolab feeds (f(h_c), f(h_r), 0, 0) to the loss; TRL transforms inside. float32 (TRL's α clamp)."""
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in _dpo_batch(seed=5).items()}
    trl_kwargs = {"label_smoothing": 1e-3} if name == "exo_pair" else {}
    if name == "robust":
        trl_kwargs = {"label_smoothing": 0.1}
    params = {"exo_pair": {"exo_epsilon": 1e-3}, "robust": {"label_smoothing": 0.1}}.get(name, {})
    loss = LOSSES[name]

    def our_fn(x):
        logps = x.sum(-1)
        args = f_divergence_inputs(loss, logps[:B], logps[B:], batch["ref_chosen"], batch["ref_rejected"],
                                   f_divergence_type=f_type, f_alpha_divergence_coef=0.3)
        kwargs = dict(params, beta=0.5)
        if loss.needs_lengths:
            kwargs.update(chosen_lengths=batch["lengths"][:B], rejected_lengths=batch["lengths"][B:])
        return loss(*args, **kwargs)[0].mean()

    assert_same(lambda x: trl_dpo_loss(batch, x, loss_type=name, beta=0.5, f_divergence_type=f_type,
                                       f_alpha_divergence_coef=0.3, **trl_kwargs),
                our_fn, batch["token_logps"], atol=1e-5, mask=batch["shift_mask"])


def test_f_divergence_refuses_the_losses_trl_refuses():
    for name, loss in LOSSES.items():
        if loss.needs_ref and loss.data == "paired" and name in {"nca_pair", "bco_pair", "sppo_hard", "aot",
                                                                  "aot_unpaired", "apo_zero", "apo_down"}:
            assert not loss.f_divergence
            z = torch.zeros(2)
            with pytest.raises(ValueError):
                f_divergence_inputs(loss, z, z, z, z, f_divergence_type="forward_kl")


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "apo_zero"])
def test_wpo_weighting_matches_trl(name):
    """WPO: TRL's ``use_weighting`` multiplies each pair's loss by exp(aligned mean log-prob) of both answers."""
    batch = _dpo_batch(seed=7)
    S = batch["log_sum_sq"].sum(-1)  # (2B,) Σ_t log Σ_v p², per sequence
    n = batch["lengths"]

    def our_fn(x):
        logps = x.sum(-1)
        w = wpo_weights(logps[:B], logps[B:], n[:B], n[B:], chosen_log_sum_sq_probs=S[:B],
                        rejected_log_sum_sq_probs=S[B:])
        return (ours(name, batch, x) * w).mean()

    assert_same(lambda x: trl_dpo_loss(batch, x, loss_type=name, use_weighting=True), our_fn, batch["token_logps"],
                mask=batch["shift_mask"])


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
def test_ld_dpo_matches_trl(ld_alpha):
    """LD-DPO: TRL weights the tokens past min(n_c, n_r) by α; the reference values are precomputed."""
    batch = _dpo_batch(seed=9)
    mask = batch["shift_mask"]

    def our_fn(x):
        c, r = ld_pair_logps(x[:B], mask[:B], x[B:], mask[B:], ld_alpha=ld_alpha)
        return LOSSES["sigmoid"](c, r, batch["ref_chosen"], batch["ref_rejected"], beta=0.1)[0].mean()

    assert_same(lambda x: trl_dpo_loss(batch, x, loss_type="sigmoid", ld_alpha=ld_alpha), our_fn,
                batch["token_logps"], mask=batch["shift_mask"])


# --- KTO -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.7), (2.0, 0.5)])
@pytest.mark.parametrize("kl_shift", [0.0, -3.0])  # −3: the KL estimate is negative and clamps to 0
def test_kto_matches_trl(weights, kl_shift):
    g = torch.Generator().manual_seed(int(10 * weights[1] + kl_shift))
    n = 6
    lengths = torch.randint(1, T, (n,), generator=g)
    completion_mask = ((torch.arange(T)[None] >= 1) & (torch.arange(T)[None] <= lengths[:, None])).long()
    token_logps = (-2 * torch.rand(n, T - 1, generator=g, dtype=torch.float64)) * completion_mask[:, 1:]
    kl_token_logps = (-2 * torch.rand(n, T - 1, generator=g, dtype=torch.float64)) * completion_mask[:, 1:]
    ref = token_logps.sum(-1) + torch.randn(n, generator=g, dtype=torch.float64)
    ref_kl = kl_token_logps.sum(-1) + torch.randn(n, generator=g, dtype=torch.float64) - kl_shift
    labels = torch.tensor([True, False, True, True, False, False])

    def trl_fn(x):
        kl_ids = torch.ones(n, T, dtype=torch.long)
        inputs = dict(input_ids=torch.ones(n, T, dtype=torch.long), attention_mask=torch.ones(n, T),
                      completion_mask=completion_mask, KL_input_ids=kl_ids, KL_attention_mask=torch.ones(n, T),
                      KL_completion_mask=completion_mask, label=labels, ref_logps=ref, ref_KL_logps=ref_kl)
        stub = _stub(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.1,
                     desirable_weight=weights[0], undesirable_weight=weights[1])
        stub._compute_kl_logps = types.MethodType(trl_kto.KTOTrainer._compute_kl_logps, stub)
        model = _Model(x, by_input={id(kl_ids): kl_token_logps})
        return trl_kto.KTOTrainer._compute_loss(stub, model, inputs, return_outputs=False)

    def our_fn(x):
        return LOSSES["kto"](x.sum(-1), ref, labels, beta=0.1, kl_policy_logps=kl_token_logps.sum(-1),
                             kl_ref_logps=ref_kl, desirable_weight=weights[0],
                             undesirable_weight=weights[1])[0].mean()

    assert_same(trl_fn, our_fn, token_logps, mask=completion_mask[:, 1:])


# --- CPO, SimPO, AlphaPO, ORPO (TRL's experimental trainers, run on logits) ------------------------------------

V = 11  # vocabulary of the stand-in model


def _logits_batch(seed: int, prompt_len: int = 1):
    """Token ids, masks and labels for chosen and rejected (B, T), and a logits tensor (2B, T, V)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("chosen", "rejected"):
        n = torch.randint(1, T - prompt_len + 1, (B,), generator=g)
        pos = torch.arange(T)[None]
        attn = (pos < prompt_len + n[:, None]).long()
        ids = torch.randint(0, V, (B, T), generator=g) * attn
        labels = torch.where((pos >= prompt_len) & (attn == 1), ids, -100)
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_labels": labels})
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    return out, logits


def _our_logps(logits, batch):
    """Summed completion log-probs and lengths from logits (2B, T, V): [chosen; rejected]."""
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]  # (2B, T−1)
    mask = labels != -100
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1), mask.sum(-1)


def _trl_experimental(kind, batch, logits, **attrs):
    """TRL's CPO/ORPO loss on the given logits (2B, T, V)."""
    model = lambda *a, **k: types.SimpleNamespace(logits=logits)  # noqa: E731
    return trl_experimental_loss_and_metrics(kind, batch, model, **attrs)[0]


def trl_experimental_loss_and_metrics(kind, batch, model, **attrs):
    """TRL 1.16's ``CPOTrainer`` (kind "cpo") or ``ORPOTrainer`` (kind "orpo") ``get_batch_loss_metrics`` on
    ``batch`` (chosen/rejected input ids, attention masks, labels), with ``model`` returning ``.logits``."""
    if kind == "cpo":
        mod = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
        cls, loss_method = mod.CPOTrainer, "cpo_loss"
    else:
        mod = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
        cls, loss_method = mod.ORPOTrainer, "odds_ratio_loss"
    stub = _stub(is_encoder_decoder=False, padding_value=0, pad_token_id=0, concatenated_inputs=cls.concatenated_inputs,
                 get_batch_logps=cls.get_batch_logps, **attrs)
    stub.concatenated_forward = types.MethodType(cls.concatenated_forward, stub)
    setattr(stub, loss_method, types.MethodType(getattr(cls, loss_method), stub))
    return cls.get_batch_loss_metrics(stub, model, batch)


CPO_CASES = [
    # TRL CPOTrainer attrs, dpolab name, dpolab params, β
    (dict(loss_type="sigmoid", cpo_alpha=1.0, label_smoothing=0.0, alpha=0.0, simpo_gamma=0.5), "cpo",
     dict(cpo_alpha=1.0), 0.1),
    (dict(loss_type="sigmoid", cpo_alpha=0.7, label_smoothing=0.2, alpha=0.0, simpo_gamma=0.5), "cpo",
     dict(cpo_alpha=0.7, label_smoothing=0.2), 0.3),
    (dict(loss_type="simpo", cpo_alpha=0.0, label_smoothing=0.0, alpha=0.0, simpo_gamma=1.0), "simpo",
     dict(simpo_gamma=1.0), 2.0),
    # TRL's CPOConfig turns loss_type="alphapo" into simpo with cpo_alpha = 0; alpha shapes the reward
    (dict(loss_type="simpo", cpo_alpha=0.0, label_smoothing=0.0, alpha=0.25, simpo_gamma=1.0), "alphapo",
     dict(simpo_gamma=1.0, alphapo_alpha=0.25), 2.0),
    (dict(loss_type="simpo", cpo_alpha=0.0, label_smoothing=0.0, alpha=-0.5, simpo_gamma=0.3), "alphapo",
     dict(simpo_gamma=0.3, alphapo_alpha=-0.5), 1.5),
]


@pytest.mark.parametrize("trl_attrs,name,params,beta", CPO_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CPO_CASES)])
def test_cpo_trainer_losses(trl_attrs, name, params, beta):
    batch, logits = _logits_batch(seed=len(name) + int(10 * beta))

    def our_fn(lg):
        logps, n = _our_logps(lg, batch)
        return LOSSES[name](logps[:B], logps[B:], None, None, beta=beta, chosen_lengths=n[:B],
                            rejected_lengths=n[B:], **params)[0].mean()

    assert_same(lambda lg: _trl_experimental("cpo", batch, lg, beta=beta, **trl_attrs), our_fn, logits)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl_with_one_token_prompts(beta):
    """With a one-token prompt TRL's NLL (over prompt + completion) equals dpolab's (completion only)."""
    batch, logits = _logits_batch(seed=int(100 * beta), prompt_len=1)

    def our_fn(lg):
        logps, n = _our_logps(lg, batch)
        return LOSSES["orpo"](logps[:B], logps[B:], None, None, beta=beta, chosen_lengths=n[:B],
                              rejected_lengths=n[B:])[0].mean()

    assert_same(lambda lg: _trl_experimental("orpo", batch, lg, beta=beta), our_fn, logits)


def test_orpo_nll_differs_from_trl_with_longer_prompts():
    """The documented deviation: TRL 1.16 adds the prompt tokens to ORPO's NLL; dpolab does not."""
    batch, logits = _logits_batch(seed=1, prompt_len=3)
    logps, n = _our_logps(logits, batch)
    ours_value = LOSSES["orpo"](logps[:B], logps[B:], None, None, beta=0.1, chosen_lengths=n[:B],
                                rejected_lengths=n[B:])[0].mean()
    trl_value = _trl_experimental("orpo", batch, logits, beta=0.1)
    # TRL's NLL: chosen tokens 1.. of prompt + completion; ours: completion tokens only
    ids = batch["chosen_input_ids"]
    lp = torch.log_softmax(logits[:B, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = batch["chosen_attention_mask"][:, 1:].bool()
    trl_nll, our_nll = -lp[mask].mean(), -logps[:B].sum() / n[:B].sum()
    torch.testing.assert_close(trl_value - ours_value, trl_nll - our_nll)
    assert abs(trl_nll - our_nll) > 1e-3
