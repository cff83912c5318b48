"""Finding a draft (loaders/draft_model.py): only finished builds of the known format count."""

from __future__ import annotations

import json

from treadle.loaders import draft_model
from treadle.loaders.draft_model import MARKER, find_draft, read_marker


def test_find_draft_needs_a_finished_build(tmp_path):
    assert find_draft(tmp_path) is None and read_marker(tmp_path) is None
    (tmp_path / MARKER).write_text(json.dumps({"format": draft_model.DRAFT_FORMAT, "x": 1}))
    assert find_draft(tmp_path) is None  # no config.json: not a model directory
    (tmp_path / "config.json").write_text("{}")
    assert find_draft(tmp_path) == tmp_path and read_marker(tmp_path)["x"] == 1


def test_other_formats_and_broken_markers_are_not_drafts(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / MARKER).write_text(json.dumps({"format": draft_model.DRAFT_FORMAT + 1}))
    assert find_draft(tmp_path) is None
    (tmp_path / MARKER).write_text('{"format": 1')  # truncated
    assert find_draft(tmp_path) is None
    (tmp_path / MARKER).write_text("[1]")
    assert read_marker(tmp_path) is None


def test_draft_dir_follows_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TREADLE_CACHE", str(tmp_path))
    assert draft_model.draft_dir() == tmp_path / "models" / draft_model.DRAFT_NAME
