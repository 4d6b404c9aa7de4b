"""Every loss setting is read by a selected loss or modifier, or refused: none is accepted and ignored.
Refusals come from the registry's declarations (``params``, ``data``, ``state``, ``f_divergence``,
``row_weights``, ``needs_ref``), never from loss names; so do KTO's label-balance warnings."""

from __future__ import annotations

import json
import logging
import re

import pytest

import dpolab
from dpolab import cli
from dpolab.commands import load_config
from dpolab.losses import LOSSES, Loss
from dpolab.objective import MODIFIER_SETTINGS

# A valid non-default value for every hyper-parameter some loss declares.
NON_DEFAULT = {"label_smoothing": 0.1, "exo_epsilon": 0.01, "discopop_tau": 0.1, "rdpo_alpha": 0.02,
               "odpo_alpha": 0.5, "odpo_transform": "identity", "dpop_lambda": 10.0, "simpo_gamma": 0.5,
               "alphapo_alpha": 0.1, "cpo_alpha": 0.5, "desirable_weight": 2.0, "undesirable_weight": 2.0}


def config(**settings):
    return load_config(overrides=dict(model="unused-model", data="unused-data", **settings))


def test_every_declared_param_has_a_test_value():
    assert {p for loss in LOSSES.values() for p in loss.params} == set(NON_DEFAULT)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_config_defaults_are_the_loss_signature_defaults(name):
    """A loss setting is a config field and a keyword of the function: both must default to the same value,
    or a run (config default) and a direct call (signature default) would compute different losses."""
    from dpolab.config import _fields

    fields = _fields()
    for param, default in LOSSES[name].param_defaults.items():
        assert param in fields, f"{name} declares {param}, which is not a config field"
        assert fields[param].default == default and type(fields[param].default) is type(default), \
            (name, param, fields[param].default, default)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_accepts_its_defaults_and_refuses_the_params_of_others(name):
    config(loss=name)  # defaults: nothing to refuse
    loss = LOSSES[name]
    for param, value in NON_DEFAULT.items():
        if param in loss.params:
            assert getattr(config(loss=name, **{param: value}), param) == value
        else:
            message = f"{param} = {value!r} has no effect with --loss {name}"
            with pytest.raises(dpolab.ConfigError, match=re.escape(message)):
                config(loss=name, **{param: value})


@pytest.mark.parametrize("settings,needs", [
    (dict(loss="kto", use_weighting=True), "paired losses whose row i is example i"),
    (dict(loss="plackett_luce", use_weighting=True), "paired losses"),
    (dict(loss="aot", use_weighting=True), "a loss that sorts rows over the batch"),
    (dict(loss="sigmoid,aot", use_weighting=True), "paired losses whose row i"),
    (dict(loss="sigmoid", bco_running_delta=True), "running δ"),
    (dict(loss="kto", bco_running_delta=True), "running δ"),
    (dict(loss="simpo", f_divergence_type="forward_kl"), "accepts f-divergences"),
    (dict(loss="cpo", f_divergence_type="js_divergence"), "accepts f-divergences"),
    (dict(loss="orpo", f_divergence_type="alpha_divergence"), "accepts f-divergences"),
    (dict(loss="sigmoid", f_alpha_divergence_coef=0.3), "f_divergence_type alpha_divergence"),
    (dict(loss="sigmoid", unpair=True), "unpaired rows"),
    (dict(loss="simpo", reference_free=True), "a loss with a reference model"),
    (dict(loss="sigmoid", ref_model_mixup_alpha=0.9), "sync_ref_model"),
    (dict(loss="sigmoid", ref_model_sync_steps=4), "sync_ref_model"),
])
def test_modifier_settings_nothing_reads_are_refused(settings, needs):
    with pytest.raises(dpolab.ConfigError, match="has no effect with --loss") as e:
        config(**settings)
    assert needs in str(e.value)


@pytest.mark.parametrize("settings", [
    dict(loss="sigmoid", use_weighting=True), dict(loss="sigmoid,sft", loss_weights=[1, 0.5], use_weighting=True),
    dict(loss="bco_pair", bco_running_delta=True), dict(loss="bco", bco_running_delta=True),
    dict(loss="sigmoid,bco_pair,sft", bco_running_delta=True), dict(loss="sigmoid", f_divergence_type="js_divergence"),
    dict(loss="ipo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss="kto", unpair=True), dict(loss="sigmoid", reference_free=True),
    dict(loss="sigmoid", sync_ref_model=True, ref_model_sync_steps=4, ref_model_mixup_alpha=0.9),
])
def test_settings_a_selected_loss_reads_are_accepted(settings):
    c = config(**settings)
    assert all(getattr(c, k) == v for k, v in settings.items())


def test_every_modifier_setting_is_a_config_field_with_a_default():
    from dpolab.config import _fields

    assert {s.name for s in MODIFIER_SETTINGS} <= set(_fields())


def test_the_command_line_refuses_with_the_reason(tiny_model, prefs, tmp_path, capsys):
    code = cli.main(["train", "--model", str(tiny_model), "--data", str(prefs), "--output-dir", str(tmp_path / "o"),
                     "--loss", "ipo", "--label-smoothing", "0.1"])
    err = capsys.readouterr().err
    assert code == 2 and "label_smoothing = 0.1 has no effect with --loss ipo" in err
    assert "losses that do: sigmoid, robust, aot, aot_unpaired, cpo" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ label-balance advice from the registry


def unpaired_file(tmp_path, n_desirable, n_undesirable):
    rows = [{"prompt": "what is red?", "completion": " red is good", "label": True}] * n_desirable
    rows += [{"prompt": "what is red?", "completion": " red is bad", "label": False}] * n_undesirable
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def advice_logged(loss, path, caplog, **settings) -> list[str]:
    from dpolab.builder import objective_for, prepare_records
    from dpolab.data.reading import load_records

    caplog.clear()
    cfg = config(loss=loss, **settings)
    with caplog.at_level(logging.WARNING, logger="dpolab"):
        prepare_records(cfg, objective_for(cfg), load_records(str(path)))
    return [r.getMessage() for r in caplog.records]


def test_label_advice_comes_from_the_declaration(tmp_path, caplog, monkeypatch):
    """KTO on 10 desirable and 2 undesirable rows: λ_D·n_D/(λ_U·n_U) = 5, outside [1, 4/3]; the advised λ_D
    is in [2/10, (4/3)·2/10] = [0.20, 0.27]. bco declares no advice and stays quiet; a new loss declaring
    ``label_advice`` is asked with its own bound params."""
    path = unpaired_file(tmp_path, 10, 2)
    (kto,) = advice_logged("kto", path, caplog)
    assert "= 5.00, outside the advised [1, 4/3]; try --desirable-weight between 0.20 and 0.27" in kto
    assert advice_logged("kto", path, caplog, desirable_weight=0.25) == []  # 0.25·10/2 = 1.25: in range
    assert advice_logged("bco", path, caplog) == []
    calls = []

    def advice(n_d, n_u, **params):
        calls.append((n_d, n_u, params))
        return "custom advice"

    monkeypatch.setitem(LOSSES, "thumbs", Loss("thumbs", LOSSES["bco"].fn, data="unpaired", state=("delta",),
                                               label_advice=advice))
    assert advice_logged("thumbs", path, caplog) == ["custom advice"]
    assert calls == [(10, 2, {})]
