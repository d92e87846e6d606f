"""Tests on a 2-node test swarm (the session's ``test_swarm`` fixture, tests/conftest.py): marked
``swarm`` and ``integration``; scripts/test runs them."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/swarm/" in str(item.fspath):
            item.add_marker(pytest.mark.swarm)
            item.add_marker(pytest.mark.integration)
