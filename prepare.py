"""Stage 1: turn a corpus as distributed into sluice manifests, DIR/{train,devel,test}.jsonl.

    python prepare.py demo   --out data/prepared/demo                # the bundled corpus (train.py's default)
    python prepare.py demo   --regenerate                            # rebuild data/demo/ with espeak-ng
    python prepare.py synth  --manifest DIR/train.jsonl --out DIR/synth  # espeak-ng speech of the transcripts
    python prepare.py slurp  --annotations slurp/dataset/slurp --audio-dir slurp_real --out DIR
    python prepare.py massive --massive-dir amazon-massive-dataset-1.1 --locales fr-FR de-DE --out DIR
    python prepare.py speech-massive --speech-massive-dir Speech-MASSIVE --locales fr-FR --out DIR
    python prepare.py italic --italic-dir ITALIC/massive --massive-dir amazon-massive-dataset-1.1 --out DIR

The manifest format is model/manifest.py's: one JSON object per line with id, lang, text, audio (a path,
or null for a transcript-label pair), scenario, action, entities [{type, filler}]. Every utterance gives
one transcript row (audio null); every recording gives one speech row carrying the same labels and,
in `utt_id`, the id of its transcript row. `lang` is the ISO 639-1 code ("en", "fr", ...); the full
locale, where the corpus has one, is kept in `locale`.

Per corpus:
  slurp           the release's {train,devel,test}.jsonl, real recordings only (train_synthetic.jsonl is not
                  read). Transcript ids are `slurp-<slurp_id>`; a speech row's id is its recording's file
                  name, which is how the official SLURP scorer keys predictions. Entity fillers are formed as
                  the official scorer forms gold (scripts/evaluation/util.py, release2prediction): the
                  lower-cased surfaces of the span's tokens, joined by single spaces.
  massive         MASSIVE 1.1, one {locale}.jsonl per locale (fields id, locale, partition, scenario,
                  intent, utt, annot_utt); transcripts only. Partitions train/dev/test -> train/devel/test.
  speech-massive  Speech-MASSIVE as the Hugging Face repositories ship it: DIR/<locale>/<split>-*.parquet for
                  split train (fr-FR and de-DE only), train_115 (the 115-utterance few-shot split) and
                  validation; test is the separate (gated) FBK-MT/Speech-MASSIVE-test repository, whose
                  <locale>/test-*.parquet go into the same DIR/<locale>/ folders. Also read, per split:
                  a `datasets` save_to_disk folder DIR/<locale>/<split>/data-*.arrow, or a JSONL export
                  DIR/<locale>/<split>.jsonl (the dataset's row with "audio" the path of the recording,
                  relative to the jsonl's folder; its audio is read in place). Labels are the *_str columns
                  and annot_utt; --few-shot takes train from train_115. The "all" folder is not read (it
                  repeats the locales).
  italic          ITALIC, one configuration (massive, hard_speaker or hard_noisy) in DIR:
                  {train,validation,test}-*.parquet, {split}/*.parquet (the Hub's parquet conversion),
                  {split}/data-*.arrow (save_to_disk) or {split}.jsonl (JSONL export as above), with the
                  documented columns utt, intent (a name, or a ClassLabel index), audio, speaker, ... and
                  no id. ITALIC has no slot markup, so annot_utt and the scenario are joined from MASSIVE
                  it-IT (--massive-dir): by `id` where a row has one, else by the utterance text compared
                  after normalising case, accents, apostrophes, punctuation and spaces. Where MASSIVE has
                  that text several times with different labels (ambiguous), the row takes the one with
                  its own intent, then the one with its exact text, then the one in the MASSIVE partition
                  of its split, then the first in the file; the summary counts each rule. ITALIC's intent
                  must equal the joined row's: every disagreement is listed and stops the run. Rows not
                  in MASSIVE stop it too (the first listed), unless --skip-unjoined drops them, counted.
                  Speech row ids are italic-<config>-<split>-<row index>-<audio file name>, <config>
                  being DIR's name; transcript rows are one per id, or without ids one per ITALIC row
                  (ITALIC records each MASSIVE utterance once) with id italic-<config>-<split>-<row index>.
  demo            the small English/French corpus bundled in data/demo/ (see its README.md).

Audio from parquet/arrow rows (the struct {bytes, path} that `datasets` stores for an Audio column) is
written once, its encoded bytes unchanged, to OUT/audio/<corpus>/<locale>/<name>, the name being the
basename of the row's `path` (numbered -1, -2, ... where two rows share one); the manifests refer to it
relative to OUT, so OUT can be moved as a whole. It is written into a temporary sibling of OUT that is
renamed to OUT only when everything has been read and checked. An existing OUT is replaced only if it
holds nothing but an earlier run's output (*.jsonl and audio/<corpus>/). Bad rows are named by file and
row index (from 0 within that parquet/arrow file, as pyarrow and `datasets` count them).
Audio given as paths (SLURP, JSONL exports): by default each path must exist; missing files are an
error that lists the first few and the count, unless --skip-missing-audio (those speech rows are then
dropped and counted per split, with a warning for a split left with no recordings at all). --check-audio
decodes every file and prints duration statistics; hours of audio are "?" without it.
Bad input (malformed JSON, a missing field, bad annot_utt markup, an entity span outside the tokens, a
duplicate id, an empty split, an undecodable audio file) stops the run with the file, line and field
named, and leaves no output directory behind.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.signal import resample_poly

from model.manifest import (SPLITS, ManifestError, apply_umask, iter_jsonl, read_manifest, replace_dir,
                            validate_row, write_manifest, write_split_dir)

DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"


# ----------------------------------------------------------------------------------------------------
# Collecting rows: every row remembers where it came from, so later checks (duplicate ids, missing or
# undecodable audio) can name the source file and line, not a line of a file we have not written yet.

class Rows:
    def __init__(self):
        self.splits: dict[str, list[dict]] = {}
        self.where: dict[str, str] = {}  # row id -> "file:line" of its source
        self.notes: list[str] = []       # printed under the summary (joins, dropped rows, ...)
        self.sources: dict[str, list[str]] = {}  # split -> files read for it, named if it ends up empty

    def source(self, split: str, path) -> None:
        self.sources.setdefault(split, []).append(str(path))

    def add(self, split: str, row: dict, where: str) -> None:
        validate_row(row, where)
        if row["id"] in self.where:
            raise ManifestError(f"{where}: field 'id': duplicate id {row['id']!r} (first at {self.where[row['id']]})")
        self.where[row["id"]] = where
        self.splits.setdefault(split, []).append(row)


def lang_of(locale: str) -> str:
    return locale.split("-")[0].split("_")[0].lower()


def need(obj: dict, field: str, kind: type | tuple, where: str):
    """obj[field], which must exist and be of type `kind`; else an error naming where and the field."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected an object with field '{field}', got {type(obj).__name__}")
    if field not in obj:
        raise ManifestError(f"{where}: missing required field '{field}'")
    value = obj[field]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}: field '{field}': expected {names}, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------------
# MASSIVE's slot markup: "wake me up at [time : five am] [date : tomorrow]". The parser keeps the text
# between markup verbatim, so render(parse(s)) == s: nothing is normalised away silently.

