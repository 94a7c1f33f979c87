"""train.py end to end on tiny generated text: both objectives, resume, errors."""

import json
import math
import os
import random
import shutil
import signal

import pytest

import minilm.data as data
import train
from minilm import sample
from minilm.checkpoint import load_model_dir
from minilm.cli import main_guard
from minilm.errors import MinilmError

WORDS = ("the cat dog sat ran on a mat log red blue big small quick slow bird fish tree "
         "house river hill sun moon star day night").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    paragraphs = []
    for _ in range(300):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                     for _ in range(rng.randint(1, 4))]
        paragraphs.append(" ".join(sentences))
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def tiny_args(corpus, out, objective, *extra):
    return ["--data", str(corpus), "--out", str(out), "--objective", objective,
            "--preset", "gpt-mini" if objective == "clm" else "bert-tiny", "--d-model", "32", "--n-heads", "2",
            "--d-ff", "64", "--n-layers", "2", "--vocab-size", "400", "--seq-len", "32", "--batch-size", "4",
            "--warmup-steps", "2", "--log-every", "1", "--eval-every", "3", "--no-progress",
            "--cache-dir", str(out.parent / "cache"), "--dtype", "fp32", *extra]


@pytest.mark.parametrize("objective", ["clm", "mlm", "rtd"])
def test_tiny_run_leaves_a_complete_run_directory(corpus, tmp_path, objective, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_args(corpus, out, objective, "--max-steps", "6")) == 0
    for name in ("config.json", "train_config.json", "tokenizer/tokenizer.model", "model.safetensors",
                 "best.safetensors", "state/trainer.pt", "metrics.jsonl", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val_loss"] > 0
    assert ("val_bpc" in summary) == (objective == "clm")
    if objective == "clm":      # the final evaluation scores every validation token (the first after a context token)
        nats = summary["val_loss"] * summary["val_tokens"]
        assert summary["val_bpc"] == pytest.approx(nats / summary["val_chars"] / math.log(2), rel=1e-6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert load_model_dir(out).config.causal == (objective == "clm")
    printed = capsys.readouterr().out
    assert str(out) in printed
    # --no-progress: every logged row is a line of its own instead of a progress bar
    assert "step 3 lr " in printed and " val_loss " in printed and "tokenizing" not in printed
    if objective == "rtd":      # an ELECTRA run fills masks with its generator
        assert sample.main([str(out), "--prompt", "the [MASK] sat on the mat"]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith("best: the ")


def test_data_tokenizer_and_budget_flags_reach_the_run(corpus, tmp_path):
    """--text-field of a .jsonl corpus, --tokenizer DIR (reused byte for byte), --split tail,
    --attention manual and --max-tokens (the budget in tokens: ceil(N / tokens per step) steps)."""
    jsonl = tmp_path / "corpus.jsonl"
    paragraphs = corpus.read_text().split("\n\n")
    jsonl.write_text("".join(json.dumps({"body": p}) + "\n" for p in paragraphs))
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(tiny_args(jsonl, first, "clm", "--text-field", "body", "--max-steps", "2")) == 0
    args = tiny_args(jsonl, second, "clm", "--text-field", "body", "--tokenizer", str(first / "tokenizer"),
                     "--split", "tail", "--attention", "manual", "--max-tokens", "1000")
    del args[args.index("--vocab-size"):args.index("--vocab-size") + 2]     # the tokenizer brings its own
    assert train.main(args) == 0
    tokenizer_file = "tokenizer/tokenizer.model"
    assert (second / tokenizer_file).read_bytes() == (first / tokenizer_file).read_bytes()
    summary = json.loads((second / "summary.json").read_text())
    assert summary["steps"] == math.ceil(1000 / (4 * 32)) and summary["stop_reason"] == "budget: --max-tokens"
    config = json.loads((second / "train_config.json").read_text())
    assert (config["split"], config["attention"], config["text_field"]) == ("tail", "manual", "body")
    with pytest.raises(MinilmError, match="no string field 'text'"):
        train.main(tiny_args(jsonl, tmp_path / "third", "clm", "--max-steps", "1"))


def test_whole_word_mask_flag_reaches_the_masking(corpus, tmp_path):
    """--whole-word-mask is saved in train_config.json and changes the masks (the loss of
    the same first step differs from the piece-by-piece run's)."""
    losses = {}
    for flag in ([], ["--whole-word-mask"]):
        out = tmp_path / ("wwm" if flag else "pieces")
        assert train.main(tiny_args(corpus, out, "mlm", "--max-steps", "2", *flag)) == 0
        assert json.loads((out / "train_config.json").read_text())["whole_word_mask"] == bool(flag)
        losses[bool(flag)] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert losses[True] != losses[False]
    with pytest.raises(MinilmError, match="whole-word-mask is for --objective mlm or rtd"):
        train.main(tiny_args(corpus, tmp_path / "clm", "clm", "--max-steps", "2", "--whole-word-mask"))
    assert not (tmp_path / "clm").exists()


def test_shape_flags_change_the_preset(corpus, tmp_path):
    """--norm-position pre turns BERT's post-LN into a pre-LN encoder; the llama-tiny shape
    (RoPE, SwiGLU, RMSNorm) with --objective mlm becomes a bidirectional encoder."""
    out = tmp_path / "pre"
    assert train.main(tiny_args(corpus, out, "mlm", "--max-steps", "2", "--norm-position", "pre")) == 0
    config = load_model_dir(out).config
    assert (config.norm_position, config.causal, config.d_model, config.n_layers) == ("pre", False, 32, 2)
    out = tmp_path / "rope"
    assert train.main(tiny_args(corpus, out, "mlm", "--max-steps", "2", "--preset", "llama-tiny")) == 0
    config = load_model_dir(out).config
    assert (config.position, config.mlp, config.causal) == ("rope", "swiglu", False)


@pytest.mark.parametrize("preset, flag, tied", [("llama-tiny", None, False), ("llama-tiny", "--tie-embeddings", True),
                                                ("bert-tiny", None, True), ("bert-tiny", "--no-tie-embeddings", False)])
def test_tie_embeddings_flag_overrides_the_preset(corpus, tmp_path, preset, flag, tied):
    """Tied, the MLM decoder of the saved and reloaded model is the token-embedding matrix itself;
    the flag (or its absence: None, the preset decides) is recorded in train_config.json."""
    out = tmp_path / "run"
    assert train.main(tiny_args(corpus, out, "mlm", "--max-steps", "2", "--preset", preset,
                                *([flag] if flag else []))) == 0
    model = load_model_dir(out)
    assert model.config.tie_embeddings is tied
    shared = model.decoder.weight is model.transformer.embeddings.tokens.weight
    assert shared is tied
    assert json.loads((out / "train_config.json").read_text())["tie_embeddings"] == (tied if flag else None)


@pytest.mark.parametrize("objective", ["clm", "rtd"])
def test_interrupted_then_resumed_run_matches_the_uninterrupted_one(corpus, tmp_path, monkeypatch, objective):
    """rtd also draws the generator's samples from the global RNG, which the state restores."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = ("--max-steps", "8", "--save-every", "4", "--dropout", "0.1")
    assert train.main(tiny_args(corpus, straight, objective, *args)) == 0

    batches = data.CLMBatches if objective == "clm" else data.MLMBatches
    original = batches.batch

    def crash_at_step_5(self, step):  # as if the machine died during step 6, after the save at 4
        if step == 5:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(batches, "batch", crash_at_step_5)
    assert main_guard(lambda: train.main(tiny_args(corpus, broken, objective, *args))) == 130
    monkeypatch.setattr(batches, "batch", original)
    assert train.main(tiny_args(corpus, broken, objective, *args, "--resume")) == 0

    def curve(run):
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]

    assert curve(broken) == curve(straight)


def test_ctrl_c_then_resume_with_only_out_continues_the_run_as_saved(corpus, tmp_path, monkeypatch, capsys):
    """What the Ctrl-C message says to type is enough: --resume --out RUN_DIR, no other flag."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = ("--max-steps", "8", "--save-every", "100", "--lr", "3e-3")
    assert train.main(tiny_args(corpus, straight, "mlm", *args)) == 0
    original = data.MLMBatches.batch

    def ctrl_c_at_step_5(self, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step)

    monkeypatch.setattr(data.MLMBatches, "batch", ctrl_c_at_step_5)
    assert main_guard(lambda: train.main(tiny_args(corpus, broken, "mlm", *args)), resumable=True) == 130
    assert capsys.readouterr().err == (f"interrupted at step 6: the state is saved in {broken}/state; "
                                       f"continue with --resume --out {broken}\n")
    monkeypatch.setattr(data.MLMBatches, "batch", original)
    assert train.main(["--resume", "--out", str(broken)]) == 0

    def curve(run):
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]

    assert curve(broken) == curve(straight)


def test_resume_keeps_the_runs_settings_and_takes_only_a_new_budget(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_args(corpus, out, "clm", "--max-steps", "3")) == 0
    files = ("model.safetensors", "train_config.json", "metrics.jsonl", "summary.json")
    before = {name: (out / name).read_bytes() for name in files}
    for flags, message in ((["--lr", "0.5"], "--lr 0.5 differs from this run's 0.002"),
                           (["--seq-len", "16"], "--seq-len 16 differs from this run's 32"),
                           # given with train.py's default value: still given (it used to be ignored)
                           (["--warmup-steps", "100"], "--warmup-steps 100 differs from this run's 2"),
                           ([], "has already spent its budget (step 3)")):
        assert main_guard(lambda: train.main(["--out", str(out), "--resume", *flags])) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert {name: (out / name).read_bytes() for name in files} == before      # a refused resume writes nothing
    assert train.main(["--out", str(out), "--resume", "--max-steps", "5", "--eval-every", "200"]) == 0   # further
    assert json.loads((out / "summary.json").read_text())["steps"] == 5
    loop = json.loads((out / "train_config.json").read_text())["loop"]
    assert loop["max_steps"] == 5 and loop["eval_every"] == 200       # 200 is the default, given all the same


def test_a_copied_or_moved_run_resumes_where_it_is_now(corpus, tmp_path):
    """train_config.json records the --out a run was started with; resuming a copy must train
    the copy, not write into the original (and a moved run must still be found)."""
    original = tmp_path / "run"
    assert train.main(tiny_args(corpus, original, "clm", "--max-steps", "3")) == 0
    before = {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()}
    copy, moved = tmp_path / "copy", tmp_path / "moved"
    shutil.copytree(original, copy)
    assert train.main(["--out", str(copy), "--resume", "--max-steps", "5"]) == 0
    assert json.loads((copy / "summary.json").read_text())["steps"] == 5
    assert json.loads((copy / "train_config.json").read_text())["out"] == str(copy)
    assert {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()} == before
    original.rename(moved)
    assert train.main(["--out", str(moved), "--resume", "--max-steps", "4"]) == 0
    assert json.loads((moved / "summary.json").read_text())["steps"] == 4


def test_resume_says_when_the_data_changed_since_the_run_started(corpus, tmp_path, capsys):
    """data.json records each split's counts; a resume on other data continues (say a corpus
    with a typo fixed) but says it will not match an uninterrupted run. A copy of the same
    text, with new file times, is no change."""
    text = tmp_path / "corpus.txt"
    shutil.copy(corpus, text)
    out = tmp_path / "run"
    assert train.main(tiny_args(text, out, "clm", "--max-steps", "3")) == 0
    record = json.loads((out / "data.json").read_text())
    assert record["sources"][0]["path"] == str(text) and record["splits"]["train"]["tokens"] > 0
    capsys.readouterr()
    shutil.copy(corpus, text)                  # same content, new mtime and ctime
    assert train.main(["--out", str(out), "--resume", "--max-steps", "4"]) == 0
    assert "the data differs" not in capsys.readouterr().out
    text.write_text(corpus.read_text() + "\n\nThe red bird sat on the big hill.\n")
    assert train.main(["--out", str(out), "--resume", "--max-steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert "note: the data differs from what this run started on" in printed
    assert "will not match an uninterrupted run" in printed
    assert json.loads((out / "summary.json").read_text())["steps"] == 5


def test_a_run_started_with_relative_paths_resumes_from_another_directory(corpus, tmp_path, monkeypatch, capsys):
    """train_config.json keeps --data, --tokenizer and --cache-dir absolute, so that --resume
    from elsewhere reads the same files, and the same file spelt another way is no change."""
    work = tmp_path / "work"
    (work / "text").mkdir(parents=True)
    shutil.copy(corpus, work / "text" / "corpus.txt")
    monkeypatch.chdir(work)
    args = tiny_args(work / "text" / "corpus.txt", work / "run", "clm", "--max-steps", "3")
    for name, relative in (("--data", "text/corpus.txt"), ("--out", "run"), ("--cache-dir", "cache")):
        args[args.index(name) + 1] = relative
    assert train.main(args) == 0
    saved = json.loads((work / "run" / "train_config.json").read_text())
    assert saved["data"] == [str(work / "text" / "corpus.txt")] and saved["cache_dir"] == str(work / "cache")

    monkeypatch.chdir(tmp_path)
    assert train.main(["--out", "work/run", "--resume", "--max-steps", "4"]) == 0
    respelled = "work/text/../text/corpus.txt"       # the same file, spelt another way: no change
    assert train.main(["--out", "work/run", "--resume", "--max-steps", "5", "--data", respelled]) == 0
    assert json.loads((work / "run" / "summary.json").read_text())["steps"] == 5
    assert main_guard(lambda: train.main(["--out", "work/run", "--resume", "--max-steps", "6",
                                          "--data", str(corpus)])) == 2
    assert "differs from this run's" in capsys.readouterr().err


def test_damaged_or_foreign_run_directories_are_one_line_errors_on_resume(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_args(corpus, out, "clm", "--max-steps", "3")) == 0
    trainer_pt = (out / "state" / "trainer.pt").read_bytes()
    for damaged in (trainer_pt[:100], b""):     # torch.load of an empty file raises a bare EOFError
        (out / "state" / "trainer.pt").write_bytes(damaged)
        assert main_guard(lambda: train.main(["--out", str(out), "--resume", "--max-steps", "5"])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "state/trainer.pt is damaged" in err and "cannot be resumed" in err
    (out / "state" / "trainer.pt").write_bytes(trainer_pt)
    (out / "state" / "model.safetensors").unlink()
    assert main_guard(lambda: train.main(["--out", str(out), "--resume", "--max-steps", "5"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "state/model.safetensors is missing: the run cannot be resumed" in err
    shutil.rmtree(out / "tokenizer")            # training a new one would scramble the embeddings' ids
    assert main_guard(lambda: train.main(["--out", str(out), "--resume", "--max-steps", "5"])) == 2
    assert "tokenizer/tokenizer.model is missing" in capsys.readouterr().err
    assert not (out / "tokenizer").exists()
    shutil.rmtree(out / "state")
    assert main_guard(lambda: train.main(["--out", str(out), "--resume", "--max-steps", "5"])) == 2
    assert "has no saved state (no state/: the run stopped before its first step, or state/ was removed)" \
        in capsys.readouterr().err
    config = (out / "train_config.json").read_text()
    (out / "train_config.json").write_text(config[:40])
    assert main_guard(lambda: train.main(["--out", str(out), "--resume"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_config.json is damaged: not valid JSON" in err
    (out / "train_config.json").write_text(json.dumps({**json.loads(config), "init": "scratch"}))
    assert main_guard(lambda: train.main(["--out", str(out), "--resume"])) == 2
    assert "is a finetune.py run: --resume continues train.py runs only" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_args(corpus, out, "clm", "--max-steps", "2")) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main_guard(lambda: train.main(tiny_args(corpus, out, "clm", "--max-steps", "2"))) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--objective", "rtd", "--generator-layers", "3"], "--generator-layers 3: choose 1 … 2"),
    (["--objective", "mlm", "--mask-prob", "0"], "--mask-prob must be in (0, 1], got 0.0"),
    (["--n-heads", "0"], "model shape: n_heads=0 must be > 0"),
    (["--dropout", "1.5"], "model shape: dropout=1.5 must be in [0, 1)"),
    (["--eval-tokens", "0"], "--eval-tokens must be > 0, got 0"),     # scored an empty window as loss 0
    (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["--out", "{file}"], "is a file, not a directory"),
    (["--out", "{file}/run"], "Not a directory"),
    (["--cache-dir", "{file}"], "--cache-dir {file} is a file, not a directory"),
    # tiny_args gives --vocab-size: ignored beside a trained tokenizer, but it would be recorded as if used
    (["--tokenizer", "{file}"], "--vocab-size: --tokenizer "),
])
def test_bad_settings_are_one_line_errors_and_leave_no_run_directory(corpus, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    (tmp_path / "file").write_text("")
    args = [a.format(file=tmp_path / "file") for a in args]
    message = message.format(file=tmp_path / "file")
    code = main_guard(lambda: train.main(tiny_args(corpus, out, "clm", "--max-steps", "1", *args)))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()      # --n-heads 0 is found after the tokenizer was trained and saved there
    if args[0] == "--n-heads":   # so the same --out, fixed, works at once
        assert train.main(tiny_args(corpus, out, "clm", "--max-steps", "1")) == 0
        (tmp_path / "mine").mkdir()                  # a user's own empty directory is kept
        assert main_guard(lambda: train.main(tiny_args(corpus, tmp_path / "mine", "clm", "--max-steps", "1",
                                                       *args))) == 2
        assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_missing_data_is_one_line_error(tmp_path, capsys):
    code = main_guard(lambda: train.main(["--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r"),
                                          "--max-steps", "1"]))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
