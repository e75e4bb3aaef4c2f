"""common.workflows: yes/no settings, JSON and lists as they arrive from configs and the command line."""

from __future__ import annotations

import fire
import pytest

from common.workflows import command_line_json, command_line_list, flag


@pytest.mark.parametrize("value", [True, 1, "true", "True", "yes", "on", "1"])
def test_true_values(value):
    assert flag(value) is True


@pytest.mark.parametrize("value", [False, 0, "false", "False", "no", "off", "0"])
def test_false_values(value):
    assert flag(value) is False


def test_command_line_false_is_false():
    # fire hands `--x false` over as the string 'false', which plain Python treats as true
    received = fire.Fire(lambda x: x, command=["--x", "false"])
    assert received == "false" and bool(received) and flag(received) is False


@pytest.mark.parametrize("value", ["maybe", 2, None, ""])
def test_anything_else_is_an_error(value):
    with pytest.raises(ValueError, match="expected true or false"):
        flag(value)


def test_json_given_on_a_fire_command_line_keeps_its_booleans():
    """tools/benchmark.py tradeoff --settings and tools/tune_thresholds.py --overrides take JSON through fire."""
    from fire import parser

    command_line = '[{"test_time_flips": false, "scales": [1.0]}, {"test_time_flips": true}]'
    as_fire_passes_it = parser.DefaultParseValue(command_line)
    assert as_fire_passes_it[0]["test_time_flips"] == "false"  # what the tools must undo
    expected = [{"test_time_flips": False, "scales": [1.0]}, {"test_time_flips": True}]
    assert command_line_json(as_fire_passes_it) == expected
    assert command_line_json(command_line) == expected
    overrides = parser.DefaultParseValue('{"test_time_flips": true, "checkpoint": null, "roi_size": [256, 256]}')
    assert command_line_json(overrides) == {"test_time_flips": True, "checkpoint": None, "roi_size": [256, 256]}


def test_folder_lists_given_on_a_fire_command_line():
    """tools/make_datalist.py --train_dirs and tools/normalization_check.py --folders take lists of paths."""
    received = fire.Fire(lambda x: x, command=["--x", "[../shared/data/cellseg-dev,../shared/data/cellseg-ood-eval]"])
    assert isinstance(received, str)  # fire cannot parse the paths as Python literals
    assert command_line_list(received) == ["../shared/data/cellseg-dev", "../shared/data/cellseg-ood-eval"]
    assert command_line_list(fire.Fire(lambda x: x, command=["--x", "[mt2]"])) == ["mt2"]
    assert command_line_list("one/folder") == ["one/folder"]
    assert command_line_list(None) == []
    assert command_line_list(("a", "b")) == ["a", "b"]