ENTITY_TYPE = re.compile(r"[a-z][a-z0-9_]*\Z")


def parse_annot(s: str, where: str = "annot_utt") -> list:
    """Split annot_utt into segments: plain strings and (type, filler) pairs."""
    segments, i = [], 0
    while i < len(s):
        open_at, close_at = s.find("[", i), s.find("]", i)
        if close_at != -1 and (open_at == -1 or close_at < open_at):
            raise ManifestError(f"{where}: field 'annot_utt': unbalanced ']' at character {close_at} in {s!r}")
        if open_at == -1:
            segments.append(s[i:])
            break
        if open_at > i:
            segments.append(s[i:open_at])
        nested = s.find("[", open_at + 1)
        if close_at == -1 or (nested != -1 and nested < close_at):
            raise ManifestError(f"{where}: field 'annot_utt': unbalanced '[' at character {open_at} in {s!r}")
        body = s[open_at + 1:close_at]
        etype, sep, filler = body.partition(" : ")
        if not sep or not ENTITY_TYPE.match(etype) or not filler.strip():
            raise ManifestError(f"{where}: field 'annot_utt': unknown markup [{body}] in {s!r}; "
                                "expected [type : filler] with a lower-case type")
        segments.append((etype, filler))
        i = close_at + 1
    return segments


def render_annot(segments: list) -> str:
    return "".join(seg if isinstance(seg, str) else f"[{seg[0]} : {seg[1]}]" for seg in segments)


def annot_text(segments: list) -> str:
    return "".join(seg if isinstance(seg, str) else seg[1] for seg in segments)


def annot_entities(segments: list) -> list[dict]:
    return [{"type": seg[0], "filler": seg[1]} for seg in segments if not isinstance(seg, str)]


def massive_labels(rec: dict, where: str, annot: str | None = None) -> dict:
    """scenario, action, entities and text of a MASSIVE-style record (MASSIVE, Speech-MASSIVE, ITALIC).
    Speech-MASSIVE stores scenario/intent as class indices with the names in *_str fields."""
    scenario = rec.get("scenario_str", rec.get("scenario"))
    intent = rec.get("intent_str", rec.get("intent"))
    for field, value in (("scenario", scenario), ("intent", intent)):
        if not isinstance(value, str) or not value:
            raise ManifestError(f"{where}: field '{field}': expected the label name (a string), got {value!r}")
    if not intent.startswith(scenario + "_"):
        raise ManifestError(f"{where}: field 'intent': {intent!r} does not start with scenario {scenario!r} + '_'")
    segments = parse_annot(annot if annot is not None else need(rec, "annot_utt", str, where), where)
    return {"text": need(rec, "utt", str, where), "scenario": scenario, "action": intent[len(scenario) + 1:],
            "entities": annot_entities(segments), "_annot_text": annot_text(segments)}


def checked_labels(rec: dict, where: str) -> dict:
    """massive_labels, insisting that annot_utt without its markup is the utterance (else the markup is
    misplaced or belongs to another utterance)."""
    labels = massive_labels(rec, where)
    annot = labels.pop("_annot_text")
    if annot != labels["text"]:
        raise ManifestError(f"{where}: field 'annot_utt': its text {annot!r} differs from utt {labels['text']!r}")
    return labels


# ----------------------------------------------------------------------------------------------------
# SLURP

def slurp_entities(ex: dict, where: str) -> list[dict]:
    """Gold entities exactly as the official scorer forms them: lower-cased token surfaces of the span
    joined by spaces (so "Jessica's" becomes "jessica 's" where the tokens split it)."""
    tokens = need(ex, "tokens", list, where)
    out = []
    for i, ent in enumerate(need(ex, "entities", list, where)):
        field = f"entities[{i}]"
        span = need(ent, "span", list, f"{where}: {field}")
        etype = need(ent, "type", str, f"{where}: {field}")
        if not span:
            raise ManifestError(f"{where}: field '{field}.span': empty span")
        for k in span:
            if not isinstance(k, int) or not 0 <= k < len(tokens):
                raise ManifestError(f"{where}: field '{field}.span': token index {k!r} outside the "
                                    f"{len(tokens)} tokens (0..{len(tokens) - 1})")
        surfaces = [need(tokens[k], "surface", str, f"{where}: tokens[{k}]") for k in span]
        out.append({"type": etype, "filler": " ".join(s.lower() for s in surfaces)})
    return out


def load_slurp(annotations: Path, audio_dir: Path, splits: list[str]) -> Rows:
    rows = Rows()
    for split in splits:
        path = annotations / f"{split}.jsonl"
        if not path.is_file():
            raise ManifestError(f"{path}: not found (expected the SLURP release's {split}.jsonl in --annotations)")
        rows.source(split, path)
        for lineno, ex in iter_jsonl(path):
            where = f"{path}:{lineno}"
            slurp_id = need(ex, "slurp_id", (int, str), where)
            labels = {"scenario": need(ex, "scenario", str, where), "action": need(ex, "action", str, where),
                      "entities": slurp_entities(ex, where)}
            utt_id = f"slurp-{slurp_id}"
            common = {"lang": "en", "text": need(ex, "sentence", str, where), **labels,
                      "corpus": "slurp", "slurp_id": slurp_id}
            rows.add(split, {"id": utt_id, "audio": None, **common}, where)
            for j, rec in enumerate(need(ex, "recordings", list, where)):
                name = need(rec, "file", str, f"{where}: recordings[{j}]")
                rows.add(split, {"id": name, "audio": str(audio_dir / name), **common, "utt_id": utt_id}, where)
    return rows


# ----------------------------------------------------------------------------------------------------
# MASSIVE, Speech-MASSIVE, ITALIC

MASSIVE_PARTITIONS = {"train": "train", "dev": "devel", "test": "test"}


def massive_files(massive_dir: Path, locales: list[str] | None) -> list[Path]:
    data = massive_dir / "data" if (massive_dir / "data").is_dir() else massive_dir
    if locales:
        files = [data / f"{loc}.jsonl" for loc in locales]
        for f in files:
            if not f.is_file():
                raise ManifestError(f"{f}: not found (expected MASSIVE's {f.stem}.jsonl under {data})")
        return files
    files = sorted(data.glob("*.jsonl"))
    if not files:
        raise ManifestError(f"{data}: no <locale>.jsonl files (expected the MASSIVE 1.1 release's data folder)")
    return files


def load_massive(massive_dir: Path, locales: list[str] | None) -> Rows:
    rows = Rows()
    for path in massive_files(massive_dir, locales):
        for split in SPLITS:
            rows.source(split, path)
        for lineno, rec in iter_jsonl(path):
            where = f"{path}:{lineno}"
            locale = need(rec, "locale", str, where)
            partition = need(rec, "partition", str, where)
            if partition not in MASSIVE_PARTITIONS:
                raise ManifestError(f"{where}: field 'partition': expected one of {sorted(MASSIVE_PARTITIONS)}, "
                                    f"got {partition!r}")
            labels = checked_labels(rec, where)
            rows.add(MASSIVE_PARTITIONS[partition],
                     {"id": f"massive-{locale}-{need(rec, 'id', (str, int), where)}", "lang": lang_of(locale),
                      "audio": None, **labels, "locale": locale, "corpus": "massive"}, where)
    return rows


