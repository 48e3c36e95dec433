"""The manifest format every stage shares: one JSON object per line, one utterance-label pair per row.

    {"id": "slurp-9054", "lang": "en", "text": "event reminder mona tuesday", "audio": null,
     "scenario": "calendar", "action": "set",
     "entities": [{"type": "event_name", "filler": "mona"}, {"type": "date", "filler": "tuesday"}]}

A row whose `audio` is a path is a speech-label pair (the transcript stays in `text` for oracle runs);
`"audio": null` makes it a transcript-label pair. Extra fields (speaker, corpus, split, ...) are kept
as they are. A relative `audio` path is relative to the manifest file's own directory, so a folder
holding a manifest and its audio can be moved as a whole.

Everything that reads or writes manifests goes through this file, so a malformed row fails here with
the file, line and field named, not three stages later as a KeyError inside a training step.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

# Required fields and the JSON types they must have. `audio` may also be null.
REQUIRED_FIELDS: dict[str, type] = {
    "id": str,
    "lang": str,
    "text": str,
    "audio": str,
    "scenario": str,
    "action": str,
    "entities": list,
}
SPLITS = ("train", "devel", "test")


class ManifestError(ValueError):
    """Bad input data. The message names the file, line and field and says what was expected."""


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for every non-blank line of a JSONL file (line numbers from 1)."""
    path = Path(path)
    try:
        f = open(path, "rb")  # decoded line by line, so a bad byte is reported with its line
    except OSError as e:
        raise ManifestError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte "
                                    f"{e.start + 1} of the line); manifests are UTF-8 text") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _type_name(value: Any) -> str:
    return "null" if value is None else {str: "string", list: "list", dict: "object", bool: "boolean",
                                         int: "number", float: "number"}.get(type(value), type(value).__name__)


def validate_row(row: Any, where: str) -> None:
    """Raise ManifestError (prefixed by `where`, e.g. "train.jsonl:12") unless `row` is a valid row."""
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {_type_name(row)}")
    for name, kind in REQUIRED_FIELDS.items():
        if name not in row:
            raise ManifestError(f"{where}: missing required field '{name}'")
        value = row[name]
        if name == "audio" and value is None:
            continue
        if not isinstance(value, kind):
            expected = "a string or null" if name == "audio" else f"a {_type_name(kind())}"
            raise ManifestError(f"{where}: field '{name}': expected {expected}, got {_type_name(value)}")
        # Empty labels are never meaningful; an empty text or audio path is a bug upstream.
        if kind is str and not value.strip():
            raise ManifestError(f"{where}: field '{name}': expected a non-empty string")
    for i, ent in enumerate(row["entities"]):
        field = f"entities[{i}]"
        if not isinstance(ent, dict):
            raise ManifestError(f"{where}: field '{field}': expected an object {{\"type\", \"filler\"}}, "
                                f"got {_type_name(ent)}")
        for key in ("type", "filler"):
            if not isinstance(ent.get(key), str) or not ent[key].strip():
                got = "missing" if key not in ent else _type_name(ent[key])
                raise ManifestError(f"{where}: field '{field}.{key}': expected a non-empty string, got {got}")


def read_manifest(path: str | os.PathLike, *, check_audio_exists: bool = False) -> list[dict]:
    """Read and validate a manifest. Relative audio paths come back absolute (resolved against the
    manifest's directory). Errors: malformed JSON, a missing or mistyped field, a duplicate id, an
    empty file, and (with check_audio_exists) an audio file that is not there."""
    path = Path(path)
    base = path.resolve().parent
    rows, seen = [], {}
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        validate_row(row, where)
        if row["id"] in seen:
            raise ManifestError(f"{where}: field 'id': duplicate id {row['id']!r} (first on line {seen[row['id']]})")
        seen[row["id"]] = lineno
        if row["audio"] is not None:
            audio = Path(row["audio"])
            row["audio"] = str(audio if audio.is_absolute() else base / audio)
            if check_audio_exists and not os.path.isfile(row["audio"]):
                raise ManifestError(f"{where}: field 'audio': file not found: {row['audio']}")
        rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: no rows (an empty manifest is never useful; check the split)")
    return rows


