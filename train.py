"""Pretrain a minilm model from raw text (causal LM or masked LM).

    python train.py                       # GPT-style model on the embedded King James Bible, ~3 min on CPU
    python train.py --objective mlm       # BERT-style masked LM instead
    python train.py --data corpus/ --time-budget 600 --preset gpt-mini
    python train.py --data tinyshakespeare --split tail --val-fraction 0.1
    python train.py --out runs/mine --resume          # continue an interrupted run exactly

The run directory holds everything the next steps need: finetune.py --init RUN_DIR,
python -m minilm.sample RUN_DIR --prompt "...", and export to Hugging Face.
"""

from __future__ import annotations

import argparse
import sys
import time

from minilm.cli import (ArgumentParser, HelpFormatter, add_machine_flags, add_shape_flags, choices, config_from_args,
                        given_flags, main_guard)
from minilm.config import PRESETS, flag
from minilm.errors import MinilmError
from minilm.pretrain import PretrainConfig, resumed_config, run, with_absolute_paths
from minilm.training import LoopConfig


def parse_args(argv: list[str] | None) -> PretrainConfig:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument_group("data")
    a.add_argument("--data", nargs="*", default=[], help="text files, directories, globs (.txt/.jsonl) or a "
                   "named corpus (tinyshakespeare); none: the embedded King James Bible")
    a.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    a.add_argument("--val-fraction", type=float, default=0.05, help="share of the data held out for validation")
    a.add_argument("--split", choices=choices(PretrainConfig, "split"), default="doc",
                   help="doc: whole documents by hash; tail: the last characters of the stream")
    a.add_argument("--cache-dir", default=None, help="downloads and prepared token files (default $MINILM_CACHE or ~/.cache/minilm)")
    a = p.add_argument_group("tokenizer")
    a.add_argument("--tokenizer", default=None, help="reuse a saved tokenizer directory instead of training one")
    a.add_argument("--vocab-size", type=int, default=4096, help="pieces of the tokenizer trained on the corpus")
    a.add_argument("--tokenizer-type", choices=choices(PretrainConfig, "tokenizer_type"), default="bpe",
                   help="SentencePiece model of the trained tokenizer")
    a = p.add_argument_group("model")
    a.add_argument("--objective", choices=choices(PretrainConfig, "objective"), default="clm",
                   help="causal LM (GPT), masked LM (BERT) or replaced-token detection (ELECTRA: a small MLM "
                        "generator corrupts the input, the encoder spots the replaced tokens)")
    a.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default: gpt-mini for clm, bert-mini for mlm and rtd")
    add_shape_flags(a, "override the preset")
    a.add_argument("--seq-len", type=int, default=128, help="context length in tokens")
    a.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="share the token-embedding matrix with the MLM/LM decoder, so that every prediction "
                        "also trains the input embeddings (default: as the preset; BERT and GPT-2 tie, Llama "
                        "does not)")
    a.add_argument("--dropout", type=float, default=0.0, help="dropout in the model while pretraining")
    a.add_argument("--attention", choices=choices(PretrainConfig, "attention"), default="sdpa",
                   help="fused scaled_dot_product_attention, or the hand-written softmax(QKᵀ/√d)V")
    a.add_argument("--mask-prob", type=float, default=0.15, help="MLM and RTD: share of tokens to mask")
    a.add_argument("--whole-word-mask", action="store_true", help="MLM and RTD: mask all the pieces of a "
                   "chosen word together (BERT's whole-word masking) instead of pieces independently")
    a.add_argument("--generator-layers", type=int, default=1, help="RTD: blocks of the generator (same width, "
                   "shared embeddings)")
    a = p.add_argument_group("optimisation")
    a.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch")
    a.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    a.add_argument("--min-lr-ratio", type=float, default=0.1, help="the schedule's floor, as a share of --lr")
    a.add_argument("--warmup-steps", type=int, default=100, help="steps of linear warmup")
    a.add_argument("--schedule", choices=choices(LoopConfig, "schedule"), default="cosine",
                   help="decay of the learning rate over the budget")
    a.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW's, on weight matrices (not norms, biases, embeddings)")
    a.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    a = p.add_argument_group("budget (the first reached stops the run)")
    a.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    a.add_argument("--max-tokens", type=int, default=None,
                   help="training tokens (a budget that a busy machine cannot change)")
    a.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training; default 150 when no budget is given")
    a = p.add_argument_group("run")
    a.add_argument("--out", default=None, help="run directory (default runs/OBJECTIVE-TIMESTAMP)")
    a.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    a.add_argument("--eval-every", type=int, default=200, help="steps between validations (0: only at the end)")
    a.add_argument("--eval-tokens", type=int, default=65536, help="tokens scored by periodic validations")
    a.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    a.add_argument("--save-every", type=int, default=500, help="steps between resume states")
    add_machine_flags(a)
    args = p.parse_args(argv)
    # the settings this command line gives (as config field names): all that --resume may change
    given = {"progress" if dest == "no_progress" else dest for dest in given_flags(p, argv)}

    trained = sorted(given & {"vocab_size", "tokenizer_type", "tokenizer_sentences"})
    if args.tokenizer is not None and trained:     # they would be ignored, but recorded as if used
        raise MinilmError(f"{', '.join(flag(name) for name in trained)}: --tokenizer {args.tokenizer} is a "
                          "trained tokenizer; leave them out")
    if args.resume and not args.out:
        p.error("--resume needs --out RUN_DIR")
    if args.max_steps is None and args.max_tokens is None and args.time_budget is None:
        args.time_budget = 150.0
    loop = LoopConfig(lr=args.lr, warmup_steps=args.warmup_steps, schedule=args.schedule,
                      min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                      grad_accum=args.grad_accum, max_steps=args.max_steps, max_tokens=args.max_tokens,
                      time_budget=args.time_budget, log_every=args.log_every, eval_every=args.eval_every,
                      save_every=args.save_every, compile=args.compile, progress=not args.no_progress)
    out = args.out or f"runs/{args.objective}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = with_absolute_paths(config_from_args(PretrainConfig, args, out=out, loop=loop))
    return resumed_config(cfg, given) if args.resume else cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    summary = run(cfg)
    print()
    print(f"done in {summary['wall_seconds']:.0f}s: {summary['steps']} steps, {summary['tokens']:,} tokens "
          f"({summary['stop_reason']})")
    if cfg.objective == "rtd":
        line = (f"validation: replaced-token detection accuracy {summary['val_rtd_acc']:.1%} ("
                f"{summary['val_replaced']:.1%} of tokens replaced), loss {summary['val_rtd_loss']:.3f}; generator "
                f"MLM loss {summary['val_mlm_loss']:.3f}, masked-token accuracy {summary['val_mlm_acc']:.1%}")
    else:
        line = f"validation: loss {summary['val_loss']:.3f} nats/token, perplexity {summary['val_ppl']:.1f}"
    if "val_bpc" in summary:
        line += f", {summary['val_bpc']:.3f} bits/char"
    if "val_mlm_acc" in summary and cfg.objective == "mlm":
        line += f", masked-token accuracy {summary['val_mlm_acc']:.1%}"
    print(line)
    print(f"outputs: {cfg.out}/  (model.safetensors, best.safetensors, metrics.jsonl, summary.json, loss.png)")
    if cfg.objective == "rtd":
        print(f"next:    python finetune.py --init {cfg.out}   (the discriminator is the encoder to finetune)")
        return 0
    if cfg.objective == "clm":
        kind = '--prompt "And God said"' if not cfg.data else '--prompt "The"'
    else:
        kind = '--prompt "In the beginning God created the [MASK]."' if not cfg.data else '--prompt "The [MASK] is here."'
    print(f"try:     python -m minilm.sample {cfg.out} {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main, resumable=True))
