"""model/manifest.py: the shared manifest format, its validation errors, and atomic writes."""
import json
import os
import re
import stat

import pytest

from model.manifest import (ManifestError, apply_umask, atomic_write, atomic_write_text, read_manifest, write_manifest,
                            replace_dir, write_split_dir)


def row(i, audio=None, **kw):
    return {"id": f"u{i}", "lang": "en", "text": f"wake me up at {i} am", "audio": audio,
            "scenario": "alarm", "action": "set", "entities": [{"type": "time", "filler": f"{i} am"}], **kw}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_written_rows_read_back_equal_with_extra_fields_kept(tmp_path):
    rows = [row(1, speaker="s7"), row(2, audio="/abs/clip.flac", corpus="x")]
    write_manifest(tmp_path / "m.jsonl", rows)
    assert read_manifest(tmp_path / "m.jsonl") == rows


def test_relative_audio_resolves_against_the_manifest_folder_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "d" / "audio").mkdir(parents=True)
    write_manifest(tmp_path / "d" / "m.jsonl", [row(1, audio="audio/a.ogg")])
    monkeypatch.chdir(tmp_path)
    got = read_manifest("d/m.jsonl")[0]["audio"]
    assert got == str((tmp_path / "d" / "audio" / "a.ogg").resolve())


def test_non_ascii_text_is_written_as_utf8_not_escaped(tmp_path):
    write_manifest(tmp_path / "m.jsonl", [row(1, text="réveille-moi à sept heures")])
    assert "réveille-moi à sept heures" in (tmp_path / "m.jsonl").read_text(encoding="utf-8")


@pytest.mark.parametrize("line, message", [
    ('{"id": "u1", "lang": "en"', "malformed JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_unparseable_line_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(row(1)), line])
    with pytest.raises(ManifestError, match=rf"m\.jsonl:2: {message}"):
        read_manifest(path)


@pytest.mark.parametrize("field", ["id", "lang", "text", "audio", "scenario", "action", "entities"])
def test_missing_required_field_is_named(tmp_path, field):
    bad = row(2)
    del bad[field]
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(row(1)), json.dumps(bad)])
    with pytest.raises(ManifestError, match=rf"m\.jsonl:2: missing required field '{field}'"):
        read_manifest(path)


@pytest.mark.parametrize("change, field, expected", [
    ({"text": 3}, "text", "expected a string"),
    ({"audio": 5}, "audio", "expected a string or null"),
    ({"scenario": ""}, "scenario", "non-empty"),
    ({"entities": {"type": "time"}}, "entities", "expected a list"),
    ({"entities": ["time"]}, "entities[0]", "expected an object"),
    ({"entities": [{"type": "time", "filler": 7}]}, "entities[0].filler", "non-empty string, got number"),
    ({"entities": [{"filler": "noon"}]}, "entities[0].type", "got missing"),
])
def test_mistyped_field_is_named_with_what_was_expected(tmp_path, change, field, expected):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({**row(1), **change})])
    with pytest.raises(ManifestError, match=rf"m\.jsonl:1: field '{re.escape(field)}'.*{expected}"):
        read_manifest(path)


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(row(1)), json.dumps(row(2)), json.dumps(row(1))])
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: field 'id': duplicate id 'u1' \(first on line 1\)"):
        read_manifest(path)


def test_empty_manifest_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(write_lines(tmp_path / "m.jsonl", []))


def test_missing_audio_is_reported_only_when_asked(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [row(1, audio="gone.ogg")])
    assert read_manifest(path)[0]["audio"].endswith("gone.ogg")
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: field 'audio': file not found"):
        read_manifest(path, check_audio_exists=True)


def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [row(1)])
    before = path.read_bytes()
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: missing required field 'action'"):
        write_manifest(path, [row(1), {k: v for k, v in row(2).items() if k != "action"}])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.jsonl"]


