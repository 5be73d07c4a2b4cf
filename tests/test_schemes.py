import pytest

from edgequant.errors import EdgequantError
from edgequant.schemes import SCHEMES, QuantScheme, get_scheme


def test_json_round_trip():
    for s in SCHEMES.values():
        assert QuantScheme.from_json(s.to_json()) == s


def test_names_and_parsing():
    assert get_scheme("w4g128") == QuantScheme(4, 128)
    assert get_scheme("w3") == QuantScheme(3, -1)
    assert get_scheme("w2g64-sym") == QuantScheme(2, 64, True)
    assert QuantScheme(3, 128).name == "w3g128"


@pytest.mark.parametrize("kw", [dict(bits=5), dict(bits=1), dict(group_size=0), dict(group_size=12)])
def test_invalid_schemes_are_refused(kw):
    with pytest.raises(EdgequantError):
        QuantScheme(**kw)


def test_storage_bits():
    assert QuantScheme(4, 128).storage_bits_per_weight(4096) == pytest.approx(4 + 24 / 128)
    assert QuantScheme(3, 128).storage_bits_per_weight(4096) == pytest.approx(32 * 410 / 4096 + 24 / 128)
    assert QuantScheme(4, 128, sym=True).storage_bits_per_weight(4096) == pytest.approx(4 + 16 / 128)
