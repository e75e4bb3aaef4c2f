"""common.workflows.flag: yes/no settings as they arrive from configs and the command line."""

from __future__ import annotations

import fire
import pytest

from common.workflows import flag


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