def test_split_dir_is_written_whole(tmp_path):
    out = tmp_path / "out"
    write_split_dir(out, {"train": [row(1), row(2)], "devel": [row(3)], "test": [row(4)]})
    assert sorted(os.listdir(out)) == ["devel.jsonl", "test.jsonl", "train.jsonl"]
    assert [r["id"] for r in read_manifest(out / "train.jsonl")] == ["u1", "u2"]


@pytest.mark.parametrize("splits, message", [
    ({"train": [row(1)], "devel": []}, "split 'devel' is empty"),
    ({"train": [row(1)], "devel": [row(2), {**row(3), "entities": None}]}, r"devel\.jsonl:2: field 'entities'"),
    ({"train": [row(1), row(1)]}, "duplicate id 'u1'"),
])
def test_split_dir_error_leaves_no_output_and_no_temp_folder(tmp_path, splits, message):
    with pytest.raises(ManifestError, match=message):
        write_split_dir(tmp_path / "out", splits)
    assert os.listdir(tmp_path) == []


def test_split_dir_replaces_an_earlier_output_but_refuses_other_folders(tmp_path):
    out = tmp_path / "out"
    write_split_dir(out, {"train": [row(1)], "devel": [row(2)]})
    write_split_dir(out, {"train": [row(5)]})
    assert os.listdir(out) == ["train.jsonl"]
    assert read_manifest(out / "train.jsonl")[0]["id"] == "u5"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the old copy is gone too
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ManifestError, match="holds files other than manifests"):
        write_split_dir(out, {"train": [row(6)]})
    assert (out / "notes.txt").read_text() == "mine"


def test_atomic_write_interrupted_midway_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    # The writer has already put half its bytes in the temp file when it is interrupted (Ctrl-C).
    path = tmp_path / "pred.jsonl"
    atomic_write_text(path, "old\n")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half a li")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["pred.jsonl"]


def test_atomic_write_output_is_readable_by_others_unlike_a_bare_mkstemp_file(tmp_path):
    path = tmp_path / "sub" / "table.md"  # missing folders are created
    atomic_write_text(path, "| a |\r\n")
    assert path.read_bytes() == b"| a |\r\n"  # written as given: no newline translation
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after (pytest runs tests in one thread)."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
                         ids=["umask-022", "umask-002", "umask-077"])
def test_atomic_write_gives_the_mode_the_umask_gives_a_plain_open(tmp_path, umask, mask, file_mode):
    umask(mask)
    atomic_write_text(tmp_path / "m.jsonl", "x\n")
    assert mode(tmp_path / "m.jsonl") == file_mode


def test_apply_umask_opens_a_mkdtemp_folder_like_mkdir_would(tmp_path, umask):
    import tempfile
    umask(0o027)
    tmp = tempfile.mkdtemp(dir=tmp_path)
    assert mode(tmp) == 0o700
    apply_umask(tmp)
    assert mode(tmp) == 0o750


def test_split_dir_folder_and_files_follow_the_umask_not_mkdtemp_privacy(tmp_path, umask):
    umask(0o022)
    write_split_dir(tmp_path / "out", {"train": [row(1)]})
    assert mode(tmp_path / "out") == 0o755
    assert mode(tmp_path / "out" / "train.jsonl") == 0o644


def test_non_utf8_line_is_a_manifest_error_naming_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps(row(1), ensure_ascii=False).encode()
    bad = json.dumps(row(2, text="perch\u00e9")).encode().replace(b"\\u00e9", b"\xe9")  # Latin-1 e-acute
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        read_manifest(path)


def test_replace_dir_swaps_a_folder_in_and_removes_the_old_one(tmp_path):
    out, new = tmp_path / "out", tmp_path / ".out.tmp"
    for folder, text in ((out, "old"), (new, "new")):
        folder.mkdir()
        (folder / "a.txt").write_text(text)
    replace_dir(new, out, aside=tmp_path / ".out.old")
    assert (out / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_go_in(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "never-written", out, aside=tmp_path / ".out.old")
    assert (out / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
