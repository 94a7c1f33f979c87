"""Pretraining from raw text, end to end: the library behind train.py.

    sources ─► tokenizer (train on the training split, or reuse) ─► token files (cached)
            ─► model (preset + overrides) ─► batches (CLM windows | MLM/RTD packed + masked)
            ─► Trainer.fit ─► run directory (weights, metrics, summary, curves)

Objectives: clm (CausalLM), mlm (MaskedLM), rtd (ReplacedTokenDetection, ELECTRA: the
same masked batches as mlm feed a small generator whose samples the encoder must spot).

Evaluation reports the validation loss (nats per predicted token), perplexity e^loss and,
for causal LM, bits per character: the total nats over the whole validation text
divided by its characters and ln 2, which compares runs with different tokenizers.
For rtd: the generator's MLM loss and accuracy and the detection loss and accuracy.
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import torch

from minilm import data
from minilm.checkpoint import new_run_setup, read_json, save_model_dir, write_json
from minilm.config import (Attention, ModelConfig, NormPosition, check_choices, check_ranges, flag, preset,
                           shape_overrides)
from minilm.errors import MinilmError
from minilm.model import HEADS, PreTrained, ReplacedTokenDetection
from minilm.objectives import RTD_WEIGHT, bits_per_char, mask_tokens, perplexity, summed_nll
from minilm.training import LoopConfig, Precision, Trainer, dtype_name, plot_curves, say, setup_device
from tokenizer import Tokenizer, TokenizerType

Objective = Literal["clm", "mlm", "rtd"]     # causal LM, masked LM, replaced-token detection (ELECTRA)
DEFAULT_PRESET = {"clm": "gpt-mini", "mlm": "bert-mini", "rtd": "bert-mini"}


@dataclass
class PretrainConfig:
    """Every choice of a pretraining run (train.py's flags); saved as train_config.json."""

    out: str
    data: list[str] = field(default_factory=list)
    objective: Objective = "clm"
    preset: str | None = None
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    d_ff: int | None = None
    norm_position: NormPosition | None = None
    tie_embeddings: bool | None = None   # None: as the preset (BERT, GPT-2 tied; Llama untied)
    dropout: float = 0.0
    attention: Attention = "sdpa"
    seq_len: int = 128
    batch_size: int = 32
    vocab_size: int = 4096
    tokenizer_type: TokenizerType = "bpe"
    tokenizer: str | None = None
    tokenizer_sentences: int = 1_000_000
    val_fraction: float = 0.05
    split: data.SplitMode = "doc"
    text_field: str = "text"
    mask_prob: float = 0.15
    whole_word_mask: bool = False   # mlm/rtd: mask every piece of a chosen word together
    generator_layers: int = 1       # rtd (ELECTRA): the generator's blocks
    eval_tokens: int = 65_536       # periodic evals score this many tokens; the final one all
    cache_dir: str | None = None
    device: str = "auto"
    dtype: Precision = "auto"
    seed: int = 0
    resume: bool = False
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=1))


# A resumed run is the same run: it keeps the settings in its train_config.json. A command
# line may change only these: a longer (or shorter) budget, the device, and how it reports.
RESUME_MAY_CHANGE = ("max_steps", "max_tokens", "time_budget", "device", "compile", "progress", "log_every",
                     "eval_every", "save_every")
BUDGETS = ("max_steps", "max_tokens", "time_budget")


def with_absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """cfg with --data, --tokenizer and --cache-dir made absolute (against the current
    directory): train_config.json then names the same files when --resume runs elsewhere."""
    return replace(cfg, data=[data.absolute_spec(spec) for spec in cfg.data],
                   tokenizer=cfg.tokenizer and data.absolute_spec(cfg.tokenizer),
                   cache_dir=cfg.cache_dir and os.path.abspath(Path(cfg.cache_dir).expanduser()))