def _check_rows(rows: Iterable[dict], name: str) -> list[dict]:
    rows = list(rows)
    seen = {}
    for i, row in enumerate(rows, 1):
        validate_row(row, f"{name}:{i}")
        if row["id"] in seen:
            raise ManifestError(f"{name}:{i}: field 'id': duplicate id {row['id']!r} (first in row {seen[row['id']]})")
        seen[row["id"]] = i
    return rows


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status).
    The fallback sets and restores it, which other threads could observe for that instant."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` the permissions a plain open() / mkdir() would have: 0o666 (file) or 0o777 (folder)
    less the umask. mkstemp / mkdtemp create 0600 / 0700, and those survive the rename onto the final
    name, so everything written through a temp name calls this before its rename."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~_current_umask())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` to fill a temp file in `path`'s folder, then rename it onto `path`.

    Every file the stages write (manifests, predictions, configs, tables, figures, the tokenizer cache)
    goes through here: a reader never sees half a file, and a failure (or Ctrl-C) leaves the old file,
    if any, untouched and no temp file behind. Same folder, so the rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp)  # mkstemp makes it private; outputs are meant to be read like any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_dir(new: Path, out: Path, aside: Path) -> None:
    """Rename the finished folder `new` to `out`, the folder counterpart of atomic_write. An existing `out` is first
    renamed to `aside` (a free name on the same file system) and deleted once `new` is in place: POSIX cannot rename
    a folder onto a non-empty one. If the second rename fails, the old `out` is put back; a crash between the two
    renames leaves it complete at `aside`."""
    if not out.exists():
        os.replace(new, out)
        return
    os.replace(out, aside)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` for a UTF-8 text file, written as given (no newline translation)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    atomic_write(path, write)


def jsonl_text(rows: Iterable[dict]) -> str:
    """One JSON object per line, non-ASCII kept as is (the manifest and prediction format)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_manifest(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Validate `rows` and write them to `path` atomically (see `atomic_write`)."""
    atomic_write_text(path, jsonl_text(_check_rows(rows, str(path))))


def write_split_dir(out_dir: str | os.PathLike, splits: dict[str, list[dict]]) -> None:
    """Write `{split}.jsonl` for every split into `out_dir`, all or nothing.

    Everything is validated first (an empty split is an error) and written into a temporary sibling
    folder, which is then renamed to `out_dir`. An existing `out_dir` is replaced only if it holds
    nothing but .jsonl files (an earlier run's output); anything else there is refused rather than
    deleted. On any error no `out_dir` is left behind (or the old one is left as it was).
    """
    out_dir = Path(out_dir)
    checked = {}
    for split, rows in splits.items():
        rows = _check_rows(rows, f"{out_dir / split}.jsonl")
        if not rows:
            raise ManifestError(f"{out_dir / split}.jsonl: split '{split}' is empty (no rows to write)")
        checked[split] = rows
    if not checked:
        raise ManifestError(f"{out_dir}: no splits to write")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ManifestError(f"{out_dir}: exists and is not a directory")
        others = [p.name for p in out_dir.iterdir() if not (p.is_file() and p.suffix == ".jsonl")]
        if others:
            raise ManifestError(f"{out_dir}: exists and holds files other than manifests ({', '.join(sorted(others)[:5])});"
                                " refusing to replace it: choose another --out or empty it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        apply_umask(tmp)  # mkdtemp's 0700 would survive the rename
        for split, rows in checked.items():
            (tmp / f"{split}.jsonl").write_text(jsonl_text(rows), encoding="utf-8")
        replace_dir(tmp, out_dir, aside=tmp.with_suffix(".old"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
