"""`jprag.io.write_json_atomic`: whole files only, and no write when nothing changed."""

import json
import os

from jprag.io import write_json_atomic


def test_rewrites_only_when_the_text_changes(tmp_path):
    path = tmp_path / "index.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]}, indent=1, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    os.utime(path, ns=(1, 1))  # a stamp no real write leaves behind

    write_json_atomic(path, {"a": [1, 2], "b": 1}, indent=1, sort_keys=True)  # same text
    assert path.stat().st_mtime_ns == 1, "an unchanged file was rewritten"

    write_json_atomic(path, {"a": [1, 2], "b": 2}, indent=1, sort_keys=True)
    assert json.loads(path.read_text())["b"] == 2 and path.stat().st_mtime_ns != 1
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"], "a temporary file was left behind"


def test_replaces_a_file_that_is_not_text(tmp_path):
    path = tmp_path / "meta.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    write_json_atomic(path, {"ok": True}, end="\n")
    assert path.read_text() == '{"ok": true}\n'