# Speech-MASSIVE and ITALIC come as the Hugging Face `datasets` library stores them: parquet shards
# (<split>-00000-of-00009.parquet, or <split>/0000.parquet as the Hub's parquet converter writes them), or
# a save_to_disk folder (<split>/data-00000-of-00001.arrow, Arrow IPC stream files). Either way the audio
# column is a struct {bytes: the encoded file, path: its original name}. Each clip's bytes are written,
# unchanged, to <out>/audio/<corpus>/<locale>/<name> while the rows are read; that folder is the temporary
# sibling of --out that is renamed into place at the end, so a failed run leaves neither audio nor manifests.

def columnar_files(folder: Path, split: str) -> list[Path]:
    """The parquet or arrow shards of one split in `folder`, in shard order."""
    files = sorted(folder.glob(f"{split}-*.parquet")) or sorted((folder / split).glob("*.parquet"))
    if files or not (folder / split).is_dir():
        return files
    state = folder / split / "state.json"  # save_to_disk lists its shards in order here
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{state}: expected datasets' save_to_disk state with '_data_files' ({e})") from None
        return [folder / split / n for n in names]
    return sorted((folder / split).glob("data-*.arrow"))


def class_label_names(schema, path: Path) -> dict[str, list[str]]:
    """column -> label names for the columns `datasets` stores as ClassLabel (an integer index). The
    feature types travel in the schema metadata (key b"huggingface"), or, for save_to_disk, also in the
    folder's dataset_info.json."""
    info, source = None, path
    try:
        if schema.metadata and b"huggingface" in schema.metadata:
            info = json.loads(schema.metadata[b"huggingface"]).get("info", {})
        elif (path.parent / "dataset_info.json").is_file():
            source = path.parent / "dataset_info.json"
            info = json.loads(source.read_text(encoding="utf-8"))
    except (ValueError, AttributeError) as e:
        raise ManifestError(f"{source}: unreadable `datasets` feature metadata ({e})") from None
    features = (info or {}).get("features") or {}
    if not isinstance(features, dict):  # not the {name: {"_type": ...}} form datasets writes: no labels
        return {}
    return {name: f["names"] for name, f in features.items()
            if isinstance(f, dict) and f.get("_type") == "ClassLabel" and "names" in f}


def iter_columnar(path: Path, required: tuple[str, ...], columns: tuple[str, ...] | None = None):
    """(row index in this file, from 0, as datasets indexes a shard; record) for each row of a parquet or
    arrow file, ClassLabel indices replaced by their names. Reads a few hundred rows at a time: a
    Speech-MASSIVE shard holds ~400 MB of audio. With `columns`, records hold only those of them the
    file has (a text-only pass that leaves the audio unread)."""
    try:
        if path.suffix == ".parquet":
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            keep = None if columns is None else [c for c in columns if c in schema.names]
            batches = pf.iter_batches(batch_size=256, columns=keep)
        else:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))  # save_to_disk writes the stream format
            schema = reader.schema
            keep = None if columns is None else [c for c in columns if c in schema.names]
            batches = reader if keep is None else (batch.select(keep) for batch in reader)
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"{path}: cannot read it as {path.suffix[1:]}: {e}") from None
    for column in required:
        if column not in schema.names:
            raise ManifestError(f"{path}: missing column '{column}' (it has: {', '.join(schema.names)})")
    labels = class_label_names(schema, path)
    k = 0
    try:
        for batch in batches:
            for rec in batch.to_pylist():
                for column, names in labels.items():
                    if isinstance(rec.get(column), int) and 0 <= rec[column] < len(names):
                        rec[column] = names[rec[column]]
                yield k, rec
                k += 1
    except pa.ArrowException as e:
        raise ManifestError(f"{path}: row {k}: cannot read: {e}") from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        pass
    return True


