"""Shared by every layer, the nequip environment's included (so: nothing here imports more than pytest).

The helpers package (tests/helpers) is on the path through pyproject.toml's ``pythonpath``;
here pytest is told to rewrite its asserts, so a failing shared check reports its values as a
test's own assert does. Fixtures shared within a layer live in that layer's conftest.py.
"""

import pytest

pytest.register_assert_rewrite("helpers")
