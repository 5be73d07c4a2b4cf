"""Options are owned by their dataclasses: a method's registered config alone gives its CLI option and API default,
values are checked by the field's rule, and configs round-trip through JSON."""
import importlib
import json
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from edgequant import methods
from edgequant.calibrate.configs import OmniConfig, OWQConfig
from edgequant.errors import EdgequantError
from edgequant.options import Options, opt


@dataclass
class _MadeUpConfig(Options):
    strength: float = opt(0.25, "how hard to push.", "float", lo=0, hi=1)
    passes: int = opt(3, "passes over the model.", "int", lo=1)


@pytest.fixture
def made_up_method():
    """A method whose only source of options is its config dataclass; the CLI is rebuilt to see it."""
    seen = []

    @methods.register_method("madeup", needs_calibration=False, summary="test only", config=_MadeUpConfig,
                             title="MadeUp")
    def _run(model, tokenizer, scheme, opts, progress=True):
        seen.append(opts.config)
        return methods.METHODS["rtn"].run(model, tokenizer, scheme, opts, progress)

    import edgequant.cli as cli
    yield importlib.reload(cli), seen
    del methods.METHODS["madeup"]
    importlib.reload(cli)


def test_a_method_option_is_one_dataclass_field(made_up_method, model_dirs, tmp_path):
    from edgequant import api
    cli, seen = made_up_method
    r = CliRunner().invoke(cli.main, ["quantize", "--help"])
    assert "--strength" in r.output and "MadeUp: how hard to push." in r.output and "--passes" in r.output
    r = CliRunner().invoke(cli.main, ["quantize", str(model_dirs["llama"]), "-o", str(tmp_path / "a"), "--method",
                                      "madeup", "--group-size", "32", "--strength", "0.5", "-q"])
    assert r.exit_code == 0, r.output
    api.quantize(model_dirs["llama"], tmp_path / "b", method="madeup", group_size=32, progress=False)
    assert seen == [_MadeUpConfig(strength=0.5, passes=3), _MadeUpConfig()]   # the CLI's value, the API default
    prov = json.loads((tmp_path / "a" / "edgequant.json").read_text())
    assert prov["options"]["strength"] == 0.5 and prov["options"]["passes"] == 3
    r = CliRunner().invoke(cli.main, ["quantize", str(model_dirs["llama"]), "-o", str(tmp_path / "c"), "--method",
                                      "madeup", "--strength", "2"])
    assert r.exit_code == 2 and "--strength" in r.output and not (tmp_path / "c").exists()
    with pytest.raises(EdgequantError, match="--passes must be >= 1, not 0"):
        api.quantize(model_dirs["llama"], tmp_path / "d", method="madeup", passes=0, progress=False)
    with pytest.raises(EdgequantError, match="--epochs do not apply to --method madeup"):
        api.quantize(model_dirs["llama"], tmp_path / "d", method="madeup", epochs=1, progress=False)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("cls,kw", [(OmniConfig, {"epochs": 3, "let": True, "lwc_init": "search", "loss": "token_rel"}),
                                    (OWQConfig, {"target_bits": 3.1})])
def test_configs_round_trip_json(cls, kw):
    cfg = cls.from_dict(kw)
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("kw,msg", [({"epochs": -1}, "--epochs must be >= 0"), ({"loss": "l1"}, "'mse'"),
                                    ({"lwc_lr": float("nan")}, "--lwc-lr"), ({"lwc_init": "x"}, "'search'"),
                                    ({"let_alpha": 1.5}, "--let-alpha"), ({"epochs": 1.5}, "integer"),
                                    ({"lwc": False, "let": False}, "nothing to train"), ({"bogus": 1}, "--bogus")])
def test_config_rules(kw, msg):
    with pytest.raises(EdgequantError, match=msg):
        OmniConfig.from_dict(kw)