def stage_dir(out: Path, suffix: str = "") -> Path:
    """A new temporary sibling of `out` (.NAME.PID.RANDOM+suffix) to build it in, after removing the ones a killed
    prepare.py left behind (a corpus's worth of audio each): those whose process is gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    ours = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.[a-z0-9_]{{8}}(\.tmp|\.old)?")  # mkdtemp's 8 characters
    for p in out.parent.iterdir():
        m = ours.fullmatch(p.name)
        if m and p.is_dir() and int(m[1]) != os.getpid() and not _process_alive(int(m[1])):
            shutil.rmtree(p, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=suffix, dir=out.parent))


AUDIO_MAGIC = {b"RIFF": ".wav", b"fLaC": ".flac", b"OggS": ".ogg", b"ID3": ".mp3"}


class AudioStage:
    """The temporary sibling of --out that becomes --out: audio from parquet/arrow rows is written here
    as it is read (a corpus does not fit in memory), the manifests last, then one rename."""

    def __init__(self, out: Path):
        self.out, self.dir, self.taken = out, None, set()

    def write(self, corpus: str, locale: str, name: str, data: bytes) -> str:
        if self.dir is None:
            self.dir = stage_dir(self.out, ".tmp")
        folder = self.dir / "audio" / corpus / locale
        stem, suffix = os.path.splitext(name)
        n = 0
        while (folder / name) in self.taken:  # the same file name in two rows: keep both, numbered
            n += 1
            name = f"{stem}-{n}{suffix}"
        folder.mkdir(parents=True, exist_ok=True)
        self.taken.add(folder / name)
        (folder / name).write_bytes(data)
        return str(folder / name)

    def drop(self, path: str) -> None:
        """Delete one clip written here (a path outside the stage, e.g. a JSONL export's file, is left alone)."""
        if self.dir is not None and path.startswith(str(self.dir) + os.sep):
            os.unlink(path)

    def discard(self) -> None:
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


def staged_audio(rec: dict, where: str, k: int, corpus: str, locale: str, stage: AudioStage) -> str:
    """Write one row's encoded audio into the stage; returns its path there. A row without bytes whose
    path is a local file (a dataset built from local files, never embedded) is copied from that file; a
    row with neither gives its path back, which the audio check then reports as missing."""
    audio = rec.get("audio")
    if not isinstance(audio, dict):
        got = "missing" if "audio" not in rec else type(audio).__name__
        raise ManifestError(f"{where}: field 'audio': expected the struct {{bytes, path}} that datasets stores "
                            f"for an Audio column, got {got}")
    data, src = audio.get("bytes"), audio.get("path")
    if data is None:
        if not src:
            raise ManifestError(f"{where}: field 'audio': neither bytes nor path")
        if not os.path.isfile(src):
            return src
        data = Path(src).read_bytes()
    name = Path(src).name if src else ""
    if name in ("", ".", ".."):  # no usable original name: the row index, and an extension from the file's magic bytes
        name = f"row{k}" + next((ext for magic, ext in AUDIO_MAGIC.items() if data.startswith(magic)), ".bin")
    return stage.write(corpus, locale, name, data)


def audio_path(rec: dict, where: str, base: Path) -> str:
    audio = rec.get("audio")
    if not isinstance(audio, str) or not audio:
        got = "missing" if "audio" not in rec else type(audio).__name__
        raise ManifestError(f"{where}: field 'audio': expected the path of the recording (a string), got {got}"
                            " (decoded arrays are not read: export audio to files)")
    return str(base / audio) if not os.path.isabs(audio) else audio


def add_speech_rows(rows: Rows, split: str, recs, corpus: str, locale: str) -> None:
    """One transcript row per utterance id and one speech row per recording, for Speech-MASSIVE."""
    seen_utt = set()
    for where, rec, audio in recs:
        labels = checked_labels(rec, where)
        utt_id = f"{corpus}-{locale}-{need(rec, 'id', (str, int), where)}"
        common = {"lang": lang_of(locale), **labels, "locale": locale, "corpus": corpus}
        if utt_id not in seen_utt:
            seen_utt.add(utt_id)
            rows.add(split, {"id": utt_id, "audio": None, **common}, where)
        speaker = rec.get("speaker_id")
        rows.add(split, {"id": f"{corpus}-{locale}-{Path(audio).name}", "audio": audio, **common,
                         "utt_id": utt_id, **({"speaker": str(speaker)} if speaker is not None else {})}, where)


def read_export(path: Path):
    """(where, record, absolute audio path) for each line of a JSONL export."""
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        yield where, rec, audio_path(rec, where, path.parent)


def read_columnar(files: list[Path], required: tuple[str, ...], corpus: str, locale: str, stage: AudioStage):
    """(where, record, staged audio path) for each row of a split's parquet/arrow shards."""
    for path in files:
        for k, rec in iter_columnar(path, required):
            where = f"{path}: row {k}"
            yield where, rec, staged_audio(rec, where, k, corpus, locale, stage)


def split_records(rows: Rows, split: str, folder: Path, name: str, required: tuple[str, ...],
                  corpus: str, locale: str, stage: AudioStage):
    """The records of split `name` in `folder`: {name}.jsonl (the export form) if present, else its
    parquet/arrow shards; None if neither is there."""
    if (folder / f"{name}.jsonl").is_file():
        rows.source(split, folder / f"{name}.jsonl")
        return read_export(folder / f"{name}.jsonl")
    files = columnar_files(folder, name)
    if not files:
        return None
    for f in files:
        rows.source(split, f)
    return read_columnar(files, required, corpus, locale, stage)


SPEECH_MASSIVE_COLUMNS = ("id", "utt", "annot_utt", "audio")


def load_speech_massive(root: Path, locales: list[str] | None, few_shot: bool, stage: AudioStage) -> Rows:
    if not root.is_dir():
        raise ManifestError(f"{root}: --speech-massive-dir is not a folder (expected Speech-MASSIVE's <locale>/ folders)")
    # "all" on the Hub is the union of the locale folders: reading it too would duplicate every row.
    locales = locales or sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "all")
    if not locales:
        raise ManifestError(f"{root}: no <locale>/ folders (expected Speech-MASSIVE as described in --help)")
    rows = Rows()
    sources = {"train": "train_115" if few_shot else "train", "devel": "validation", "test": "test"}
    for locale in locales:
        for split, name in sources.items():
            folder = root / locale
            recs = split_records(rows, split, folder, name, SPEECH_MASSIVE_COLUMNS, "speech-massive", locale, stage)
            if recs is None:
                hint = {"train": "; only fr-FR and de-DE have a full train split: try --few-shot",
                        "test": "; the test split is the separate FBK-MT/Speech-MASSIVE-test dataset: put its "
                                f"{locale}/test-*.parquet in this folder"}.get(name, "")
                raise ManifestError(f"{folder}: Speech-MASSIVE {locale} split '{name}' not found (looked for "
                                    f"{name}.jsonl, {name}-*.parquet, {name}/*.parquet, {name}/data-*.arrow{hint})")
            add_speech_rows(rows, split, recs, "speech-massive", locale)
    if few_shot:
        rows.notes.append("train = Speech-MASSIVE train_115 (few-shot split)")
    return rows


# ITALIC is MASSIVE it-IT read aloud: one recording per MASSIVE utterance (16,521 = 11,514 + 2,033 +
# 2,974), with the intent but without the slot markup, and, as distributed, without an id. The markup
# (and the scenario) is therefore joined from MASSIVE it-IT: by id where an export carries one, else by
# the utterance text. The join reads the text columns only, so every problem is reported at once before
# any audio is copied.

ITALIC_COLUMNS = ("utt", "intent", "audio")  # `id` is optional: the dataset as documented has none
ITALIC_TEXT_COLUMNS = ("id", "utt", "intent")
ITALIC_SPLITS = {"train": "train", "devel": "validation", "test": "test"}
SHOWN = 10  # problem rows listed in an error, and ambiguous rows in the summary notes


def join_key(text: str) -> str:
    """The utterance as the text join compares it: case-folded, accents removed, and only letters and
    digits kept. So capitals ("È" / "è"), decomposed accents, accents typed as an apostrophe ("perche'"),
    typographic apostrophes, elisions written with or without a space ("dell'" / "dell' "), punctuation
    and repeated spaces, all of which MASSIVE's and ITALIC's `utt` may differ in, do not break a join."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if c.isalnum())


class MassiveItalian:
    """MASSIVE it-IT's rows (labels checked against their own utt), found by id or by join_key."""

    def __init__(self, massive_dir: Path):
        self.path, = massive_files(massive_dir, ["it-IT"])
        self.by_id, self.by_key = {}, {}
        for lineno, rec in iter_jsonl(self.path):
            where = f"{self.path}:{lineno}"
            mid = str(need(rec, "id", (str, int), where))
            m = {"id": mid, "where": where, "line": lineno,
                 "partition": MASSIVE_PARTITIONS.get(rec.get("partition")), **checked_labels(rec, where)}
            m["intent"] = f"{m['scenario']}_{m['action']}"
            self.by_id[mid] = m
            self.by_key.setdefault(join_key(m["text"]), []).append(m)


def label_set(m: dict) -> tuple:
    return m["scenario"], m["action"], tuple((e["type"], e["filler"]) for e in m["entities"])


def pick_massive(cands: list[dict], utt: str, intent: str, split: str) -> tuple[dict, str | None]:
    """The MASSIVE row an ITALIC row takes among those with its text and, where they carry different
    labels (ambiguous), the rule that decided; None where all carry the same labels. The rules, each
    applied only if some candidate passes it: the ITALIC intent (a row of another intent cannot be
    this recording's), the exact text over a normalised match, the MASSIVE partition of the ITALIC
    split (the `massive` config keeps MASSIVE's split); what is left after all three is decided by
    the order of MASSIVE's file."""
    first = lambda pool: min(pool, key=lambda m: m["line"])
    if len({label_set(m) for m in cands}) == 1:
        return first(cands), None
    pool = cands
    for rule, keep in (("intent", lambda m: m["intent"] == intent), ("exact text", lambda m: m["text"] == utt),
                       ("MASSIVE partition", lambda m: m["partition"] == split)):
        pool = [m for m in pool if keep(m)] or pool
        if len({label_set(m) for m in pool}) == 1:
            return first(pool), rule
    return first(pool), "order in MASSIVE's file"


