"""The panel file: its layout, and verification of its content hash on load."""

from __future__ import annotations

import json

import pytest

from hitanno_cli import artifacts
from hitanno_cli.errors import UserError
from hitanno_cli.panel import Panel


def _fresh(path) -> Panel:
    """A panel read by the slow route: parsed whole, content re-serialised to check its hash."""
    return Panel.from_json(json.loads(path.read_text()), path)


def test_saved_panel_holds_its_content_in_the_hashed_text(small_panel, tmp_path) -> None:
    """save writes the content last, in canonical text; load checks the hash on those bytes."""
    panel = _fresh(small_panel)
    out = tmp_path / "p.json"
    panel.save(out)
    text = out.read_text()
    assert text.endswith(',"panel":' + artifacts.canonical_json(panel.body()) + "}\n")
    loaded = Panel.load(out)
    assert loaded.content_hash == panel.content_hash == artifacts.sha256_json(loaded.body())
    assert loaded.body() == panel.body() and loaded.header == panel.header


@pytest.mark.parametrize("layout", ["indented", "spaced", "compact, hash last"])
def test_other_layouts_load_through_the_canonical_form(small_panel, tmp_path, layout: str) -> None:
    """A re-formatted or re-ordered file (e.g. of an older version) still loads, same hash."""
    obj = json.loads(small_panel.read_text())
    if layout == "indented":
        text = json.dumps(obj, indent=2)
    elif layout == "spaced":  # json.dumps' default separators: how earlier versions wrote it
        text = json.dumps(obj)
    else:  # the content's key is found, but what follows it is not only the content
        obj = {"header": obj["header"], "panel": obj["panel"], "content_hash": obj["content_hash"]}
        text = json.dumps(obj, separators=(",", ":"))
        assert ',"panel":' in text
    (tmp_path / "p.json").write_text(text)
    assert Panel.load(tmp_path / "p.json").content_hash == _fresh(small_panel).content_hash


def test_an_edit_in_place_is_refused(small_panel, tmp_path) -> None:
    """Changing one peak name in the file's text, layout untouched, fails the hash check."""
    panel = _fresh(small_panel)
    name = panel.sets[0].names[0]
    edited = tmp_path / "p.json"
    edited.write_text(small_panel.read_text().replace(f'"{name}"', f'"{name}0"', 1))
    with pytest.raises(UserError, match="does not match its hash"):
        Panel.load(edited)