def test_owq_budget_is_one_or_the_other():
    with pytest.raises(EdgequantError, match="not both"):
        OWQConfig(target_bits=3.1, weak_columns=4)


@pytest.mark.parametrize("method,kw,msg", [
    ("rtn", {"percdamp": 0.5}, "--percdamp do not apply to --method rtn$"),
    ("omniquant", {"percdamp": 0.5}, "--percdamp do not apply to --method omniquant without --gptq"),
    ("omniquant", {"act_order": False, "gptq": False}, "--act-order do not apply to --method omniquant without --gptq"),
    ("omniquant", {"skip_tokens": 2, "gptq": True}, "--skip-tokens do not apply to --method omniquant$"),
    ("rtn", {"nsamples": 7}, "--calib, --nsamples do not apply to --method rtn$"),
    ("gptq", {"tune_loss": "token_rel"}, "--tune-loss only apply with --tune-epochs"),
    ("owq", {"tune_lr": 0.5, "tune_heldout": 2}, "--tune-lr, --tune-heldout only apply with --tune-epochs"),
    ("owq", {"clip_search": False, "sink_guard": True}, "--sink-guard only apply with --clip-search"),
    ("omniquant", {"let_lr": 0.1}, "--let-lr only apply with --let"),
    ("rtn", {"seed": 5}, "--seed do not apply to --method rtn$"),   # rtn reads it only with --rotate
    ("omniquant", {"epochs": 0, "lwc_lr": 0.5}, "--lwc-lr only apply with --epochs N"),
    ("omniquant", {"lwc": False, "let": True, "lwc_init": 2.0}, "--lwc-init only apply with --lwc"),
    # the eighth re-run (S27): with --epochs 0 and nothing else reading the windows, these changed no byte
    ("omniquant", {"epochs": 0, "seed": 5, "nsamples": 8}, "--nsamples, --seed do not apply to --method omniquant "
                                                           "with --epochs 0 and nothing else"),
    ("omniquant", {"epochs": 0, "keep_best": False}, "--keep-best only apply with --epochs N"),
    ("omniquant", {"clip_qk": False}, "--clip-qk only apply with --lwc-init search"),
    ("omniquant", {"clip_up": False, "lwc_init_metric": "product"},
     "--clip-up, --lwc-init-metric only apply with --lwc-init search"),
    ("owq", {"clip_search": False, "clip_up": False, "clip_v": False},
     "--clip-up, --clip-v only apply with --clip-search"),
])
def test_options_a_method_does_not_read_are_refused(tmp_path, method, kw, msg):
    """Set but never read, they changed nothing without a word (sixth hostile re-run, F1 and S20)."""
    from edgequant import api
    with pytest.raises(EdgequantError, match=msg):
        api.quantize("unused-model", tmp_path / "q", method=method, calib="unused.txt", progress=False, **kw)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("method,kw,msg", [
    ("gptq", {"tune_epochs": 1, "tune_heldout": 8}, "--tune-heldout 8 leaves no training windows of the 8"),
    ("owq", {"tune_epochs": 1, "tune_heldout": 9}, "--tune-heldout 9 leaves no training windows of the 8"),
    ("omniquant", {"epochs": 1, "heldout": 8}, "--heldout 8 leaves no training windows of the 8"),
    ("gptq", {"e2e_epochs": 1, "e2e_heldout": 8}, "--e2e-heldout 8 leaves no training windows of the 8"),
])
def test_held_out_windows_that_leave_none_are_refused_before_the_model_loads(tmp_path, method, kw, msg):
    """One rule (`options.training_windows`) for every option that holds calibration windows out of training, asked
    before the model loads (the model here does not exist), not after the first block's calibration."""
    from edgequant import api
    with pytest.raises(EdgequantError, match=msg):
        api.quantize("no-such-model", tmp_path / "q", method=method, calib="unused.txt", nsamples=8, progress=False,
                     **kw)
    assert not (tmp_path / "q").exists()