class ItalicJoin:
    """Joins ITALIC rows to MASSIVE it-IT and keeps the report: exact, normalised, ambiguous, unjoined,
    intent disagreements."""

    def __init__(self, massive: MassiveItalian):
        self.massive = massive
        self.count = Counter()  # by id / by text, exact / normalised
        self.rules = Counter()  # ambiguous rows, by the rule that decided
        self.ambiguous, self.unjoined, self.disagree = [], [], []

    def __call__(self, rec: dict, where: str, split: str) -> dict | None:
        """The joined MASSIVE row (None if there is none; the row is then listed as unjoined)."""
        utt, intent = need(rec, "utt", str, where), need(rec, "intent", str, where)
        rid = rec.get("id")
        if rid is not None:
            m = self.massive.by_id.get(str(rid))
            if m is None or join_key(m["text"]) != join_key(utt):
                why = (f"id {rid!r} is not in MASSIVE it-IT" if m is None else
                       f"MASSIVE's id {rid!r} ({m['where']}) is {m['text']!r}, another text")
                self.unjoined.append(f"{where}: {utt!r}: {why}")
                return None
            reason = None
        else:
            cands = self.massive.by_key.get(join_key(utt))
            if not cands:
                self.unjoined.append(f"{where}: {utt!r}: no MASSIVE it-IT utterance has this text")
                return None
            m, reason = pick_massive(cands, utt, intent, split)
            if reason is not None:
                others = ", ".join(c["id"] for c in cands if c is not m)
                self.ambiguous.append(f"{where}: {utt!r}: took MASSIVE id {m['id']} over id(s) {others} "
                                      f"(different labels), by {reason}")
                self.rules[f"by {reason}"] += 1
        if m["intent"] != intent:
            self.disagree.append(f"{where}: field 'intent': {intent} differs from MASSIVE's {m['intent']} at {m['where']}")
            return None
        self.count["by id" if rid is not None else "by text"] += 1
        self.count["exact" if m["text"] == utt else "normalised"] += 1
        return m

    def check(self, skip_unjoined: bool) -> None:
        """Raise with every intent disagreement and (unless skipped) every unjoined row listed."""
        problems = []
        if self.disagree:
            problems.append(f"{len(self.disagree)} ITALIC row(s) whose intent differs from the joined MASSIVE "
                            f"it-IT row's (never overwritten):\n  " + "\n  ".join(self.disagree[:SHOWN]))
        if self.unjoined and not skip_unjoined:
            problems.append(f"{len(self.unjoined)} ITALIC row(s) not found in MASSIVE it-IT ({self.massive.path}), "
                            "e.g.:\n  " + "\n  ".join(self.unjoined[:SHOWN]) +
                            "\n(pass --skip-unjoined to drop them, counted)")
        if problems:
            raise ManifestError("\n".join(problems))

    def notes(self) -> list[str]:
        c = self.count
        how = " and ".join(f"{c[k]} {k}" for k in ("by id", "by text") if c[k])
        rules = ", ".join(f"{n} {rule}" for rule, n in sorted(self.rules.items()))
        out = [f"ITALIC has no slot markup: {c['by id'] + c['by text']} rows joined to MASSIVE it-IT ({how}): "
               f"{c['exact']} exact, {c['normalised']} after normalising case, accents, apostrophes, punctuation "
               f"and spaces; {self.rules.total()} ambiguous{f' ({rules})' if rules else ''}; "
               f"{len(self.unjoined)} unjoined" + (" (dropped by --skip-unjoined)" if self.unjoined else "")]
        out += [f"ambiguous: {a}" for a in self.ambiguous[:SHOWN]]
        out += [f"unjoined: {u}" for u in self.unjoined[:SHOWN]]
        return out


def italic_texts(root: Path, name: str) -> list[tuple[str, dict]]:
    """(where, record without its audio) for each row of ITALIC split `name`, `where` as the second,
    audio-reading pass (split_records) names the row."""
    if (root / f"{name}.jsonl").is_file():
        path = root / f"{name}.jsonl"
        return [(f"{path}:{lineno}", rec) for lineno, rec in iter_jsonl(path)]
    files = columnar_files(root, name)
    if not files:
        raise ManifestError(f"{root}: ITALIC split '{name}' not found (looked for {name}.jsonl, "
                            f"{name}-*.parquet, {name}/*.parquet, {name}/data-*.arrow)")
    return [(f"{path}: row {k}", rec) for path in files
            for k, rec in iter_columnar(path, ITALIC_COLUMNS, ITALIC_TEXT_COLUMNS)]


def load_italic(root: Path, massive_dir: Path, stage: AudioStage, skip_unjoined: bool) -> Rows:
    """Row ids: a speech row is italic-<config>-<ITALIC split>-<row index in the split>-<audio file name>
    (config: the --italic-dir folder's name), stable across runs and unique across configs. A transcript
    row is one per utterance: italic-it-IT-<id> where ITALIC carries an id, else one per ITALIC row (each
    MASSIVE utterance is recorded once), italic-<config>-<split>-<index>."""
    if not root.is_dir():
        raise ManifestError(f"{root}: --italic-dir is not a folder")
    join = ItalicJoin(MassiveItalian(massive_dir))
    joined = {split: [join(rec, where, split) for where, rec in italic_texts(root, name)]
              for split, name in ITALIC_SPLITS.items()}
    join.check(skip_unjoined)
    rows, config = Rows(), root.name
    for split, name in ITALIC_SPLITS.items():
        recs = split_records(rows, split, root, name, ITALIC_COLUMNS, "italic", "it-IT", stage)
        seen_utt = set()
        for k, ((where, rec, audio), m) in enumerate(zip(recs, joined[split], strict=True)):
            if m is None:  # unjoined and skipped: its staged clip goes too
                stage.drop(audio)
                continue
            row_id = f"italic-{config}-{name}-{k}"
            utt_id = f"italic-it-IT-{rec['id']}" if rec.get("id") is not None else row_id
            # Labels from MASSIVE; the text stays ITALIC's (what was read aloud).
            common = {"lang": "it", "text": rec["utt"], "scenario": m["scenario"], "action": m["action"],
                      "entities": m["entities"], "locale": "it-IT", "corpus": "italic", "massive_id": m["id"]}
            if utt_id not in seen_utt:
                seen_utt.add(utt_id)
                rows.add(split, {"id": utt_id, "audio": None, **common}, where)
            speaker = rec.get("speaker")
            rows.add(split, {"id": f"{row_id}-{Path(audio).name}", "audio": audio, **common, "utt_id": utt_id,
                             **({"speaker": str(speaker)} if speaker is not None else {})}, where)
    rows.notes += join.notes()
    return rows


# ----------------------------------------------------------------------------------------------------
# The bundled demo corpus

def load_demo(demo_dir: Path) -> Rows:
    rows = Rows()
    for split in SPLITS:
        path = demo_dir / f"{split}.jsonl"
        rows.source(split, path)
        for i, row in enumerate(read_manifest(path)):  # audio comes back absolute, valid from any --out
            rows.add(split, row, f"{path}:{i + 1}")
    return rows