def resumed_config(cli: PretrainConfig, given: set[str]) -> PretrainConfig:
    """The settings of the run in cli.out (its train_config.json) with the changes this command
    line may make. `given`: the fields (PretrainConfig's or LoopConfig's) its flags set. A flag
    that would change anything else is an error, not silently a different run."""
    path = Path(cli.out) / "train_config.json"
    if not path.is_file():
        raise MinilmError(f"--resume: {path} not found; is {cli.out} a train.py run directory?")
    saved_fields = read_json(path)
    if "init" in saved_fields:
        raise MinilmError(f"{cli.out} is a finetune.py run: --resume continues train.py runs only")
    loop_fields = saved_fields.pop("loop", {})
    try:
        # a run saved with relative paths (before they were made absolute) is read from here
        saved = with_absolute_paths(PretrainConfig(**saved_fields, loop=LoopConfig(**loop_fields)))
    except TypeError as err:
        raise MinilmError(f"{path}: {err}") from err
    loop_names = {f.name for f in fields(LoopConfig)}
    # the run is where it is now: a copied or moved run directory continues in place
    changes: dict = {"resume": True, "out": cli.out}
    loop_changes: dict = {}
    for name in sorted(given - {"out", "resume"}):
        on_loop = name in loop_names
        now, before = getattr(cli.loop if on_loop else cli, name), getattr(saved.loop if on_loop else saved, name)
        if now == before:
            continue
        if name not in RESUME_MAY_CHANGE:
            raise MinilmError(f"{flag(name)} {now} differs from this run's {before} ({path}): a "
                              "resumed run keeps its settings; leave the flag out, or start a new run")
        (loop_changes if on_loop else changes)[name] = now
    if loop_changes.keys() & set(BUDGETS):     # a new budget replaces the old one whole
        loop_changes.update({name: getattr(cli.loop, name) for name in BUDGETS})
    return replace(saved, **changes, loop=replace(saved.loop, **loop_changes))


def build_tokenizer(cfg: PretrainConfig, sources: list[data.Source], run_dir: Path) -> Tokenizer:
    """Reuse run_dir/tokenizer (resume) or --tokenizer DIR, else train on the training split."""
    saved = run_dir / "tokenizer"
    if (saved / "tokenizer.model").is_file():
        return data.load_tokenizer(saved)
    if cfg.resume:      # a tokenizer trained again would give other ids to the model's embeddings
        raise MinilmError(f"--resume: {saved}/tokenizer.model is missing, and a new tokenizer would not give the "
                          "ids the model was trained on; restore it, or start a new run")
    if cfg.tokenizer:
        tok = data.load_tokenizer(cfg.tokenizer)
    else:
        t0 = time.perf_counter()
        def training_texts():
            return data.iter_split_text(sources, split="train", val_fraction=cfg.val_fraction, mode=cfg.split)

        try:
            tok = Tokenizer.train(training_texts(), vocab_size=cfg.vocab_size, model_type=cfg.tokenizer_type,
                                  max_sentences=cfg.tokenizer_sentences, seed=cfg.seed)
        except ValueError as err:
            if next(training_texts(), None) is None and next(data.iter_documents(sources), None) is not None:
                raise data.all_validation_error(cfg.val_fraction, cfg.split) from err
            raise MinilmError(str(err)) from err
        say(f"tokenizer: trained {cfg.tokenizer_type} vocab {len(tok)} in {time.perf_counter() - t0:.1f}s")
    tok.save(saved)
    return tok


def build_model(cfg: PretrainConfig, tok: Tokenizer) -> PreTrained:
    name = cfg.preset or DEFAULT_PRESET[cfg.objective]
    overrides = shape_overrides(cfg)
    if cfg.tie_embeddings is not None:
        overrides["tie_embeddings"] = cfg.tie_embeddings
    try:
        config = preset(name, vocab_size=len(tok), max_seq_len=cfg.seq_len, pad_token_id=tok.pad_id,
                        dropout=cfg.dropout, attn_dropout=cfg.dropout, attention=cfg.attention, **overrides)
    except ValueError as err:
        raise MinilmError(f"model shape: {err}") from err
    if cfg.objective == "rtd":
        if not 1 <= cfg.generator_layers <= config.n_layers:
            raise MinilmError(f"--generator-layers {cfg.generator_layers}: choose 1 … {config.n_layers} (the "
                              "discriminator's depth); ELECTRA's generator is 1/4-1/2 of the discriminator")
        config = config.replace(generator_layers=cfg.generator_layers)
    config = config.replace(causal=cfg.objective == "clm")     # an encoder for mlm and rtd
    torch.manual_seed(cfg.seed)
    return HEADS[cfg.objective](config)


