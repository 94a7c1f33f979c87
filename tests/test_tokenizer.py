"""Tests for the SentencePiece tokenizer (tokenizer/ package).

Tokenizers are trained once per module on a few thousand synthetic sentences
(tiny vocabularies, well under a second each).
"""

from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sentencepiece as spm
from tokenizer import SPECIAL_TOKENS, Tokenizer
from tokenizer.sentencepiece_tokenizer import MAX_SENTENCE_BYTES, _split_long_line, _truncate

WORDS = (
    "the cat sat on a mat dog ran fast slow big small red blue hello world tokenizer "
    "café naïve über 你好 世界 東京 😀 🚀 def return if else ( ) : = + 42 2024 3.14"
).split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """Synthetic corpus: words, digits, indentation, tabs, some multi-line strings."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        r = rng.random()
        if r < 0.1:
            s = "    " + s  # code-like indentation
        elif r < 0.15:
            s = s.replace(" ", "\t", 1)
        elif r < 0.2:
            s = s + "\n" + s  # a "document" with two lines
        out.append(s)
    return out


VOCAB = 350


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_sentences(3000)


@pytest.fixture(scope="module")
def toks(corpus) -> dict[str, Tokenizer]:
    return {mt: Tokenizer.train(corpus, vocab_size=VOCAB, model_type=mt) for mt in ("unigram", "bpe")}


@pytest.fixture(scope="module")
def tok(toks) -> Tokenizer:
    return toks["unigram"]


# ------------------------------------------------------------ special tokens


def test_word_starts_mark_the_pieces_that_open_a_word(toks):
    for t in toks.values():
        starts = t.word_starts()
        assert len(starts) == len(t) and all(starts[i] for i in t.special_ids)
        # No space precedes a text's first word, so no "▁" opens it: in a packed sequence
        # the [CLS] or [SEP] before it does. Every later word opens with one start piece.
        ids = [t.cls_id] + t.encode("unbelievably wonderful characters")
        assert [i for i in ids if starts[i]][0] == t.cls_id and sum(starts[i] for i in ids) == 3
        assert all(starts[i] == t.id_to_piece(i).startswith("\u2581") for i in ids[1:])


def test_special_tokens_have_fixed_ids(toks):
    assert SPECIAL_TOKENS == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>")
    for t in toks.values():
        assert [t.id_to_piece(i) for i in range(7)] == list(SPECIAL_TOKENS)
        assert [t.piece_to_id(p) for p in SPECIAL_TOKENS] == list(range(7))
        assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id, t.bos_id, t.eos_id) == (0, 1, 2, 3, 4, 5, 6)
        assert t.special_ids == set(range(7))
        assert len(t) == t.vocab_size == VOCAB


def test_save_load_keeps_ids_and_encodings(toks, tmp_path):
    text = "the cat sat on the mat 😀 東京\n  x"
    for mt, t in toks.items():
        d = tmp_path / mt / "nested"  # save creates missing directories
        t.save(d)
        assert (d / "tokenizer.model").is_file()
        config = json.loads((d / "tokenizer.json").read_text())
        assert config["model_type"] == mt and config["vocab_size"] == VOCAB
        assert config["special_tokens"] == {p: i for i, p in enumerate(SPECIAL_TOKENS)}
        loaded = Tokenizer.load(d)
        assert [loaded.id_to_piece(i) for i in range(7)] == list(SPECIAL_TOKENS)
        assert loaded.encode(text) == t.encode(text)
        assert loaded.model_type == mt
        assert [loaded.id_to_piece(i) for i in range(len(t))] == [t.id_to_piece(i) for i in range(len(t))]


def test_mask_in_text_encodes_to_mask_id(toks):
    for t in toks.values():
        ids = t.encode("The [MASK] sat on the mat")
        assert ids.count(t.mask_id) == 1
        assert t.decode(ids, skip_special_tokens=False) == "The [MASK] sat on the mat"
        assert t.decode(ids) == "The  sat on the mat"  # the mask is dropped, spaces kept
        batch = t("The [MASK] sat on the mat", return_tensors="pt")
        assert (batch["input_ids"] == t.mask_id).sum().item() == 1
        # Control symbols typed as text are just text.
        assert t.special_ids.isdisjoint(t.encode("<s> hi </s> [PAD]"))


# -------------------------------------------------------------- round trip

# Characters that tend to break tokenizers: emoji (incl. ZWJ sequences and
# skin tones), CJK, combining marks, Arabic/Hebrew, all kinds of whitespace,
# control characters, the SentencePiece space symbol itself, and bracket
# fragments of special tokens.
TRICKY = list(
    "aZ09 \t\n\r\x0b\x0c\x00\x85\u00a0\u2028\u3000▁_-[]<>/"
    "é\u0301\u0308\u20dd你好世界東京한국어ひらがなカタカナ"
    "😀🚀👍🏽👨\u200d👩\u200d👧\ufe0f\u200b\u200e"
    "עבריתالعربيةрусскийΩ∑∫ℝ\ufffd\U0010fffd"
)
# Any Unicode text: every code point except lone surrogates, which no UTF-8 text holds
# (the tokenizer rejects them, test_lone_surrogate_is_a_clear_error).
unicode_chars = st.characters(exclude_categories=["Cs"])
tricky_text = st.lists(
    st.one_of(st.sampled_from(TRICKY), st.sampled_from(WORDS + ["[MASK]", "[CLS]", "<s>", "  ", "\n\n"]), unicode_chars),
    max_size=40,
).map("".join)
any_text = st.one_of(st.text(unicode_chars, max_size=60), tricky_text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_roundtrip_is_lossless(toks, text):
    for t in toks.values():
        ids = t.encode(text)
        assert all(0 <= i < len(t) for i in ids)
        # Special-token strings typed in text come back too when not skipped.
        assert t.decode(ids, skip_special_tokens=False) == text
        if not any(s in text for s in ("[CLS]", "[SEP]", "[MASK]")):
            assert t.special_ids.isdisjoint(ids)
            assert t.decode(ids) == text


@pytest.mark.parametrize(
    "text",
    ["", " ", "   ", "\n", "\n\n\n", "\r\n", "\t\t", "▁", "▁▁ ▁", "a ▁b", "  leading and trailing  ",
     "line1\nline2\n", "👨\u200d👩\u200d👧 e\u0301", "x" * 10_000, "東京" * 3000],
)
def test_roundtrip_edge_cases(toks, text):
    for t in toks.values():
        assert t.decode(t.encode(text)) == text


def test_decode_is_concatenation(tok):
    # No dummy prefix: decoding a slice of ids keeps its leading space.
    a, b = tok.encode("the cat"), tok.encode(" sat on the mat")
    assert tok.decode(a + b) == tok.decode(a) + tok.decode(b) == "the cat sat on the mat"


def test_lone_surrogate_is_a_clear_error(toks):
    for t in toks.values():
        with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode: '\\ud800' at position 2"):
            t.encode_batch(["fine", "ab\ud800c"])


def test_encode_batch_matches_encode(toks):
    texts = make_sentences(50, seed=7) + ["", "▁x▁", "😀"]
    for t in toks.values():
        assert t.encode_batch(texts) == [t.encode(s) for s in texts]


def test_decode_accepts_tensors_and_rejects_bad_ids(tok):
    ids = tok.encode("hello world")
    assert tok.decode(torch.tensor(ids)) == "hello world"
    assert tok.decode([tok.cls_id] + ids + [tok.sep_id, tok.pad_id], skip_special_tokens=False) == "[CLS]hello world[SEP][PAD]"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([len(tok)])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="integer"):       # int() truncated it: 1.5 decoded as id 1, i.e. ''
        tok.decode([1.5])
    with pytest.raises(TypeError, match="integer"):
        tok.decode(torch.tensor(ids, dtype=torch.float32))
    assert tok.decode(np.array(ids)) == tok.decode([np.int64(i) for i in ids]) == "hello world"


def test_common_words_become_single_pieces(tok):
    # Sanity check that training learned something beyond bytes.
    assert len(tok.encode(" hello world")) <= 4


# ------------------------------------------------------- BERT-style batches


def test_batch_padding_masks_and_token_types(tok):
    texts = ["the cat", "a dog ran fast on the big red mat"]
    a = tok.encode_batch(texts)
    out = tok(texts)
    L = max(len(x) for x in a) + 2
    for n, ids in enumerate(a):
        row = out["input_ids"][n]
        assert len(row) == L
        assert row[: len(ids) + 2] == [tok.cls_id] + ids + [tok.sep_id]
        assert row[len(ids) + 2 :] == [tok.pad_id] * (L - len(ids) - 2)
        assert out["attention_mask"][n] == [1] * (len(ids) + 2) + [0] * (L - len(ids) - 2)
        assert out["token_type_ids"][n] == [0] * L

    fixed = tok(texts, padding="max_length", max_length=32)
    assert all(len(r) == 32 for k in fixed for r in fixed[k])
    ragged = tok(texts, padding=False)
    assert [len(r) for r in ragged["input_ids"]] == [len(x) + 2 for x in a]
    assert tok(texts, padding=True) == out
    plain = tok(texts, add_special_tokens=False, padding=False)
    assert plain["input_ids"] == a


def test_pairs_layout(tok):
    a, b = tok.encode("the cat sat"), tok.encode("on the mat")
    out = tok(["the cat sat"], pairs=["on the mat"])
    assert out["input_ids"] == [[tok.cls_id] + a + [tok.sep_id] + b + [tok.sep_id]]
    assert out["token_type_ids"] == [[0] * (len(a) + 2) + [1] * (len(b) + 1)]
    assert out["attention_mask"] == [[1] * (len(a) + len(b) + 3)]
    single = tok("the cat sat", pairs="on the mat")  # single str -> unbatched lists
    assert single["input_ids"] == out["input_ids"][0]


def test_truncation(tok):
    long = " ".join(["hello world"] * 50)
    ids = tok.encode(long)
    out = tok([long, "the cat"], max_length=10)
    assert out["input_ids"][0] == [tok.cls_id] + ids[:8] + [tok.sep_id]
    assert len(out["input_ids"][1]) == 10 and out["attention_mask"][1][-1] == 0
    # Pairs: the longer side is trimmed first.
    short = tok.encode("the cat")
    pair = tok([long], pairs=["the cat"], max_length=20)["input_ids"][0]
    assert len(pair) == 20
    assert pair == [tok.cls_id] + ids[: 17 - len(short)] + [tok.sep_id] + short + [tok.sep_id]
    # No truncation: the long sequence stays long and others pad to it.
    untrunc = tok([long, "the cat"], max_length=10, truncation=False)
    assert len(untrunc["input_ids"][0]) == len(ids) + 2


def _truncate_reference(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Remove one token at a time from the longer side (b on ties), as HF's longest_first does."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        if len(a) > len(b):
            a.pop()
        else:
            b.pop()
    return a, b


@given(la=st.integers(0, 40), lb=st.integers(0, 40), budget=st.integers(0, 60))
def test_pair_truncation_matches_token_by_token_reference(la, lb, budget):
    a, b = list(range(la)), list(range(100, 100 + lb))
    assert _truncate(a, b, budget) == _truncate_reference(a, b, budget)


def test_return_tensors_pt(tok):
    texts = ["the cat", "a dog ran fast", ""]
    out = tok(texts, pairs=["x", "y", "z"], return_tensors="pt")
    L = len(tok(texts, pairs=["x", "y", "z"])["input_ids"][0])
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert out[k].shape == (3, L) and out[k].dtype == torch.long
    assert out["attention_mask"].sum(1).tolist() == [len(r) for r in tok(texts, pairs=["x", "y", "z"], padding=False)["input_ids"]]
    one = tok("the cat", max_length=16, padding="max_length", return_tensors="pt")
    assert one["input_ids"].shape == (1, 16)
    assert tok([], return_tensors="pt")["input_ids"].shape == (0, 0)


def test_call_errors(tok):
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], padding="max_length")
    with pytest.raises(ValueError, match="special tokens"):
        tok(["a"], pairs=["b"], max_length=2)
    with pytest.raises(ValueError, match="pairs"):
        tok(["a", "b"], pairs=["c"])
    with pytest.raises(ValueError, match="padding"):
        tok(["a", "the cat sat"], padding=False, return_tensors="pt")
    with pytest.raises(ValueError, match="padding must be"):
        tok(["a"], padding="left")
    with pytest.raises(ValueError, match="return_tensors"):
        tok(["a"], return_tensors="np")


# ----------------------------------------------------------------- training


def test_train_from_files_and_long_lines(tmp_path, corpus):
    f1, f2 = tmp_path / "a.txt", tmp_path / "b.txt"
    huge = " ".join(["hello world"] * 2000) + "x" * 9000  # > MAX_SENTENCE_BYTES, has an unbreakable tail
    f1.write_text("\n".join(corpus[:1500]) + "\n" + huge + "\n", encoding="utf-8")
    f2.write_text("\n".join(corpus[1500:]), encoding="utf-8")
    for source in (f1, str(f1), [f1, f2], (f1, f2)):
        t = Tokenizer.train(source, vocab_size=VOCAB, model_type="bpe")
        assert t.decode(t.encode(huge)) == huge
    # a list of str is texts, even when the first text names an existing file
    texts = [str(f1), *corpus]
    assert Tokenizer.train(texts, vocab_size=VOCAB).encode("hello") == Tokenizer.train(
        iter(texts), vocab_size=VOCAB).encode("hello")


def test_split_long_line():
    line = ("ab " * 3000) + "東" * 3000
    parts = list(_split_long_line(line))
    assert "".join(parts) == line
    assert all(len(p.encode("utf-8")) <= MAX_SENTENCE_BYTES for p in parts)
    assert list(_split_long_line("short")) == ["short"]


def test_training_is_deterministic(corpus):
    a = Tokenizer.train(corpus, vocab_size=VOCAB, max_sentences=500, seed=3)
    b = Tokenizer.train(iter(corpus), vocab_size=VOCAB, max_sentences=500, seed=3)
    assert [a.id_to_piece(i) for i in range(VOCAB)] == [b.id_to_piece(i) for i in range(VOCAB)]


def test_training_streams_with_bounded_memory(monkeypatch):
    """A large generator is consumed lazily and the trainer keeps only a sample.

    We check (1) SentencePiece is asked to sample at most ``max_sentences``
    lines, and (2) Python-side peak memory stays far below the corpus size,
    i.e. nothing materialises the stream as a list.
    """
    n_lines, line_chars = 50_000, 100
    corpus_bytes = n_lines * line_chars
    seen_kwargs: dict = {}
    real_train = spm.SentencePieceTrainer.train

    def spy(**kwargs):
        seen_kwargs.update(kwargs)
        return real_train(**kwargs)

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", spy)
    consumed = 0

    def lines():
        nonlocal consumed
        rng = random.Random(0)
        for _ in range(n_lines):
            consumed += 1
            s = " ".join(rng.choice(WORDS[:20]) for _ in range(30))
            yield s[:line_chars].ljust(line_chars, "x")

    tracemalloc.start()
    try:
        t = Tokenizer.train(lines(), vocab_size=300, max_sentences=2000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak traced memory {peak / 1e6:.2f} MB for a {corpus_bytes / 1e6:.0f} MB stream")
    assert consumed == n_lines  # the whole stream was read (reservoir sampling) ...
    assert peak < corpus_bytes / 10  # ... but never held in Python memory at once
    assert seen_kwargs["input_sentence_size"] == 2000 and seen_kwargs["shuffle_input_sentence"] is True
    assert not isinstance(seen_kwargs["sentence_iterator"], (list, tuple))
    assert t.decode(t.encode("hello world")) == "hello world"


def test_training_errors(corpus):
    with pytest.raises(ValueError, match=r"too large for this corpus.*vocab_size <= \d+"):
        Tokenizer.train(corpus[:50], vocab_size=5000)
    # below the fixed part (special tokens + bytes) the corpus's characters are not counted yet:
    # the message must not name 264 as enough, since the corpus's characters come on top
    with pytest.raises(ValueError, match="too small.*at least 264, plus one per distinct character"):
        Tokenizer.train(corpus, vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train(["", "   ", "\n"], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train(iter([]), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="model_type"):
        Tokenizer.train(corpus, vocab_size=VOCAB, model_type="wordpiece")
    with pytest.raises(ValueError, match="not found"):
        Tokenizer.train("no/such/file.txt", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="not str"):
        Tokenizer.train(["ok", 3], vocab_size=VOCAB)

    def failing():
        yield "hello world"
        raise KeyError("boom")  # the caller's own error surfaces unchanged

    with pytest.raises(KeyError, match="boom"):
        Tokenizer.train(failing(), vocab_size=VOCAB)


def test_bad_utf8_file(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"hello world\n\xff\xfe bad bytes\n")
    with pytest.raises(ValueError, match="UTF-8"):
        Tokenizer.train(f, vocab_size=VOCAB)


# -------------------------------------------------------------- load errors


def test_load_errors_are_clear(tok, tmp_path):
    with pytest.raises(ValueError, match=r"not found.*saved tokenizer directory"):
        Tokenizer.load(tmp_path / "missing")
    d = tmp_path / "tok"
    tok.save(d)
    (d / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match=r"corrupt.*tokenizer\.model"):
        Tokenizer.load(d)

    tok.save(d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"corrupt.*tokenizer\.json"):
        Tokenizer.load(d)

    tok.save(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.load(d)

    # A SentencePiece model with default special tokens (<unk>=0, <s>=1, </s>=2) is rejected.
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_sentences(500)), model_writer=buf, vocab_size=80, minloglevel=2)
    tok.save(d)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"\[PAD\].*expected 0"):
        Tokenizer.load(d)
