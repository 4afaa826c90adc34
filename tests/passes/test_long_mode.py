"""The example counts of the property tests (long_mode): CI counts unless NORMFOLD_LONG says otherwise."""

import pytest

from long_mode import LONG_EXAMPLES, examples


@pytest.mark.parametrize("value,expected", [(None, 200), ("", 200), ("0", 200), ("1", LONG_EXAMPLES), ("2500", 2500)])
def test_examples(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("NORMFOLD_LONG", raising=False)
    else:
        monkeypatch.setenv("NORMFOLD_LONG", value)
    assert examples(200) == expected


@pytest.mark.parametrize("value", ["yes", "-5", "1e4"])
def test_a_value_that_is_not_a_count_is_refused(monkeypatch, value):
    monkeypatch.setenv("NORMFOLD_LONG", value)
    with pytest.raises(ValueError, match="NORMFOLD_LONG"):
        examples(200)
