"""Sample from a trained run directory: continue a prompt, or fill in [MASK]s.

    python -m minilm.sample runs/gpt --prompt "In the beginning" --max-new-tokens 100
    python -m minilm.sample runs/bert --prompt "And God said, Let there be [MASK]."

A causal-LM run (config.json "head": "clm") prints the prompt followed by its
continuation, once per --num-samples. A masked-LM run ("head": "mlm") reads --prompt as
a fill-mask query and prints the --num-candidates most likely tokens for every [MASK].

Documents in the training stream each end with </s> (minilm.data), so a causal prompt is
fed as "</s> prompt": the model reads it as the start of a new document (and an empty
prompt works). Generation stops at the next </s>, the end of the generated document.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minilm.checkpoint import load_model_dir
from minilm.cli import ArgumentParser, given_flags, main_guard
from minilm.config import flag
from minilm.data import load_tokenizer
from minilm.errors import MinilmError
from minilm.generate import check_sampling_options, fill_in, fill_mask, generate
from minilm.model import CausalLM, MaskedLM, ReplacedTokenDetection
from minilm.training import resolve_device
from tokenizer import Tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m minilm.sample", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run directory written by train.py (a causal or masked LM)")
    parser.add_argument("--prompt", default="", help="text to continue (causal LM) or text with [MASK]s (masked LM)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample among the k most likely tokens (0 = no top-k filter)")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="nucleus: smallest set of tokens with total probability >= p (1.0 = no filter)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations to draw (one batch)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--num-candidates", type=int, default=5,
                        help="masked LM: candidates shown per [MASK]")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--no-cache", action="store_true",
                        help="re-encode the whole context every step instead of using the KV cache")
    parser.add_argument("--weights", default="model.safetensors",
                        help="weights file inside the run directory (e.g. best.safetensors)")
    return parser


def sample_causal(model: CausalLM, tokenizer: Tokenizer, args: argparse.Namespace, device: torch.device) -> None:
    """Print prompt + continuation for each of --num-samples rows, drawn as one batch."""
    prompt_ids = [tokenizer.eos_id] + tokenizer.encode(args.prompt)      # "</s>" = start of a document
    input_ids = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, input_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k or None, top_p=args.top_p, greedy=args.greedy,
                   eos_id=tokenizer.eos_id, generator=generator, use_cache=not args.no_cache)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        continuation = tokenizer.decode(row[len(prompt_ids):])           # drops </s> and padding
        print(args.prompt + continuation)


def sample_masked(model: MaskedLM, tokenizer: Tokenizer, args: argparse.Namespace) -> None:
    """Print a table of the top candidates per [MASK], then the text with the best ones filled in."""
    per_mask = fill_mask(model, tokenizer, args.prompt, top_k=args.num_candidates)
    for n, candidates in enumerate(per_mask, start=1):
        print(f"[MASK] {n}")
        print(f"  {'rank':>4}  {'token':<20} {'probability':>11}")
        for rank, (token, prob) in enumerate(candidates, start=1):
            print(f"  {rank:>4}  {token!r:<20} {prob:>11.4f}")
    print(f"best: {fill_in(args.prompt, [candidates[0][0] for candidates in per_mask])}")


# Flags that only one kind of model reads: given to the other, they would be silently ignored.
CAUSAL_ONLY = ("max_new_tokens", "temperature", "top_k", "top_p", "num_samples", "greedy", "no_cache")
MASKED_ONLY = ("num_candidates",)


def run(args: argparse.Namespace, given: set[str] = frozenset()) -> None:
    """given: the flags (dests) the command line set; checked against the kind of model."""
    if args.max_new_tokens < 0:
        raise MinilmError(f"--max-new-tokens {args.max_new_tokens} is negative")
    if args.num_samples < 1:
        raise MinilmError(f"--num-samples {args.num_samples}: draw at least 1")
    if args.top_k < 0:
        raise MinilmError(f"--top-k {args.top_k} is negative: use 0 (no filter) or k >= 1")
    if args.num_candidates < 1:
        raise MinilmError(f"--num-candidates {args.num_candidates}: show at least 1")
    check_sampling_options(args.temperature, args.top_k or None, args.top_p)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as err:       # undecodable bytes on the command line arrive as lone surrogates
        raise MinilmError(f"--prompt is not valid UTF-8 text (position {err.start}); check the terminal's "
                          "encoding") from err
    device = resolve_device(args.device)
    if not args.run_dir.is_dir():
        what = "is a file, not a run directory" if args.run_dir.exists() else "not found"
        raise MinilmError(f"{args.run_dir} {what}: pass the --out directory of a training run")

    model = load_model_dir(args.run_dir, weights_name=args.weights).to(device)
    tokenizer = load_tokenizer(args.run_dir / "tokenizer")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise MinilmError(f"{args.run_dir}/tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size}: the tokenizer is not the one the model was trained with")
    if isinstance(model, ReplacedTokenDetection):   # ELECTRA: its generator is a masked LM
        print(f"{args.run_dir} is an ELECTRA run: filling masks with its generator", file=sys.stderr)
        model = model.generator
    kind = "causal LM" if isinstance(model, CausalLM) else "masked LM" if isinstance(model, MaskedLM) else None
    if kind is None:
        raise MinilmError(f"{args.run_dir} holds a {type(model).__name__}, which does not generate text: "
                          "sample from a pretraining run (causal or masked LM)")
    unread = sorted(given & set(MASKED_ONLY if kind == "causal LM" else CAUSAL_ONLY))
    if unread:
        raise MinilmError(f"{', '.join(map(flag, unread))}: not read by a {kind}; a causal LM continues the prompt (--max-new-tokens, "
                          "--temperature, …), a masked LM fills its [MASK]s (--num-candidates)")
    print(f"device {device}, {kind}, {model.num_parameters():,} parameters", file=sys.stderr)

    if isinstance(model, CausalLM):
        sample_causal(model, tokenizer, args, device)
    else:
        sample_masked(model, tokenizer, args)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error printed as one line on stderr)."""
    def sample() -> int:
        parser = build_parser()
        run(parser.parse_args(argv), given_flags(parser, argv))
        return 0

    return main_guard(sample)


if __name__ == "__main__":
    sys.exit(main())