# --------------------------------------------------------------------------------------
# batches and evaluation for each objective
# --------------------------------------------------------------------------------------
def clm_batches(cfg: PretrainConfig, prepared: data.PreparedData):
    batches = data.CLMBatches(prepared.tokens("train"), cfg.seq_len, cfg.batch_size, seed=cfg.seed)

    def get_batch(i: int) -> dict[str, torch.Tensor]:
        x, y = batches.batch(i)
        return {"input_ids": x, "labels": y}

    return get_batch


def clm_evaluate(cfg: PretrainConfig, prepared: data.PreparedData, tok: Tokenizer, device: torch.device):
    """Validation over consecutive windows; bits per character only when the whole text is scored."""
    val = prepared.tokens("val")
    n_chars = prepared.stats("val").chars

    def evaluate(model: PreTrained, final: bool = False) -> dict[str, float]:
        tokens = val if final else val[:cfg.eval_tokens]
        total_nats, n_targets = 0.0, 0
        for x, y in data.eval_windows(tokens, cfg.seq_len, cfg.batch_size, context_id=tok.eos_id, pad_id=tok.pad_id):
            nats, count = summed_nll(model(x.to(device)).logits, y.to(device))
            total_nats, n_targets = total_nats + nats.item(), n_targets + count
        loss = total_nats / max(n_targets, 1)
        metrics = {"val_loss": loss, "val_ppl": perplexity(loss)}
        if len(tokens) == len(val):
            metrics["val_bpc"] = bits_per_char(total_nats, n_chars)
        return metrics

    return evaluate


def mlm_masker(cfg: PretrainConfig, tok: Tokenizer, seed: int):
    """Dynamic masking whose randomness depends only on (seed, batch index): resumable."""

    word_starts = torch.tensor(tok.word_starts()) if cfg.whole_word_mask else None

    def mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        masked, labels = mask_tokens(input_ids, vocab_size=len(tok), mask_id=tok.mask_id,
                                     special_ids=tok.special_ids, attention_mask=attention_mask,
                                     mask_prob=cfg.mask_prob, word_starts=word_starts, generator=gen)
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}

    return mask


def mlm_batches(cfg: PretrainConfig, prepared: data.PreparedData, tok: Tokenizer):
    batches = data.MLMBatches(prepared.tokens("train"), prepared.doc_starts("train"), cfg.seq_len,
                              cfg.batch_size, cls_id=tok.cls_id, sep_id=tok.sep_id, pad_id=tok.pad_id,
                              seed=cfg.seed)
    mask = mlm_masker(cfg, tok, cfg.seed)

    def get_batch(i: int) -> dict[str, torch.Tensor]:
        ids, attention_mask = batches.batch(i)
        return mask(ids, attention_mask, i)

    return get_batch


