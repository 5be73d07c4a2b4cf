import json

import pytest

from edgequant.errors import EdgequantError
from edgequant.schemes import SCHEMES, QuantScheme, get_scheme


def test_json_round_trip():
    for s in SCHEMES.values():
        assert QuantScheme.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_names_and_parsing():
    assert get_scheme("w4g128") == QuantScheme(4, 128)
    assert get_scheme("w3") == QuantScheme(3, -1)
    assert get_scheme("w2g64-sym") == QuantScheme(2, 64, True)
    assert QuantScheme(3, 128).name == "w3g128"


@pytest.mark.parametrize("kw", [dict(bits=5), dict(bits=1), dict(group_size=0), dict(group_size=12)])
def test_invalid_schemes_are_refused(kw):
    with pytest.raises(EdgequantError):
        QuantScheme(**kw)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_checkpoint_config_round_trips_the_scheme(name, tmp_path):
    import json

    from edgequant.checkpoint import quantization_config, read_scheme
    s = SCHEMES[name]
    qc = json.loads(json.dumps(quantization_config(s, "rtn", ["mlp.up_proj"])))
    assert read_scheme(tmp_path / "config.json", qc) == s


@pytest.mark.parametrize("name", ["w4g128", "w3g64-sym", "w2", "w3g32"])
def test_kernel_spec_is_built_from_the_scheme(name):
    from edgequant.tvm_schedules.dequant import QuantSpec
    s = get_scheme(name)
    spec = QuantSpec.from_scheme(s, 8, 200)
    assert spec.scheme == s
    assert spec.param_shapes()["qweight"][0] == (8, s.packed_words(200))
    assert spec.param_shapes()["scales"][0] == (8, s.groups(200))
    assert ("zeros" in spec.param_shapes()) == (not s.sym)