def speak(text: str, voice: str, speed: int, sample_rate: int) -> np.ndarray:
    """espeak-ng's 22.05 kHz synthesis, resampled to `sample_rate`, leading/trailing silence trimmed."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         check=True, capture_output=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    g = np.gcd(sr, sample_rate)
    x = resample_poly(x, sample_rate // g, sr // g).astype(np.float32)
    loud = np.flatnonzero(np.abs(x) > 1e-3)
    pad = sample_rate // 20
    return x[max(loud[0] - pad, 0):loud[-1] + pad] if len(loud) else x


def template_slots(template: str) -> list[str]:
    """The slot names of a demo template, in order: "wake me at {time}" -> ["time"]."""
    return re.findall(r"\{(\w+)\}", template)


def draw_fillings(templates: list[str], values: dict, rng: random.Random, want: int,
                  taken: frozenset[str] | set[str] = frozenset()) -> dict[str, list[dict]]:
    """Up to `want` distinct fillings of the templates (text -> its entities in utterance order) whose text is
    not in `taken`, by rejection sampling (50 tries per filling wanted): a random template, then a random value
    for each of its slots."""
    texts: dict[str, list[dict]] = {}
    for _ in range(want * 50):
        if len(texts) == want:
            break
        template = rng.choice(templates)
        filled = {name: rng.choice(values[name]) for name in template_slots(template)}
        text = template.format(**filled)
        order = sorted(filled, key=lambda name: template.index("{" + name + "}"))
        if text not in taken:
            texts.setdefault(text, [{"type": name, "filler": filled[name]} for name in order])
    return texts


def speak_utterance(rows: list[dict], utt: dict, voices: list[str], spec: dict, rng: random.Random,
                    out_dir: Path) -> None:
    """Append the transcript row `utt` and one speech row per voice (a random speed each) to `rows`,
    writing each recording into out_dir/audio."""
    rows.append(utt)
    for voice in voices:
        speed = rng.choice(spec["speeds"])
        name = f"{utt['id']}-{voice.replace('+', '_')}-{speed}.ogg"
        x = speak(utt["text"], voice, speed, spec["sample_rate"])
        # Lowest Vorbis quality: plenty for 16 kHz synthetic speech, keeps the folder small.
        sf.write(out_dir / "audio" / name, x, spec["sample_rate"], format="OGG", subtype="VORBIS",
                 compression_level=1.0)
        rows.append({**utt, "id": name, "audio": f"audio/{name}", "utt_id": utt["id"], "voice": voice,
                     "speed": speed})


def check_template_language(lspec: dict, at: str) -> None:
    """One language of templates.json: its voices, and every template slot a non-empty list of values."""
    voices, values = need(lspec, "voices", list, at), need(lspec, "values", dict, at)
    if not voices or not all(isinstance(v, str) for v in voices):
        raise ManifestError(f"{at}: field 'voices': expected a non-empty list of espeak-ng voice names")
    for intent, templates in need(lspec, "templates", dict, at).items():
        if "_" not in intent or not templates or not all(isinstance(t, str) for t in templates):
            raise ManifestError(f"{at}.templates.{intent}: expected a SCENARIO_ACTION name and a non-empty list of "
                                f"template strings")
        slots = {name for t in templates for name in template_slots(t)}
        empty = sorted(name for name in slots if not (isinstance(values.get(name), list) and values[name]))
        if empty:
            raise ManifestError(f"{at}.templates.{intent}: slot '{{{empty[0]}}}' has no non-empty list in the "
                                f"language's 'values'")


def check_templates(path: Path) -> dict:
    """templates.json, every field build_demo reads checked: a broken file is an error naming the field, not a
    KeyError after minutes of speaking."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not JSON ({e})") from None
    where = str(path)
    for field in ("seed", "utterances_per_intent", "sample_rate"):
        if need(spec, field, int, where) < (0 if field == "seed" else 1):
            raise ManifestError(f"{where}: field '{field}': expected a positive integer, got {spec[field]}")
    speeds = need(spec, "speeds", list, where)
    if not speeds or not all(isinstance(v, int) and v > 0 for v in speeds):
        raise ManifestError(f"{where}: field 'speeds': expected a non-empty list of words per minute, got {speeds}")
    languages = need(spec, "languages", dict, where)
    if not languages:
        raise ManifestError(f"{where}: field 'languages': expected at least one language")
    for lang, lspec in languages.items():
        check_template_language(lspec, f"{where}: languages.{lang}")
    most = min(len(ls["voices"]) for ls in languages.values())
    heldout = need(spec, "heldout_per_intent", dict, where)
    if any(need(heldout, s, int, f"{where}: heldout_per_intent") < 0 for s in ("devel", "test")):
        raise ManifestError(f"{where}: heldout_per_intent: expected devel and test >= 0, got {heldout}")
    rows = need(spec, "speech_rows_per_utterance", dict, where)
    for split in SPLITS:
        if not 0 <= need(rows, split, int, f"{where}: speech_rows_per_utterance") <= most:
            raise ManifestError(f"{where}: speech_rows_per_utterance.{split}: expected 0..{most} (the fewest voices "
                                f"of a language), got {rows[split]}")
    extra = spec.get("extra_test")
    if extra is not None:
        at = f"{where}: extra_test"
        need(extra, "seed", int, at)
        want, n_voices = (need(extra, f, int, at) for f in ("utterances_per_intent", "speech_rows_per_utterance"))
        if want < 0 or not 1 <= n_voices <= most:
            raise ManifestError(f"{at}: expected utterances_per_intent >= 0 and speech_rows_per_utterance in "
                                f"1..{most} (the fewest voices of a language), got {want} and {n_voices}")
    return spec


def build_demo(templates_path: Path, out_dir: Path) -> dict[str, list[dict]]:
    """Fill the templates (seeded), split per (language, intent) so devel/test texts never occur in
    train, speak each utterance with espeak-ng, and write audio/ and {split}.jsonl into out_dir.
    Then `extra_test` adds test utterances drawn with their own seed among the fillings not yet used,
    so that the first draw (every train and devel row) stays what it was."""
    spec = check_templates(templates_path)  # before any audio is made
    rng = random.Random(spec["seed"])
    per_intent, heldout = spec["utterances_per_intent"], spec["heldout_per_intent"]
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    (out_dir / "audio").mkdir(parents=True)
    count = {lang: 0 for lang in spec["languages"]}
    extra = spec.get("extra_test")
    if extra is not None:
        extra_rng = random.Random(extra["seed"])
        want, n_voices = extra["utterances_per_intent"], extra["speech_rows_per_utterance"]

    def utterance(lang: str, intent: str, text: str, entities: list[dict]) -> dict:
        count[lang] += 1
        scenario, action = intent.split("_", 1)
        return {"id": f"demo-{lang}-{count[lang]:04d}", "audio": None, "lang": lang, "text": text,
                "scenario": scenario, "action": action, "entities": entities, "corpus": "demo"}

    for lang, lspec in spec["languages"].items():
        for intent, templates in lspec["templates"].items():
            items = list(draw_fillings(templates, lspec["values"], rng, per_intent).items())
            rng.shuffle(items)
            cut = {"devel": heldout["devel"], "test": heldout["devel"] + heldout["test"]}
            for k, (text, entities) in enumerate(items):
                split = "devel" if k < cut["devel"] else "test" if k < cut["test"] else "train"
                voices = rng.sample(lspec["voices"], spec["speech_rows_per_utterance"][split])
                speak_utterance(splits[split], utterance(lang, intent, text, entities), voices, spec, rng, out_dir)
    if extra is not None:
        taken = {r["text"] for rows in splits.values() for r in rows}
        for lang, lspec in spec["languages"].items():
            for intent, templates in lspec["templates"].items():
                for text, entities in draw_fillings(templates, lspec["values"], extra_rng, want, taken).items():
                    voices = extra_rng.sample(lspec["voices"], n_voices)
                    speak_utterance(splits["test"], utterance(lang, intent, text, entities), voices, spec,
                                    extra_rng, out_dir)
    for split, rows in splits.items():
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                validate_row(row, f"{out_dir / split}.jsonl")
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return splits


