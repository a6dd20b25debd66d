"""Fixtures shared by the service unit tests."""

from __future__ import annotations

import pytest

from tests.unit.service.test_authn import Keys, new_keys


@pytest.fixture(scope="module")
def keys() -> Keys:
    """The IdP's signing keys, one pair per test module (``test_authn.new_keys``)."""
    return new_keys()