def mlm_evaluate(cfg: PretrainConfig, prepared: data.PreparedData, tok: Tokenizer, device: torch.device):
    """Masked-token loss and accuracy on validation sequences, masked the same way every time.
    Periodic evaluations score the first eval_tokens worth of sequences; the final one all."""
    batches = data.MLMBatches(prepared.tokens("val"), prepared.doc_starts("val"), cfg.seq_len,
                              cfg.batch_size, cls_id=tok.cls_id, sep_id=tok.sep_id, pad_id=tok.pad_id, seed=0)
    mask = mlm_masker(cfg, tok, seed=12345)
    periodic_batches = max(1, cfg.eval_tokens // (cfg.seq_len * cfg.batch_size))

    def validation_batches(final: bool):
        """Masked validation batches on the device: the first eval_tokens' worth, or all (final)."""
        for i, (ids, attention_mask) in enumerate(batches.ordered_batches()):
            if not final and i >= periodic_batches:
                break
            batch = mask(ids, attention_mask, i)
            if (batch["labels"] != -100).any():     # a batch with nothing masked has no loss (its mean is NaN)
                yield {k: v.to(device) for k, v in batch.items()}

    def evaluate(model: PreTrained, final: bool = False) -> dict[str, float]:
        if isinstance(model, ReplacedTokenDetection):
            return rtd_metrics(model, final)
        total_nats, correct, n = 0.0, 0, 0
        for batch in validation_batches(final):
            targets = batch["labels"][batch["labels"] != -100]
            out = model(**batch)
            total_nats += out.loss.item() * len(targets)
            correct += int((out.logits.argmax(-1) == targets).sum())
            n += len(targets)
        if n == 0:
            raise MinilmError("no validation token was masked: raise --mask-prob or --val-fraction")
        loss = total_nats / n
        return {"val_loss": loss, "val_ppl": perplexity(loss), "val_mlm_acc": correct / n}

    def rtd_metrics(model: ReplacedTokenDetection, final: bool) -> dict[str, float]:
        """ELECTRA: the generator's MLM loss and accuracy, the discriminator's detection loss and
        accuracy over real tokens, and how many tokens the samples replaced. The samples come
        from a fixed generator, so evaluations are comparable and training's RNG is untouched."""
        sampler = torch.Generator(device=device).manual_seed(12345)
        sums = {"mlm_nats": 0.0, "mlm_correct": 0, "masked": 0, "bce": 0.0, "detected": 0, "real": 0, "replaced": 0}
        for batch in validation_batches(final):
            targets = batch["labels"][batch["labels"] != -100]
            out = model(**batch, sampler=sampler)
            n_real = int(out.real.sum())
            sums["mlm_nats"] += out.generator_loss.item() * len(targets)
            sums["mlm_correct"] += int((out.generator_logits.argmax(-1) == targets).sum())
            sums["masked"] += len(targets)
            sums["bce"] += out.detection_loss.item() * n_real
            sums["detected"] += int(((out.logits > 0) == out.replaced)[out.real].sum())
            sums["real"] += n_real
            sums["replaced"] += int(out.replaced[out.real].sum())
        mlm = sums["mlm_nats"] / max(sums["masked"], 1)
        detection = sums["bce"] / max(sums["real"], 1)
        return {"val_loss": mlm + RTD_WEIGHT * detection, "val_mlm_loss": mlm,
                "val_mlm_acc": sums["mlm_correct"] / max(sums["masked"], 1), "val_rtd_loss": detection,
                "val_rtd_acc": sums["detected"] / max(sums["real"], 1),
                "val_replaced": sums["replaced"] / max(sums["real"], 1)}

    return evaluate


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
def split_counts(prepared: data.PreparedData) -> dict:
    """Each split's tokens, documents and characters."""
    return {name: asdict(prepared.stats(name)) for name in data.SPLITS}


def data_record(sources: list[data.Source], prepared: data.PreparedData) -> dict:
    """data.json: what the run trains on, its sources and split_counts."""
    return {"sources": [source.identity() for source in sources], "splits": split_counts(prepared)}


def note_changed_data(out: Path, prepared: data.PreparedData) -> None:
    """A resumed run reads its data again; say so when the split counts differ from data.json
    (the counts, not the file times: a copied corpus keeps its content but not its ctime)."""
    record = out / "data.json"
    if not record.is_file():        # a run from before data.json was written
        return
    was, now = read_json(record).get("splits"), split_counts(prepared)
    if was != now:
        def tokens(counts: dict | None, split: str) -> str:
            return f"{counts[split]['tokens']:,}" if isinstance(counts, dict) and split in counts else "?"
        say(f"note: the data differs from what this run started on (train tokens {tokens(was, 'train')} -> "
            f"{tokens(now, 'train')}, val tokens {tokens(was, 'val')} -> {tokens(now, 'val')}); "
            "it continues on the data as it is now, so it will not match an uninterrupted run")


def prepare_run_dir(out: Path, resume: bool) -> AbstractContextManager:
    """The context of a run's setup. A new run never writes into an existing run, and one whose
    setup fails leaves nothing behind (new_run_setup); --resume requires a saved state."""
    if not resume:
        return new_run_setup(out, hint="pass --resume to continue that run or --out a new directory")
    if not (out / "state").is_dir() and not (out / "state.old").is_dir():
        raise MinilmError(f"--resume: {out} has no saved state (no state/: the run stopped before its first "
                          "step, or state/ was removed); start it again with a new --out")
    return nullcontext()


def run(cfg: PretrainConfig) -> dict:
    check_choices(cfg, MinilmError, as_flags=True)
    if cfg.whole_word_mask and cfg.objective == "clm":
        raise MinilmError("--whole-word-mask is for --objective mlm or rtd: a causal LM masks nothing")
    check_ranges(cfg, MinilmError, as_flags=True,
                 positive=("seq_len", "batch_size", "eval_tokens", "tokenizer_sentences", "generator_layers"))
    if not 0 < cfg.mask_prob <= 1:
        raise MinilmError(f"--mask-prob must be in (0, 1], got {cfg.mask_prob}")
    if cfg.cache_dir and Path(cfg.cache_dir).exists() and not Path(cfg.cache_dir).is_dir():
        raise MinilmError(f"--cache-dir {cfg.cache_dir} is a file, not a directory")
    out = Path(cfg.out)
    with prepare_run_dir(out, cfg.resume):      # a new run's failed setup leaves no directory behind
        device, dtype = setup_device(cfg.device, cfg.dtype)
        wall0 = time.perf_counter()

        sources = data.resolve_sources(cfg.data or None, cfg.cache_dir, text_field=cfg.text_field)
        more = f" (+{len(sources) - 5} more)" if len(sources) > 5 else ""
        say("data: " + ", ".join(s.name for s in sources[:5]) + more)
        tok = build_tokenizer(cfg, sources, out)
        cache = Path(cfg.cache_dir or data.default_cache_dir()) / "prepared"
        key = data.prepare_cache_key(sources, tok, val_fraction=cfg.val_fraction, split=cfg.split)
        prepared = data.prepare_tokens(sources, tok, cache / key[:16], val_fraction=cfg.val_fraction,
                                       split=cfg.split, progress=cfg.loop.progress)
        say(f"tokens: {prepared.train.tokens:,} train / {prepared.val.tokens:,} val "
            f"({prepared.train.chars / max(prepared.train.tokens, 1):.2f} chars per token)"
            + (" [cached]" if prepared.reused else ""))
        if prepared.val.tokens < 2:         # found now, not after the whole budget is trained
            raise MinilmError("the validation split is empty: raise --val-fraction or add data")

        model = build_model(cfg, tok).to(device)
        config: ModelConfig = model.config
        say(f"model: {cfg.objective} {config.n_layers} layers x {config.d_model}, {config.n_heads} heads, "
            f"{model.num_parameters() / 1e6:.2f}M parameters, context {config.max_seq_len}")
        if cfg.objective == "clm":
            get_batch, evaluate = clm_batches(cfg, prepared), clm_evaluate(cfg, prepared, tok, device)
        else:
            get_batch, evaluate = mlm_batches(cfg, prepared, tok), mlm_evaluate(cfg, prepared, tok, device)

        trainer = Trainer(model, get_batch, cfg.loop, out, device, dtype, evaluate=evaluate,
                          final_scores_more=prepared.val.tokens > cfg.eval_tokens)
        if cfg.resume:
            trainer.resume()            # refuses a run that has spent its budget, before writing anything
            say(f"resumed at step {trainer.step}")
            note_changed_data(out, prepared)
        else:
            save_model_dir(model, out)  # config.json now, weights replaced at the end
            write_json(out / "data.json", data_record(sources, prepared))
        write_json(out / "train_config.json", asdict(cfg))     # on resume: with the new budget, if any
    prep_seconds = time.perf_counter() - wall0
    result = trainer.fit()
    summary = {**result, "weights": "model.safetensors = final; best.safetensors = best by val_loss on the "
               "periodic evaluations' set (the first --eval-tokens of validation; \"best\" is that score)",
               "parameters": model.num_parameters(), "prepare_seconds": round(prep_seconds, 1),
               "wall_seconds": round(time.perf_counter() - wall0, 1), "device": str(device),
               "dtype": dtype_name(dtype), "torch": torch.__version__, "python": platform.python_version(),
               "train_tokens_available": prepared.train.tokens, "val_tokens": prepared.val.tokens,
               "val_chars": prepared.val.chars}
    write_json(out / "summary.json", summary)
    plot_curves(out)
    return summary