def regenerate_demo(demo_dir: Path, templates_path: Path) -> None:
    """Rebuild demo_dir's audio/ and {split}.jsonl from the templates, all or nothing: everything is
    built in a temporary folder first and only then moved over the old files."""
    if shutil.which("espeak-ng") is None:
        raise ManifestError("espeak-ng not found on PATH: --regenerate needs it (Debian: apt-get install espeak-ng)")
    demo_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir(demo_dir / "demo")  # demo_dir/.demo.PID.RANDOM
    try:
        build_demo(templates_path, tmp)
        replace_dir(tmp / "audio", demo_dir / "audio", aside=tmp / "audio.old")
        for split in SPLITS:
            os.replace(tmp / f"{split}.jsonl", demo_dir / f"{split}.jsonl")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Synthetic speech of a manifest's transcripts (train.py --subset-selection gap)

SYNTH_VOICES = {"en": "en-us", "fr": "fr-fr"}  # other languages: espeak-ng's voice named by the ISO code
SYNTH_SPEED, SYNTH_RATE = 175, 16000
SYNTH_MANIFEST = "synthetic.jsonl"


def synthesize(manifest: Path, out: Path) -> list[dict]:
    """OUT/synthetic.jsonl: for every speech row of `manifest`, a row with the same id and labels whose audio is
    espeak-ng speaking its transcript (one voice per language, SYNTH_VOICES; one file per distinct text), so that
    train.py's gap selection can compare the model on a transcript and on cheap speech of it before any real
    recording is chosen. Built in a temporary sibling of OUT, renamed to OUT when complete."""
    if shutil.which("espeak-ng") is None:
        raise ManifestError("espeak-ng not found on PATH: synth needs it (Debian: apt-get install espeak-ng)")
    rows = [r for r in read_manifest(manifest) if r["audio"] is not None]
    if not rows:
        raise ManifestError(f"{manifest}: no speech rows (rows with audio) to synthesise transcripts for")
    if out.exists() and not (out / SYNTH_MANIFEST).is_file():
        raise ManifestError(f"{out}: exists and is not a synth output (no {SYNTH_MANIFEST}); choose another --out")
    tmp = stage_dir(out)
    try:
        (tmp / "audio").mkdir()
        files, synthetic = {}, []
        for row in rows:
            voice = SYNTH_VOICES.get(row["lang"], row["lang"])
            key = (voice, row["text"])
            if key not in files:
                files[key] = f"audio/{len(files):06d}.wav"
                sf.write(tmp / files[key], speak(row["text"], voice, SYNTH_SPEED, SYNTH_RATE), SYNTH_RATE)
            synthetic.append({"id": row["id"], "lang": row["lang"], "text": row["text"], "audio": files[key],
                              "scenario": row["scenario"], "action": row["action"], "entities": row["entities"],
                              "voice": voice, "speed": SYNTH_SPEED})
        write_manifest(tmp / SYNTH_MANIFEST, synthetic)
        replace_dir(tmp, out, aside=tmp.parent / f"{tmp.name}.old")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out / SYNTH_MANIFEST}: {len(synthetic)} speech rows, {len(files)} synthetic recordings")
    return synthetic


# ----------------------------------------------------------------------------------------------------
# Audio checks and the summary

def drop_missing_audio(rows: Rows, gone: set[str]) -> None:
    """--skip-missing-audio: drop the speech rows in `gone`, counted per split. A split left with no
    recordings at all cannot be evaluated on speech: that is warned about on stderr, not only noted."""
    dropped = []
    for split, split_rows in rows.splits.items():
        speech = sum(r["audio"] is not None for r in split_rows)
        rows.splits[split] = [r for r in split_rows if r["id"] not in gone]
        n = len(split_rows) - len(rows.splits[split])
        if n:
            dropped.append(f"{split} {n} of {speech}")
        if n and n == speech:
            print(f"prepare.py: warning: split '{split}' has no recordings left: --skip-missing-audio dropped "
                  f"all {speech} of its speech rows (their audio files are missing); only its "
                  f"{len(rows.splits[split])} transcript rows remain", file=sys.stderr)
    rows.notes.append(f"--skip-missing-audio: dropped {len(gone)} speech rows whose audio is missing "
                      f"({', '.join(dropped)})")


def check_audio(rows: Rows, decode: bool, skip_missing: bool) -> dict[str, float]:
    """Existence (or, with decode, full decoding) of every audio file. Returns row id -> seconds."""
    missing = [(r["id"], r["audio"]) for split in rows.splits.values() for r in split
               if r["audio"] is not None and not os.path.isfile(r["audio"])]
    if missing and not skip_missing:
        shown = "\n  ".join(f"{path}  (from {rows.where[rid]})" for rid, path in missing[:5])
        raise ManifestError(f"{len(missing)} audio file(s) not found, e.g.:\n  {shown}\n"
                            "(pass --skip-missing-audio to drop those speech rows instead)")
    if missing:
        drop_missing_audio(rows, {rid for rid, _ in missing})
    durations = {}
    if decode:
        for split in rows.splits.values():
            for r in split:
                if r["audio"] is None:
                    continue
                try:
                    x, sr = sf.read(r["audio"], dtype="float32", always_2d=True)
                except Exception as e:  # libsndfile raises several types; all mean "cannot decode"
                    raise ManifestError(f"{rows.where[r['id']]}: field 'audio': cannot decode {r['audio']}: {e}") from None
                if len(x) == 0:
                    raise ManifestError(f"{rows.where[r['id']]}: field 'audio': {r['audio']} has no samples")
                durations[r["id"]] = len(x) / sr
    return durations


def summary(splits: dict[str, list[dict]], durations: dict[str, float] | None) -> str:
    head = ["split", "transcripts", "speech", "hours", "languages", "scenarios", "intents", "entity types"]
    table = [head]
    for split, rows in splits.items():
        speech = [r for r in rows if r["audio"] is not None]
        h = sum(durations[r["id"]] for r in speech) / 3600 if durations is not None else None
        hours = "?" if h is None else f"{h:.2f}" if h >= 1 else f"{h:.4f}"
        table.append([split, str(len(rows) - len(speech)), str(len(speech)), hours,
                      ",".join(sorted({r["lang"] for r in rows})),
                      str(len({r["scenario"] for r in rows})),
                      str(len({(r["scenario"], r["action"]) for r in rows})),
                      str(len({e["type"] for r in rows for e in r["entities"]}))])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in table)


