"""A SentencePiece subword tokenizer with BERT-style special tokens.

What SentencePiece does
-----------------------
A language model sees integers, not text. A *subword tokenizer* splits text
into pieces that sit between characters and words: frequent words become one
piece ("▁the"), rare words are spelled out of smaller pieces ("▁token" +
"izer"). SentencePiece learns that vocabulary directly from raw text. It treats
the input as a plain stream of Unicode characters, with the space turned into
the visible meta symbol "▁" (U+2581), so no language-specific word splitter is
needed and decoding is just "concatenate the pieces, turn ▁ back into spaces".

Two learning algorithms are available:

* **unigram** (default) starts from a large set of candidate pieces and
  repeatedly drops the pieces whose removal hurts the corpus likelihood least
  (an EM procedure), until ``vocab_size`` remain. Encoding picks the most
  likely segmentation (Viterbi).
* **bpe** (byte-pair encoding) starts from single characters and repeatedly
  merges the most frequent adjacent pair into a new piece, until
  ``vocab_size`` is reached. Encoding replays those merges.

**Byte fallback.** A character never seen in training (a new emoji, a rare
CJK character) would normally become [UNK] and be lost. With
``byte_fallback=True`` the vocabulary also holds the 256 pieces ``<0x00>`` ..
``<0xFF>``, and an unknown character is written as its UTF-8 bytes instead. So
every string can be encoded, and decoding gives back exactly the input. (One
exception by design: the special-token strings such as "[MASK]" encode to their
ids, which ``decode`` skips unless ``skip_special_tokens=False``.)

Choices made here so that ``decode(encode(s)) == s``:

* ``normalization_rule_name="identity"``: SentencePiece normally applies NFKC
  normalisation (e.g. "ﬁ" -> "fi", full-width -> ASCII), which is lossy.
* ``remove_extra_whitespaces=False``: keep repeated, leading and trailing
  spaces (they matter in code and poetry). ``allow_whitespace_only_pieces``
  lets runs of spaces (indentation) become single pieces.
* ``add_dummy_prefix=False``: by default SentencePiece glues a space to the
  front of every input and removes it when decoding, so decoding a *slice* of
  ids loses its leading space. Without it decoding is plain concatenation:
  ``decode(a + b) == decode(a) + decode(b)``, which is what streaming text
  generation wants (GPT-2 style tokenizers behave the same way).
* The one character SentencePiece itself cannot round-trip is a literal "▁"
  in the input, because spaces are *represented* by "▁". We encode literal
  "▁" characters as their three UTF-8 byte pieces, which decode back to "▁".
  Newlines and tabs need nothing special: they are byte pieces
  (``<0x0A>``, ``<0x09>``) unless the corpus made them common enough to learn.

Special tokens get fixed ids, the same in every trained model::

    [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 <s>=5 </s>=6

[PAD], <s>, </s> are SentencePiece *control* symbols: they never come out of
``encode`` on their own; you add them. [CLS], [SEP], [MASK] are *user-defined*
symbols: when the text literally contains "[MASK]" it encodes to the mask id,
so a fill-mask prompt like ``"The [MASK] sat on the mat"`` just works.
"""

from __future__ import annotations

import io
import json
import operator
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence, Union, get_args

import sentencepiece as spm

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>")
# Token -> id. The id is the position in SPECIAL_TOKENS; every model must agree.
SPECIAL_TOKEN_IDS: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer.json"
FORMAT_VERSION = 1

# SentencePiece skips training sentences longer than this many UTF-8 bytes
# (its default). We cut longer lines into pieces instead of dropping them.
MAX_SENTENCE_BYTES = 4192
# Files are read in chunks of at most this many characters, so even a file
# that is one giant line (minified JSON, say) never sits in memory whole.
_READ_CHUNK_CHARS = 1 << 20

_SPACE_SYMBOL = "\u2581"  # "▁": SentencePiece's stand-in for " "

# SentencePiece's two subword algorithms (see the module docstring)
TokenizerType = Literal["bpe", "unigram"]
TOKENIZER_TYPES: tuple[str, ...] = get_args(TokenizerType)

PathLike = Union[str, os.PathLike]
Source = Union[PathLike, Sequence[PathLike], Iterable[str]]


# --------------------------------------------------------------------------
# Reading the training corpus as a stream of sentences
# --------------------------------------------------------------------------


