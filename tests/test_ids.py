"""Neuron ids and layer lists: ASCII digits only, and numbers no longer than any model's, refused in one line."""

from __future__ import annotations

import pytest

from neuronmap.cli import main
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import parse_layers, parse_neuron_id
from neuronmap.runtime.specs import parse_spec

LONG = "9" * 5000  # past int()'s 4300-digit limit: a ValueError, not a number, before the fix


@pytest.mark.parametrize("text", [
    "L٢٩N٧٥٠",  # Arabic-Indic digits: read as L29N750 before
    "L２９N８０８",  # fullwidth digits
    "L²N0",  # a superscript: int() refuses it, \d did not
    "L29N808\n5",
])
def test_ids_in_other_digits_are_malformed(text):
    with pytest.raises(NeuronmapError, match=r"^malformed neuron id .*: expected L\{layer\}N\{index\} in ASCII digits"):
        parse_neuron_id(text)


@pytest.mark.parametrize("text, what", [(f"L0N{LONG}", "index"), (f"L{LONG}N0", "layer")])
def test_ids_with_absurdly_many_digits_are_out_of_range(text, what):
    with pytest.raises(NeuronmapError) as e:
        parse_neuron_id(text, 4, 64)
    msg = str(e.value)
    assert f"{what} has 5000 digits and is out of range: expected at most 9" in msg
    assert "(5,003 characters)" in msg and len(msg) < 200  # the id is shown cut, not 5,000 digits of it


def test_ascii_ids_still_parse():
    assert parse_neuron_id(" L29N808 ") == (29, 808)
    assert parse_neuron_id("L999999999N0") == (999_999_999, 0)


@pytest.mark.parametrize("text, says", [
    ("٠-٣", "malformed layers='٠-٣': expected a list of layers and ranges in ASCII digits"),
    ("1,２", "malformed layers="),
    (LONG, "is out of range: the model has 4 layers, 0-3"),
    (f"0-{LONG}", "is out of range: the model has 4 layers, 0-3"),
])
def test_layer_lists_in_other_digits_or_too_long(text, says):
    with pytest.raises(NeuronmapError, match=says):
        parse_layers(text, 4)
    assert parse_layers("0-1,-1", 4) == [0, 1, 3]


def test_clamp_specs_take_ascii_digits_only():
    assert parse_spec("L1N2=3").value.amount == 3.0
    for text in ("L١N2=3", "L1N2=٣"):
        with pytest.raises(NeuronmapError, match="malformed neuron spec"):
            parse_spec(text)


@pytest.mark.parametrize("argv", [
    ["examples", "{atlas}", f"L0N{LONG}"],
    ["examples", "{atlas}", f"L{LONG}N0"],
    ["show", "{atlas}", f"L0N{LONG}", "--stored"],
    ["show", "{atlas}", f"L{LONG}N0", "--stored"],
    ["show", "{atlas}", "L٠N١"],
])
def test_cli_refuses_such_ids_in_one_line(argv, atlas, capsys):
    assert main([a.format(atlas=atlas) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert "out of range: expected at most 9" in err or "in ASCII digits" in err, err


@pytest.mark.parametrize("option, value", [("--top-k", "٥"), ("--top-k", "5" * 5000)])
def test_integer_options_take_ascii_digits_only(option, value, capsys, tmp_path):
    assert main(["map", "-o", str(tmp_path / "o"), option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: argument {option}: ") and "\n" not in err and len(err) < 300, err
    assert ("is not an integer" if len(value) == 1 else "is out of range") in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("address", ["head:٦٣٧٩", "head:²", "head:" + LONG, "ray://head:99999"])
def test_ray_ports_take_ascii_digits_only(address):
    from neuronmap.mapping.distributed import check_address

    with pytest.raises(NeuronmapError, match=r"^malformed ray=.*: expected local, auto, HOST:PORT or ray://HOST:PORT"):
        check_address(address)


def test_leftover_temporaries_with_odd_pids_are_left_alone(tmp_path):
    from neuronmap.core.fsio import remove_stale

    odd = [tmp_path / f".atlas.{pid}-x.tmp" for pid in ("²", "٣", "9" * 30)]
    for p in odd:
        p.write_text("")
    assert remove_stale(tmp_path / "atlas") == [] and all(p.exists() for p in odd)