OUR_AUDIO = {"speech-massive", "italic"}  # the audio/<corpus> folders a run of this script writes


def check_replaceable(out: Path) -> None:
    """--out may be replaced if it holds only an earlier run's output: manifests and audio/<corpus>/.
    Checked before reading (a corpus takes a while), and again just before the swap."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ManifestError(f"{out}: --out exists and is not a directory")
    others = [p.name for p in out.iterdir() if not (p.is_file() and p.suffix == ".jsonl")
              and not (p.name == "audio" and p.is_dir() and {c.name for c in p.iterdir()} <= OUR_AUDIO)]
    if others:
        raise ManifestError(f"{out}: exists and holds files other than an earlier prepare.py output "
                            f"({', '.join(sorted(others)[:5])}); refusing to replace it: choose another --out or empty it")


def install_stage(stage: AudioStage, out: Path, splits: dict[str, list[dict]]) -> None:
    """Write the manifests next to the staged audio (paths relative to the manifest, so the folder can
    be moved as a whole) and rename the stage to --out, swapping out an earlier run's output."""
    prefix = str(stage.dir) + os.sep
    for split, rows in splits.items():
        rows = [{**r, "audio": os.path.relpath(r["audio"], stage.dir)}
                if r["audio"] is not None and r["audio"].startswith(prefix) else r for r in rows]
        write_manifest(stage.dir / f"{split}.jsonl", rows)
    check_replaceable(out)
    apply_umask(stage.dir)  # mkdtemp's 0700 would survive the rename: --out is a folder like any other
    replace_dir(stage.dir, out, aside=stage.dir.with_suffix(".old"))
    stage.dir = None


def finish(rows: Rows, out: Path | None, args, stage: AudioStage | None = None) -> None:
    if out is not None and out.exists() and not out.is_dir():
        raise ManifestError(f"{out}: --out exists and is not a directory")
    for split in getattr(args, "splits", SPLITS):
        if not rows.splits.get(split):
            read = ", ".join(rows.sources.get(split, [])) or "no input file"
            raise ManifestError(f"split '{split}' is empty: no rows for it in {read}")
    durations = check_audio(rows, args.check_audio, args.skip_missing_audio)
    splits = {s: rows.splits[s] for s in SPLITS if s in rows.splits}
    if stage is not None and stage.dir is not None:
        install_stage(stage, out, splits)
    elif out is not None:
        write_split_dir(out, splits)
    print(summary(splits, durations if args.check_audio else None))
    if args.check_audio and durations:
        d = np.array(list(durations.values()))
        print(f"audio: {len(d)} files decoded, seconds min {d.min():.2f} / median {np.median(d):.2f} / "
              f"mean {d.mean():.2f} / max {d.max():.2f}")
    for note in rows.notes:
        print("note:", note)
    if out is not None:
        print(f"wrote {', '.join(f'{out / s}.jsonl' for s in splits)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="corpus", required=True, metavar="CORPUS")

    def common(p, out_required=True):
        p.add_argument("--out", type=Path, required=out_required, help="output folder for {train,devel,test}.jsonl")
        p.add_argument("--check-audio", action="store_true", help="decode every audio file, report durations")
        p.add_argument("--skip-missing-audio", action="store_true",
                       help="drop speech rows whose audio file is missing instead of failing")

    p = sub.add_parser("slurp", help="SLURP (real recordings)")
    common(p)
    p.add_argument("--annotations", type=Path, required=True, help="folder with the release's {train,devel,test}.jsonl")
    p.add_argument("--audio-dir", type=Path, required=True, help="the slurp_real folder of recordings")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    p = sub.add_parser("massive", help="MASSIVE 1.1 (transcripts only)")
    common(p)
    p.add_argument("--massive-dir", type=Path, required=True, help="the release folder (or its data/ folder)")
    p.add_argument("--locales", nargs="+", help="e.g. fr-FR de-DE (default: all found)")
    p = sub.add_parser("speech-massive", help="Speech-MASSIVE (parquet, save_to_disk or JSONL export, see above)")
    common(p)
    p.add_argument("--speech-massive-dir", type=Path, required=True, help="folder of <locale>/ folders: <split>-*.parquet, <split>/data-*.arrow or <split>.jsonl")
    p.add_argument("--locales", nargs="+", help="default: all locale folders found")
    p.add_argument("--few-shot", action="store_true", help="train from train_115 (115 utterances per locale)")
    p = sub.add_parser("italic", help="ITALIC (parquet, save_to_disk or JSONL export), slots joined from MASSIVE it-IT")
    common(p)
    p.add_argument("--italic-dir", type=Path, required=True, help="one configuration's folder: {train,validation,test}-*.parquet, <split>/*.parquet, "
                   "<split>/data-*.arrow or <split>.jsonl")
    p.add_argument("--massive-dir", type=Path, required=True, help="MASSIVE 1.1 release, for it-IT slot markup")
    p.add_argument("--skip-unjoined", action="store_true",
                   help="drop ITALIC rows whose utterance is not in MASSIVE it-IT (counted) instead of failing")
    p = sub.add_parser("demo", help="the bundled English/French demo corpus")
    common(p, out_required=False)  # no --out: validate the corpus and print its summary
    p.add_argument("--regenerate", action="store_true", help="rebuild the corpus from its templates with espeak-ng")
    p.add_argument("--demo-dir", type=Path, default=DEMO_DIR, help="where the corpus lives (default: data/demo)")
    p.add_argument("--templates", type=Path, help="template file (default: DEMO_DIR/templates.json)")

    p = sub.add_parser("synth", help="espeak-ng speech of a manifest's transcripts, for train.py --subset-selection gap")
    p.add_argument("--manifest", type=Path, required=True, help="a training manifest (its speech rows are the candidates)")
    p.add_argument("--out", type=Path, required=True, help="output folder: synthetic.jsonl and audio/")

    args = parser.parse_args(argv)
    stage = AudioStage(args.out) if args.corpus in ("speech-massive", "italic") else None
    try:
        if args.corpus == "synth":  # not a corpus: synthetic speech of one manifest, written by synthesize itself
            synthesize(args.manifest, args.out)
            return 0
        if args.corpus == "slurp":
            rows = load_slurp(args.annotations, args.audio_dir.resolve(), args.splits)
        elif args.corpus == "massive":
            rows = load_massive(args.massive_dir, args.locales)
        elif args.corpus == "speech-massive":
            check_replaceable(args.out)
            rows = load_speech_massive(args.speech_massive_dir.resolve(), args.locales, args.few_shot, stage)
        elif args.corpus == "italic":
            check_replaceable(args.out)
            rows = load_italic(args.italic_dir.resolve(), args.massive_dir, stage, args.skip_unjoined)
        else:
            if args.regenerate:  # without --out: rebuild (or just check) the corpus, write nothing else
                regenerate_demo(args.demo_dir, args.templates or args.demo_dir / "templates.json")
            rows = load_demo(args.demo_dir)
        finish(rows, args.out, args, stage)
    except ManifestError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if stage is not None:
            stage.discard()  # a run that failed leaves no staged audio behind
    return 0


if __name__ == "__main__":
    sys.exit(main())