def _split_long_line(line: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Yield pieces of ``line`` that are each at most ``max_bytes`` UTF-8 bytes.

    A character is at most 4 bytes, so ``max_bytes // 4`` characters always
    fit. We cut at the last space in the window when there is one, so words
    stay whole where possible.
    """
    if len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    window = max_bytes // 4
    start = 0
    while start < len(line):
        end = min(start + window, len(line))
        if end < len(line):
            cut = line.rfind(" ", start + 1, end)
            if cut > start:
                end = cut
        yield line[start:end]
        start = end


def _is_path_list(source: Any) -> bool:
    """True when ``source`` is a list/tuple of file paths (``Path`` objects) rather than of
    texts. A list of ``str`` is always texts: a text that happens to name an existing file
    ("README.md") must not turn the whole list into paths."""
    return isinstance(source, (list, tuple)) and bool(source) and all(isinstance(p, os.PathLike) for p in source)


def _iter_file(path: PathLike) -> Iterator[str]:
    """Yield the lines of a UTF-8 text file, reading lazily in bounded chunks."""
    with open(path, encoding="utf-8", newline="") as f:
        try:
            # readline(n) returns at most n characters, so a huge line arrives in parts.
            yield from iter(lambda: f.readline(_READ_CHUNK_CHARS), "")
        except UnicodeDecodeError as e:
            raise ValueError(f"training file {os.fspath(path)!r} is not valid UTF-8 ({e}); re-encode it as UTF-8") from e


def _iter_strings(texts: Iterable[str]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"training source item {i} is {type(text).__name__}, not str; pass file paths or an iterable of strings")
        yield text


def _iter_texts(source: Source) -> Iterator[str]:
    """Turn any accepted ``source`` into a lazy stream of text chunks.

    File paths are checked up front, so a typo fails now rather than after a
    long read of the files before it.
    """
    if isinstance(source, (str, os.PathLike)):
        paths = [source]
    elif _is_path_list(source):
        paths = list(source)
    else:
        return _iter_strings(source)
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(
                f"training file not found: {os.fspath(path)!r}; pass existing file paths, "
                "or a list/iterator of strings to train on text directly"
            )
    return (chunk for path in paths for chunk in _iter_file(path))


def _iter_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Yield non-empty training sentences (lines), each short enough for SentencePiece."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield from _split_long_line(line)


class _CountingIterator:
    """Wraps the sentence stream: counts sentences and keeps any exception.

    SentencePiece's C++ trainer pulls from the iterator; if our generator
    raises (missing file, bad UTF-8), the error surfaces as an opaque
    RuntimeError. Keeping the original lets us re-raise it unchanged.
    """

    def __init__(self, it: Iterator[str]) -> None:
        self.it = it
        self.count = 0
        self.error: BaseException | None = None

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> str:
        try:
            s = next(self.it)
        except StopIteration:  # normal end of the stream
            raise
        except BaseException as e:  # BaseException: keep Ctrl-C a KeyboardInterrupt too
            self.error = e
            raise
        self.count += 1
        return s


# --------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------


class Tokenizer:
    """SentencePiece tokenizer with fixed special-token ids and BERT-style batching.

    Create one with :meth:`train` or :meth:`load`; the constructor takes the
    serialized SentencePiece model bytes.
    """

    def __init__(self, model_proto: bytes, model_type: TokenizerType | None = None) -> None:
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_proto)  # raises on corrupt bytes
        self._model_proto = model_proto
        self.model_type = model_type
        self._check_special_tokens()
        # Byte-fallback ids that spell a literal "▁" (UTF-8 E2 96 81), see module doc.
        self._space_symbol_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_SYMBOL.encode("utf-8")]
        self._special_ids = frozenset(SPECIAL_TOKEN_IDS.values())

    def _check_special_tokens(self) -> None:
        """Fail loudly if this model does not use the project's special-token ids."""
        for piece, expected in SPECIAL_TOKEN_IDS.items():
            got = self._sp.piece_to_id(piece)
            if got != expected or self._sp.id_to_piece(expected) != piece:
                raise ValueError(f"tokenizer model has {piece!r} at id {got}, expected {expected}; retrain it with Tokenizer.train")
        if self._sp.piece_to_id("<0x00>") == SPECIAL_TOKEN_IDS["[UNK]"]:
            raise ValueError("tokenizer model was trained without byte_fallback; retrain it with Tokenizer.train")

    # ---------------------------------------------------------------- training

    @classmethod
    def train(
        cls,
        source: Source,
        vocab_size: int = 8000,
        model_type: TokenizerType = "unigram",
        max_sentences: int = 2_000_000,
        seed: int = 0,
    ) -> "Tokenizer":
        """Learn a vocabulary from ``source`` and return the tokenizer.

        Args:
            source: a text file path (``str`` or ``Path``), a list/tuple of ``Path``
                objects, or any iterable of strings, each a text that may hold several
                lines (a list of ``str`` is texts, never paths). It is streamed: the
                corpus is never loaded whole.
            vocab_size: total vocabulary size, including the 7 special tokens
                and the 256 byte-fallback pieces.
            model_type: ``"unigram"`` or ``"bpe"``.
            max_sentences: the trainer keeps a uniform random sample of at most
                this many lines (reservoir sampling over the whole stream), which
                bounds its memory whatever the corpus size.
            seed: seeds that sampling, so training is reproducible.
        """
        if model_type not in TOKENIZER_TYPES:
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        min_vocab = len(SPECIAL_TOKENS) + 256 + 1
        if not isinstance(vocab_size, int) or vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size={vocab_size!r} is too small: it must hold {len(SPECIAL_TOKENS)} special tokens, "
                f"256 byte pieces and the corpus characters: at least {min_vocab}, plus one per distinct character "
                f"of the corpus (typically 8000-64000)"
            )
        if max_sentences < 1:
            raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")

        sentences = _CountingIterator(_iter_sentences(_iter_texts(source)))
        model = io.BytesIO()  # the trainer writes the model here, not to disk
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences,
                model_writer=model,
                model_type=model_type,
                vocab_size=vocab_size,
                # Streaming with bounded memory: sample at most max_sentences lines.
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                max_sentence_length=MAX_SENTENCE_BYTES,
                # Fixed special-token ids. unk/pad/bos/eos are SentencePiece's own
                # "meta" pieces placed at explicit ids; the user-defined symbols
                # then fill the free ids in order: [CLS]=2, [SEP]=3, [MASK]=4.
                pad_id=SPECIAL_TOKEN_IDS["[PAD]"],
                unk_id=SPECIAL_TOKEN_IDS["[UNK]"],
                bos_id=SPECIAL_TOKEN_IDS["<s>"],
                eos_id=SPECIAL_TOKEN_IDS["</s>"],
                pad_piece="[PAD]",
                unk_piece="[UNK]",
                bos_piece="<s>",
                eos_piece="</s>",
                user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
                # Lossless round-trip (see module docstring).
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                # Numbers as single digits: "2024" -> 2 0 2 4, which helps arithmetic.
                split_digits=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,  # silence the (very chatty) training log
            )
        except RuntimeError as e:
            raise cls._training_error(e, sentences, vocab_size) from e
        return cls(model.getvalue(), model_type=model_type)

    @staticmethod
    def _training_error(e: RuntimeError, sentences: _CountingIterator, vocab_size: int) -> BaseException:
        """Translate SentencePiece's terse C++ errors into actionable ones."""
        if sentences.error is not None:
            return sentences.error  # our own reader failed: show that error as is
        if sentences.count == 0:
            return ValueError("training corpus is empty (no non-blank lines); pass a file or texts with some content")
        msg = str(e)
        m = re.search(r"Please set it to a value <= (\d+)", msg)
        if m:
            return ValueError(
                f"vocab_size={vocab_size} is too large for this corpus ({sentences.count} lines); "
                f"use vocab_size <= {m.group(1)} or train on more text"
            )
        m = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
        if m:
            return ValueError(
                f"vocab_size={vocab_size} is too small: the vocabulary holds the special tokens, the 256 byte pieces "
                f"and the corpus's characters; use vocab_size >= {m.group(1)}"
            )
        return ValueError(f"SentencePiece training failed: {msg}")

    # ------------------------------------------------------------- save / load

    def save(self, directory: PathLike) -> None:
        """Write ``tokenizer.model`` and ``tokenizer.json`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(self._model_proto)
        config = {
            "format_version": FORMAT_VERSION,
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "special_tokens": SPECIAL_TOKEN_IDS,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: PathLike) -> "Tokenizer":
        """Load a tokenizer written by :meth:`save`. Raises ValueError if missing or corrupt."""
        directory = Path(directory)
        model_path, config_path = directory / MODEL_FILE, directory / CONFIG_FILE
        hint = "point to a saved tokenizer directory (tokenizer.model + tokenizer.json, such as a run's tokenizer/)"
        for path in (model_path, config_path):
            if not path.is_file():
                raise ValueError(f"tokenizer file not found: {str(path)!r}; {hint}")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"corrupt tokenizer config {str(config_path)!r} ({e}); {hint}") from e
        if config.get("special_tokens") != SPECIAL_TOKEN_IDS:
            raise ValueError(f"{str(config_path)!r} lists special tokens {config.get('special_tokens')}, expected {SPECIAL_TOKEN_IDS}; {hint}")
        try:
            tok = cls(model_path.read_bytes(), model_type=config.get("model_type"))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"corrupt SentencePiece model {str(model_path)!r} ({e}); {hint}") from e
        except ValueError as e:
            raise ValueError(f"bad tokenizer model {str(model_path)!r}: {e}") from e
        if config.get("vocab_size") not in (None, tok.vocab_size):
            raise ValueError(f"{str(config_path)!r} says vocab_size={config['vocab_size']} but the model has {tok.vocab_size}; {hint}")
        return tok

    # --------------------------------------------------------- vocabulary info

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials and byte pieces included."""
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece for id ``i`` (spaces shown as "▁")."""
        self._check_ids([i])
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        """The id of ``piece``; ``unk_id`` if it is not in the vocabulary."""
        return self._sp.piece_to_id(piece)

    pad_id = property(lambda self: SPECIAL_TOKEN_IDS["[PAD]"], doc="id of [PAD] (0)")
    unk_id = property(lambda self: SPECIAL_TOKEN_IDS["[UNK]"], doc="id of [UNK] (1)")
    cls_id = property(lambda self: SPECIAL_TOKEN_IDS["[CLS]"], doc="id of [CLS] (2)")
    sep_id = property(lambda self: SPECIAL_TOKEN_IDS["[SEP]"], doc="id of [SEP] (3)")
    mask_id = property(lambda self: SPECIAL_TOKEN_IDS["[MASK]"], doc="id of [MASK] (4)")
    bos_id = property(lambda self: SPECIAL_TOKEN_IDS["<s>"], doc="id of <s> (5)")
    eos_id = property(lambda self: SPECIAL_TOKEN_IDS["</s>"], doc="id of </s> (6)")

    @property
    def special_ids(self) -> set[int]:
        """Ids of all special tokens, {0, ..., 6}."""
        return set(self._special_ids)

    def word_starts(self) -> list[bool]:
        """For each id, whether its piece begins a word: it starts with "▁" (SentencePiece's
        mark for a preceding space) or is a special token. Whole-word masking groups a
        word-start piece with the pieces that follow it."""
        return [i in self._special_ids or self.id_to_piece(i).startswith("\u2581") for i in range(len(self))]

    def __repr__(self) -> str:
        return f"Tokenizer(model_type={self.model_type!r}, vocab_size={self.vocab_size})"

    # -------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without adding any special tokens. Shape: (num_tokens,)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once; SentencePiece spreads the work over threads.

        Returns one id list per text (ragged; no padding, no special tokens).
        """
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        # Split every text at literal "▁" characters (rare), encode all the parts
        # in one batched call, then glue parts back with the byte pieces for "▁".
        parts_per_text = [t.split(_SPACE_SYMBOL) for t in texts]
        flat = [p for parts in parts_per_text for p in parts]
        try:
            encoded = self._sp.encode(flat, out_type=int, num_threads=-1)  # -1: all cores
        except TypeError:
            # SentencePiece's message for a str that is not valid Unicode (a lone surrogate,
            # e.g. from errors="surrogateescape") is "List elements must be str or bytes"
            for i, t in enumerate(texts):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"texts[{i}] is not valid Unicode: {t[e.start]!r} at position {e.start} "
                                     "(a lone surrogate); decode the source with errors='replace'") from e
            raise
        out: list[list[int]] = []
        k = 0
        for parts in parts_per_text:
            ids = list(encoded[k])
            for j in range(1, len(parts)):
                ids += self._space_symbol_ids
                ids += encoded[k + j]
            k += len(parts)
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. ``ids`` may be a list or a 1-D tensor.

        With ``skip_special_tokens=False`` special tokens appear as their text
        ("[CLS]", "</s>", ...). ``[MASK]`` etc. typed in the original text count
        as special tokens, so they are dropped when skipping.
        """
        if hasattr(ids, "tolist"):  # torch tensor / numpy array
            ids = ids.tolist()
        ids = [operator.index(i) for i in ids]  # int() would truncate a float id: 1.5 -> 1
        self._check_ids(ids)
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        # SentencePiece decodes control symbols (<s>, [PAD], ...) to "", so we
        # decode runs of ordinary ids and write special tokens out ourselves.
        # This is exact because decoding is concatenation (no dummy prefix).
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids:
                out.append(self._sp.decode(run))
                out.append(SPECIAL_TOKENS[i])
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is out of range for vocab_size {n}; ids must be in [0, {n})")

    # ------------------------------------------------------ BERT-style batches

    def __call__(
        self,
        texts: str | Sequence[str],
        pairs: str | Sequence[str] | None = None,
        max_length: int | None = None,
        padding: str | bool = "longest",
        truncation: bool = True,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """Encode texts (or text pairs) into model inputs, BERT style.

        Layout with ``add_special_tokens``: ``[CLS] a [SEP]`` or
        ``[CLS] a [SEP] b [SEP]``; ``token_type_ids`` is 0 over ``[CLS] a [SEP]``
        and 1 over ``b [SEP]``.

        Args:
            texts: one string or a list of B strings.
            pairs: optional second segments, same form as ``texts``.
            max_length: length limit (special tokens included).
            padding: ``"longest"`` (or True) pads to the longest sequence in the
                batch, ``"max_length"`` pads to ``max_length``, False pads nothing.
                Padding uses ``pad_id`` on the right.
            truncation: cut sequences to ``max_length``; for pairs the longer
                segment loses tokens first.
            return_tensors: None for Python lists, ``"pt"`` for torch.long tensors.

        Returns:
            dict with ``input_ids``, ``attention_mask`` (1 = real token, 0 = pad)
            and ``token_type_ids``. For a list input each is (B, L) (a list of
            lists, ragged if not padded); for a single string input each is (L,)
            as lists, or (1, L) as tensors (like Hugging Face tokenizers).
        """
        single = isinstance(texts, str)
        if single:
            texts = [texts]
        if isinstance(pairs, str):
            pairs = [pairs]
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(pairs)} pairs; pass one pair per text")
        if padding is True:
            padding = "longest"
        if padding not in ("longest", "max_length", False, None):
            raise ValueError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length; pass max_length=N or use padding='longest'")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")

        a_ids = self.encode_batch(list(texts))
        b_ids = self.encode_batch(list(pairs)) if pairs is not None else None
        n_special = (3 if pairs is not None else 2) if add_special_tokens else 0
        budget = None  # tokens available for the text itself
        if truncation and max_length is not None:
            budget = max_length - n_special
            if budget < 0:
                raise ValueError(f"max_length={max_length} cannot even hold the {n_special} special tokens; use max_length > {n_special}")

        input_ids: list[list[int]] = []
        token_type_ids: list[list[int]] = []
        for n in range(len(a_ids)):
            a = a_ids[n]
            b = b_ids[n] if b_ids is not None else None
            if budget is not None:
                a, b = _truncate(a, b, budget)
            if add_special_tokens:
                seq = [self.cls_id] + a + [self.sep_id]
                types = [0] * len(seq)
                if b is not None:
                    seq += b + [self.sep_id]
                    types += [1] * (len(b) + 1)
            else:
                seq = a + (b if b is not None else [])
                types = [0] * len(a) + [1] * (len(b) if b is not None else 0)
            input_ids.append(seq)
            token_type_ids.append(types)
        attention_mask = [[1] * len(seq) for seq in input_ids]

        if padding:
            target = max_length if padding == "max_length" else max((len(s) for s in input_ids), default=0)
            for seq, mask, types in zip(input_ids, attention_mask, token_type_ids):
                extra = max(target - len(seq), 0)
                seq += [self.pad_id] * extra
                mask += [0] * extra
                types += [0] * extra

        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if return_tensors == "pt":
            if len({len(s) for s in input_ids}) > 1:
                raise ValueError("sequences have different lengths, cannot make a tensor; use padding='longest' or truncation=True with max_length")
            import torch  # imported lazily: the tokenizer itself does not need torch

            width = len(input_ids[0]) if input_ids else 0  # reshape keeps (0, 0) for an empty batch
            return {k: torch.tensor(v, dtype=torch.long).reshape(len(v), width) for k, v in out.items()}
        if single:
            return {k: v[0] for k, v in out.items()}
        return out


def _truncate(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Cut ``a`` (and ``b``) so that together they have at most ``budget`` tokens.

    For pairs this equals removing one token at a time from the end of the
    currently longer segment (``b`` on ties), as Hugging Face's
    "longest_first" strategy does, but computed directly.
    """
    if b is None:
        return a[:budget], None
    if len(a) + len(b) <= budget:
        return a, b
    # a keeps its full length if short, else at least half the budget (rounded
    # up, since ties trim b first), or whatever b leaves over.
    keep_a = min(len(a), max((budget + 1) // 2, budget - len(b)))
    return a[:keep_a], b[: budget - keep_a]
