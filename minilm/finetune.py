"""Finetuning a sequence classifier: the library behind finetune.py.

    labelled file(s) ─► LabelledData (train, validation) ─► LabelSet (labels.json)
    --init RUN_DIR | hf:PATH | scratch ─► SequenceClassifier: body loaded, head fresh,
                                          + the body's own tokenizer (one TextEncoder interface)
    texts ─► token ids, truncated ─► LengthBucketBatches ─► Trainer.fit (the shared loop;
             best.safetensors by the validation metric, early stopping with --patience)
    best weights ─► validation predictions ─► metrics table, summary.json, confusion.png

    predict(run_dir, texts)  -> label and class probabilities per text
    export(run_dir, out_dir) -> a transformers *ForSequenceClassification directory

Metrics, for K classes and the confusion matrix C (C[i, j] = examples of true class i that
were predicted as class j):

    accuracy    = Σ_i C[i, i] / Σ_ij C[i, j]
    precision_c = C[c, c] / Σ_i C[i, c]     of the examples predicted c, the share truly c
    recall_c    = C[c, c] / Σ_j C[c, j]     of the examples truly c, the share found
    F1_c        = 2 P_c R_c / (P_c + R_c)   harmonic mean (0 when P_c = R_c = 0)
    macro-F1    = (1/K) Σ_c F1_c            every class counts the same, however rare (the K
                                          classes that occur, true or predicted)

Accuracy rewards predicting the majority class; macro-F1 does not, which is why it is
the better choice (--metric macro_f1) for imbalanced labels.
"""

from __future__ import annotations

import math
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from minilm.checkpoint import (WEIGHT_FILES, Weights, load_model_config, load_model_dir, load_weights, new_run_dir,
                               new_run_setup, read_json, run_file, save_model_dir, write_json)
from minilm.classify_data import (DEFAULT_DATASET, EncodedTexts, Header, LabelledData, LabelSet,
                                  LengthBucketBatches, MinilmTextEncoder, TextEncoder, balanced_class_weights,
                                  data_warnings, eval_batches, load_hf_model_text_encoder, load_text_encoder,
                                  pad_batch, read_default_dataset, read_labelled, split_validation)
from minilm.config import (SHAPE_FIELDS, ModelConfig, NormPosition, Pooling, check_choices, check_ranges, flag, preset,
                           shape_overrides)
from minilm.errors import MinilmError
from minilm.model import PreTrained, SequenceClassifier
from minilm.objectives import mask_tokens
from minilm.training import (LoopConfig, Precision, Trainer, autocast, dtype_name, plot_curves, resolve_device, say,
                             setup_device)
from tokenizer import TokenizerType

Metric = Literal["accuracy", "macro_f1"]    # the validation score that picks best.safetensors
METRICS: dict[str, str] = {name: f"val_{name}" for name in get_args(Metric)}   # -> its metrics.jsonl key
# Peak learning rates when --lr is not given. A pretrained body needs small steps or it
# forgets what it learned; a random one (scratch) and a lone head (--freeze-encoder) can
# take larger ones. Values in the range the BERT papers use for models of these sizes.
DEFAULT_LR = {"hf": 5e-5, "run": 2e-4, "scratch": 5e-4, "frozen": 1e-3}
HF_PREFIX = "hf:"
# BERT's finetuning recipe, where it differs from LoopConfig's pretraining defaults: linear
# decay to 0, light weight decay, Adam's usual β2 (short runs do not need 0.95's faster forgetting)
FINETUNE_LOOP = {"schedule": "linear", "min_lr_ratio": 0.0, "weight_decay": 0.01, "beta2": 0.999}


@dataclass
class FinetuneConfig:
    """Every choice of a finetuning run (finetune.py's flags); saved as train_config.json.

    `loop` holds LoopConfig's keyword arguments. Missing or None entries are filled in once
    the data size is known (resolve_loop): max_steps from `epochs`, warmup_steps = 6% of the
    steps, eval_every = once per epoch or every 250 steps if sooner, lr from DEFAULT_LR, the
    rest from FINETUNE_LOOP and then LoopConfig's own defaults.
    """

    out: str
    init: str = "scratch"                 # RUN_DIR | hf:PATH | scratch
    init_weights: Weights = "final"       # RUN_DIR inits: which of its WEIGHT_FILES
    data: str | None = None               # None -> the embedded tweets
    val: str | None = None
    val_fraction: float = 0.1
    text_col: str | None = None
    pair_col: str | None = None
    label_col: str | None = None
    header: Header = "auto"
    encoding: str = "utf-8"
    max_length: int | None = None         # None -> min(128, the model's max_seq_len)
    # scratch only: architecture and tokenizer (None: not given; SCRATCH_DEFAULTS then)
    preset: str | None = None
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    d_ff: int | None = None
    norm_position: NormPosition | None = None
    like: str | None = None               # a run directory whose architecture and tokenizer to copy
    tokenizer: str | None = None
    vocab_size: int | None = None
    tokenizer_type: TokenizerType | None = None
    # the classifier
    pooling: Pooling | None = None        # None -> the model's own (cls for BERT, last for GPT)
    dropout: float | None = 0.1
    freeze_encoder: bool = False
    freeze_embeddings: bool = False
    token_mask: float = 0.0               # augmentation: share of text tokens corrupted per step (MLM style)
    label_smoothing: float = 0.0          # ε: the targets are (1 - ε)·one-hot + ε/K
    class_weights: Literal["none", "auto"] = "none"    # auto: inverse class frequency
    metric: Metric = "accuracy"
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: float = 3.0
    device: str = "auto"
    dtype: Precision = "auto"
    seed: int = 0
    loop: dict = field(default_factory=dict)


# --init scratch's architecture and trained tokenizer when their flags are not given
SCRATCH_DEFAULTS = {"preset": "bert-mini", "vocab_size": 4096, "tokenizer_type": "bpe"}


def scratch_setting(cfg: FinetuneConfig, name: str):
    value = getattr(cfg, name)
    return SCRATCH_DEFAULTS[name] if value is None else value


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------
def occurring_classes(confusion: list[list[int]]) -> list[bool]:
    """The classes that occur, as a true or a predicted class. Macro averages run over these,
    as scikit-learn's do: a class absent from the validation set and never predicted has no
    precision, recall or F1 to average."""
    return [sum(row) + sum(column) > 0 for row, column in zip(confusion, zip(*confusion))]


@dataclass
class ClassificationReport:
    """Scores of predictions against true classes; lists are indexed by class id."""

    labels: list[str]
    confusion: list[list[int]]      # [true][predicted]
    accuracy: float
    macro_f1: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]              # true examples per class

    @classmethod
    def compute(cls, predicted: torch.Tensor, true: torch.Tensor, labels: list[str]) -> ClassificationReport:
        """predicted, true: (N,) class ids. Plain tensor arithmetic, formulas in the module doc."""
        K = len(labels)
        C = torch.bincount(true * K + predicted, minlength=K * K).reshape(K, K).double()  # C[true, pred]
        hits = C.diagonal()
        precision = hits / C.sum(0).clamp(min=1)        # a class never predicted: precision 0
        recall = hits / C.sum(1).clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall),
                         torch.zeros_like(hits))
        confusion = C.long().tolist()
        present = torch.tensor(occurring_classes(confusion))
        return cls(labels=list(labels), confusion=confusion,
                   accuracy=(hits.sum() / C.sum().clamp(min=1)).item(), macro_f1=f1[present].mean().item(),
                   precision=precision.tolist(), recall=recall.tolist(), f1=f1.tolist(),
                   support=C.sum(1).long().tolist())

    def to_dict(self) -> dict:
        per_class = {name: {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4), "support": s}
                     for name, p, r, f, s in zip(self.labels, self.precision, self.recall, self.f1, self.support)}
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "per_class": per_class,
                "confusion": {"rows": "true", "columns": "predicted", "labels": self.labels,
                              "matrix": self.confusion}}

    def table(self) -> str:
        """Per-class scores and the confusion matrix, as fixed-width text."""
        w = max(12, *(len(n) + 2 for n in self.labels))
        lines = [f"{'class':<{w}}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>10}"]
        for name, p, r, f, s in zip(self.labels, self.precision, self.recall, self.f1, self.support):
            lines.append(f"{name:<{w}}{p:>10.3f}{r:>10.3f}{f:>10.3f}{s:>10}")
        total = sum(self.support)
        lines.append(f"{'accuracy':<{w}}{'':>20}{self.accuracy:>10.3f}{total:>10}")
        present = occurring_classes(self.confusion)

        def macro(values: list[float]) -> float:
            return sum(v for v, ok in zip(values, present) if ok) / max(sum(present), 1)

        lines.append(f"{'macro avg':<{w}}{macro(self.precision):>10.3f}{macro(self.recall):>10.3f}"
                     f"{self.macro_f1:>10.3f}{total:>10}")
        cw = max(8, *(len(n) + 1 for n in self.labels))
        lines += ["", "confusion matrix (rows: true class, columns: predicted)",
                  " " * w + "".join(f"{n:>{cw}}" for n in self.labels)]
        lines += [f"{name:<{w}}" + "".join(f"{c:>{cw}}" for c in row) for name, row in zip(self.labels, self.confusion)]
        return "\n".join(lines)


def plot_confusion(report: ClassificationReport, path: Path) -> None:
    """confusion.png: counts, coloured by the share of each true class (row-normalised);
    skipped quietly without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    counts = torch.tensor(report.confusion, dtype=torch.float64)
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    K = len(report.labels)
    fig, ax = plt.subplots(figsize=(1.2 * K + 2.5, 1.0 * K + 2))
    ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(K):
        for j in range(K):
            ax.text(j, i, str(report.confusion[i][j]), ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(K), report.labels, rotation=45, ha="right")
    ax.set_yticks(range(K), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {report.accuracy:.1%}, macro-F1 {report.macro_f1:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def load_data(cfg: FinetuneConfig) -> tuple[LabelledData, LabelledData]:
    """(train, validation): --data (or the embedded tweets), and --val or a seeded split of it."""
    columns = dict(text_col=cfg.text_col, pair_col=cfg.pair_col, label_col=cfg.label_col,
                   header=cfg.header, encoding=cfg.encoding)
    train = read_default_dataset() if cfg.data in (None, DEFAULT_DATASET) else read_labelled(cfg.data, **columns)
    if cfg.val:
        val = read_labelled(cfg.val, **columns)
        if (train.pairs is None) != (val.pairs is None):
            with_pairs = train if train.pairs is not None else val
            raise MinilmError(f"{with_pairs.name} has text pairs but the other file has not; "
                              "give both files the same columns (--text-pair-col)")
    else:
        train, val = split_validation(train, cfg.val_fraction, cfg.seed)
    return train, val


def scratch_encoder(cfg: FinetuneConfig, train: LabelledData) -> TextEncoder:
    """--tokenizer DIR (minilm's or Hugging Face's), or a SentencePiece model trained on the
    training texts (and pairs)."""
    from tokenizer import Tokenizer

    source = cfg.tokenizer or (Path(cfg.like) / "tokenizer" if cfg.like else None)
    if source:
        return load_text_encoder(source)
    t0 = time.perf_counter()
    try:
        tok = Tokenizer.train(train.texts + (train.pairs or []), vocab_size=scratch_setting(cfg, "vocab_size"),
                              model_type=scratch_setting(cfg, "tokenizer_type"), seed=cfg.seed)
    except ValueError as err:
        raise MinilmError(f"tokenizer: {err} (set --vocab-size, or pass --tokenizer DIR)") from err
    say(f"tokenizer: trained {scratch_setting(cfg, 'tokenizer_type')} vocab {len(tok)} on the training texts in "
        f"{time.perf_counter() - t0:.1f}s")
    return MinilmTextEncoder(tok)


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
def load_body(cfg: FinetuneConfig) -> tuple[PreTrained, TextEncoder, str]:
    """The pretrained model named by --init (with whatever head it had) and its tokenizer."""
    if cfg.init.startswith(HF_PREFIX):
        from minilm.hf import from_hf

        path = Path(cfg.init[len(HF_PREFIX):]).expanduser()
        with warnings.catch_warnings():
            # a bare body (BertModel) has no classifier: from_hf warns that it starts fresh,
            # which is what finetuning does anyway; everything else is reported below
            warnings.simplefilter("ignore")
            source, report = from_hf(path, head="classify", return_report=True)
        unused = f", {len(report.unused)} checkpoint tensors unused" if report.unused else ""
        return source, load_hf_model_text_encoder(path), f"Hugging Face {path}{unused}"
    run_dir = Path(cfg.init)
    weights = WEIGHT_FILES[cfg.init_weights]
    source = load_model_dir(run_dir, weights)
    return source, load_text_encoder(run_dir / "tokenizer"), f"run {run_dir} ({weights})"


def build_model(cfg: FinetuneConfig, n_labels: int, train: LabelledData) -> tuple[SequenceClassifier, TextEncoder, str]:
    """A SequenceClassifier with num_labels = n_labels: body weights from --init (and BERT's
    pooler when the source has one), classifier freshly initialised; or all random (scratch)."""
    changes: dict = {"num_labels": n_labels}
    if cfg.pooling:
        changes["pooling"] = cfg.pooling
    if cfg.dropout is not None:
        changes.update(dropout=cfg.dropout, attn_dropout=cfg.dropout)
    try:
        if cfg.init == "scratch":
            encoder = scratch_encoder(cfg, train)
            name = scratch_setting(cfg, "preset")
            base = load_model_config(cfg.like)[0] if cfg.like else preset(name, max_seq_len=cfg.max_length or 128)
            config = base.replace(vocab_size=len(encoder), pad_token_id=encoder.pad_id, **shape_overrides(cfg),
                                  **changes)
            torch.manual_seed(cfg.seed)
            return SequenceClassifier(config), encoder, f"scratch ({cfg.like or name}, random weights)"
        source, encoder, note = load_body(cfg)
        config: ModelConfig = source.config.replace(**changes)
    except ValueError as err:          # ModelConfig's checks: a bad preset / override / pooling
        raise MinilmError(f"model shape: {err}") from err
    torch.manual_seed(cfg.seed)
    model = SequenceClassifier(config)
    model.transformer.load_state_dict(source.transformer.state_dict())
    source_pooler = getattr(source, "pooler", None)
    if model.pooler is not None and source_pooler is not None:
        model.pooler.load_state_dict(source_pooler.state_dict())
        note += ", pretrained pooler"
    return model, encoder, note


def freeze_encoder(model: SequenceClassifier) -> None:
    """Only the head (pooler + classifier) learns: the body's parameters get no gradient,
    and make_optimizer leaves parameters without requires_grad out."""
    for p in model.transformer.parameters():
        p.requires_grad_(False)


# --------------------------------------------------------------------------------------
# prediction and evaluation
# --------------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(model: SequenceClassifier, encoded: EncodedTexts, pad_id: int, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """Logits (N, K) float32 in the examples' order, computed in length-sorted batches."""
    out = torch.empty(len(encoded), model.config.num_labels)
    for indices in eval_batches(encoded.lengths, batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(encoded, indices.tolist(), pad_id).items()}
        out[torch.from_numpy(indices)] = model(**batch).logits.float().cpu()
    return out


def make_evaluate(encoded: EncodedTexts, labels: torch.Tensor, pad_id: int, batch_size: int, device: torch.device):
    """evaluate(model, final) for the Trainer: validation loss (unweighted mean cross-entropy),
    accuracy and macro-F1 over the whole validation set (it is small, so always all of it)."""

    def evaluate(model: PreTrained, final: bool = False) -> dict[str, float]:
        logits = predict_logits(model, encoded, pad_id, batch_size, device)
        report = ClassificationReport.compute(logits.argmax(-1), labels, [str(k) for k in range(logits.size(1))])
        return {"val_loss": F.cross_entropy(logits, labels).item(), "val_accuracy": report.accuracy,
                "val_macro_f1": report.macro_f1}

    return evaluate


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
def resolve_loop(cfg: FinetuneConfig, batches_per_epoch: int) -> tuple[LoopConfig, int]:
    """LoopConfig with the step budget from --epochs when --max-steps is absent, warmup 6%
    of the steps by default, evaluation once per epoch (at most every 250 steps), the peak
    lr from DEFAULT_LR, best checkpoint by the chosen validation metric.
    Returns (loop, steps per epoch)."""
    fields = {**FINETUNE_LOOP, **{k: v for k, v in cfg.loop.items() if v is not None}}
    accum = fields.get("grad_accum") or 1
    if fields.get("lr") is None:
        kind = ("frozen" if cfg.freeze_encoder else "scratch" if cfg.init == "scratch"
                else "hf" if cfg.init.startswith(HF_PREFIX) else "run")
        fields["lr"] = DEFAULT_LR[kind]
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    if fields.get("max_steps") is None:
        fields["max_steps"] = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if fields.get("warmup_steps") is None:
        fields["warmup_steps"] = math.ceil(0.06 * fields["max_steps"])
    if fields.get("eval_every") is None:
        fields["eval_every"] = min(steps_per_epoch, 250)
    fields.update(best_metric=METRICS[cfg.metric], best_mode="max")
    return LoopConfig(**fields), steps_per_epoch


def check_options(cfg: FinetuneConfig) -> None:
    """Fail on a bad option before any work (the CLI's argparse already restricts them)."""
    check_choices(cfg, MinilmError, as_flags=True)
    check_ranges(cfg, MinilmError, as_flags=True, positive=("epochs", "batch_size", "eval_batch_size", "max_length"),
                 fractions=("token_mask", "label_smoothing", "dropout"))

    def given(*names: str) -> list[str]:
        return [flag(name) for name in names if getattr(cfg, name) is not None]

    if cfg.init != "scratch":
        scratch_only = given(*SHAPE_FIELDS, "like", "tokenizer", *SCRATCH_DEFAULTS)
        if scratch_only:
            raise MinilmError(f"{', '.join(scratch_only)}: for --init scratch only; --init {cfg.init} brings its "
                              "own architecture and tokenizer")
    elif cfg.like is not None and given(*SCRATCH_DEFAULTS):
        raise MinilmError(f"{', '.join(given(*SCRATCH_DEFAULTS))}: --like {cfg.like} brings its architecture and "
                          "tokenizer; leave them out (shape flags and --tokenizer may override them)")
    elif cfg.tokenizer is not None and given("vocab_size", "tokenizer_type"):
        raise MinilmError(f"{', '.join(given('vocab_size', 'tokenizer_type'))}: --tokenizer {cfg.tokenizer} is a "
                          "trained tokenizer; leave them out")
    if cfg.like is not None:
        if not Path(cfg.like).is_dir():
            raise MinilmError(f"--like {cfg.like}: no such run directory")
        run_file(cfg.like, "config.json")     # a directory, but no run: say so, not which file is missing


def resolve_max_length(cfg: FinetuneConfig, config: ModelConfig, pairs: bool) -> int:
    """--max-length, or min(128, the model's context); it must fit the context and the text."""
    max_length = cfg.max_length or min(128, config.max_seq_len)
    if max_length > config.max_seq_len:
        raise MinilmError(f"--max-length {max_length} exceeds the model's context of {config.max_seq_len} tokens")
    n_special = 3 if pairs else 2             # [CLS] text [SEP] (pair [SEP])
    if max_length <= n_special:
        raise MinilmError(f"--max-length {max_length} leaves no room for text beside {n_special} special tokens")
    return max_length


def training_batches(encoded: EncodedTexts, y: torch.Tensor, batches: LengthBucketBatches, encoder: TextEncoder,
                     token_mask: float, vocab_size: int, loss_options: dict):
    """get_batch(i) for the Trainer: batch i of the length buckets, padded, with its labels and
    the loss's options (class_weights, label_smoothing); with token_mask > 0, a share of the
    text tokens corrupted as MLM does, freshly each step."""

    def get_batch(i: int) -> dict[str, torch.Tensor]:
        indices = batches.indices(i)
        batch = pad_batch(encoded, indices.tolist(), encoder.pad_id)
        batch["labels"] = y[torch.from_numpy(indices)]
        if token_mask:
            # from the global RNG, which the resume state saves; random replacements only from
            # ids the embedding table has (a tokenizer may list more)
            batch["input_ids"], _ = mask_tokens(batch["input_ids"], vocab_size=min(len(encoder), vocab_size),
                                                mask_id=encoder.mask_id, special_ids=encoder.special_ids,
                                                attention_mask=batch["attention_mask"], mask_prob=token_mask)
        return {**batch, **loss_options}

    return get_batch


def run(cfg: FinetuneConfig) -> dict:
    """Finetune and write the run directory. Returns the summary (as in summary.json) with
    one more key, "report": the ClassificationReport of the best checkpoint."""
    check_options(cfg)
    out = Path(cfg.out)
    with new_run_setup(out):        # a failed setup leaves no directory behind
        device, dtype = setup_device(cfg.device, cfg.dtype)
        wall0 = time.perf_counter()

        train, val = load_data(cfg)
        labels = LabelSet.from_data(train)
        y_train, y_val = labels.encode(train), labels.encode(val)
        counts = labels.counts(y_train)
        say(f"data: {train.name} {len(train):,} rows ({train.columns}), validation: {val.name} {len(val):,} rows")
        say("labels: " + ", ".join(f"{n} {c:,}" for n, c in zip(labels.names, counts.tolist())))
        for warning in data_warnings(train, val):
            say(f"warning: {warning}")

        model, encoder, note = build_model(cfg, len(labels), train)
        if cfg.token_mask and encoder.mask_id is None:
            raise MinilmError("--token-mask needs a tokenizer with a mask token; this one has none (GPT-style)")
        max_length = resolve_max_length(cfg, model.config, pairs=train.pairs is not None)
        if cfg.freeze_encoder:
            freeze_encoder(model)
        if cfg.freeze_embeddings:
            # with few labels, the words seen in training would move and the unseen ones stay:
            # frozen, an unseen word keeps its pretrained place beside the seen words it resembles
            model.transformer.embeddings.requires_grad_(False)
        model.to(device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        c = model.config
        say(f"model: {note}; {c.n_layers} layers x {c.d_model}, pooling {c.pooling}, {len(labels)} classes, "
            f"{model.num_parameters() / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)")

        t0 = time.perf_counter()
        enc_train = encoder.encode(train.texts, train.pairs, max_length)
        enc_val = encoder.encode(val.texts, val.pairs, max_length)
        lengths = enc_train.lengths
        batches = LengthBucketBatches(lengths, cfg.batch_size, seed=cfg.seed)
        say(f"tokens: {lengths.mean():.1f} per training text (max {lengths.max()}), {(lengths >= max_length).sum():,} "
            f"reach --max-length {max_length}; batches {batches.fill_ratio():.0%} real tokens after length "
            f"bucketing; tokenized in {time.perf_counter() - t0:.1f}s")

        loss_options: dict = {}         # extra arguments of SequenceClassifier's loss, sent with every batch
        if cfg.class_weights == "auto":
            loss_options["class_weights"] = weights = balanced_class_weights(counts)
            say("class weights: " + ", ".join(f"{n} {w:.2f}" for n, w in zip(labels.names, weights.tolist())))
        if cfg.label_smoothing:
            loss_options["label_smoothing"] = cfg.label_smoothing

        get_batch = training_batches(enc_train, y_train, batches, encoder, cfg.token_mask, model.config.vocab_size,
                                     loss_options)
        loop, steps_per_epoch = resolve_loop(cfg, batches.batches_per_epoch)
        say(f"schedule: {loop.max_steps} steps max ({steps_per_epoch} per epoch), lr {loop.lr:g}, "
            f"warmup {loop.warmup_steps}, evaluation every {loop.eval_every} steps"
            + (f", time budget {loop.time_budget:g}s" if loop.time_budget else ""))

        save_model_dir(model, out)             # config.json now; the weights are replaced at the end
        labels.save(out)
        encoder.save(out / "tokenizer")
        write_json(out / "train_config.json", {**asdict(cfg), "max_length": max_length, "loop": asdict(loop),
                                               "text_pairs": train.pairs is not None, "columns": train.columns})
        evaluate = make_evaluate(enc_val, y_val, encoder.pad_id, cfg.eval_batch_size, device)
        trainer = Trainer(model, get_batch, loop, out, device, dtype, evaluate=evaluate)
    result = trainer.fit()
    if cfg.loop.get("max_steps") is None:       # the step budget came from --epochs
        result["stop_reason"] = result["stop_reason"].replace("--max-steps", "--epochs")

    # the report is about the best checkpoint, the one predict and export use
    load_weights(model, out / "best.safetensors")
    model.eval()
    with autocast(device, dtype):
        logits = predict_logits(model, enc_val, encoder.pad_id, cfg.eval_batch_size, device)
    report = ClassificationReport.compute(logits.argmax(-1), y_val, labels.names)
    scores = report.to_dict()
    final = {k: result.pop(k) for k in ("val_loss", "val_accuracy", "val_macro_f1") if k in result}
    summary = {
        "init": note, "labels": labels.names, "train_rows": len(train), "val_rows": len(val),
        "text_pairs": train.pairs is not None,
        "max_length": max_length, "metric": loop.best_metric, **result,
        "epochs": round(result["steps"] * loop.grad_accum / batches.batches_per_epoch, 2),
        "val_accuracy": report.accuracy, "val_macro_f1": report.macro_f1,
        "val_loss": F.cross_entropy(logits, y_val).item(), "per_class": scores["per_class"],
        "confusion": scores["confusion"], "final_weights": final,
        "weights": f"best.safetensors = best by {loop.best_metric} (the scores above); "
                   "model.safetensors = final (final_weights)",
        "parameters": model.num_parameters(), "trainable_parameters": trainable,
        "wall_seconds": round(time.perf_counter() - wall0, 1), "device": str(device), "dtype": dtype_name(dtype),
        "torch": torch.__version__, "python": platform.python_version()}
    write_json(out / "summary.json", summary)
    plot_curves(out)
    plot_confusion(report, out / "confusion.png")
    summary["report"] = report
    return summary


# --------------------------------------------------------------------------------------
# using a finished run
# --------------------------------------------------------------------------------------
@dataclass
class FinetunedRun:
    """A finetune.py run directory, loaded for inference."""

    model: SequenceClassifier
    encoder: TextEncoder
    labels: LabelSet
    max_length: int
    pairs: bool                     # trained on text pairs


def load_run(run_dir: str | Path, weights: Weights = "best") -> FinetunedRun:
    """Model (eval mode, CPU), tokenizer, labels and max length of a finetune.py run."""
    run_dir = Path(run_dir)
    if weights not in WEIGHT_FILES:
        raise MinilmError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_FILES)}")
    others = [name for name, file in WEIGHT_FILES.items() if name != weights and (run_dir / file).is_file()]
    if not (run_dir / WEIGHT_FILES[weights]).is_file() and others:
        raise MinilmError(f"{run_dir / WEIGHT_FILES[weights]} not found (a run stopped before it was written?); "
                          f"--weights {others[0]} uses {WEIGHT_FILES[others[0]]}")
    model = load_model_dir(run_dir, WEIGHT_FILES[weights], head="classify")
    labels = LabelSet.load(run_dir)
    train_config = read_json(run_file(run_dir, "train_config.json"))
    if len(labels) != model.config.num_labels:
        raise MinilmError(f"{run_dir}: labels.json lists {len(labels)} labels but the model has "
                          f"{model.config.num_labels} outputs; the run directory is inconsistent")
    return FinetunedRun(model.eval(), load_text_encoder(run_dir / "tokenizer"), labels,
                        train_config["max_length"], train_config["text_pairs"])


def predict(run: FinetunedRun, texts: list[str], pairs: list[str] | None = None, device: str = "auto",
            batch_size: int = 64) -> torch.Tensor:
    """Class probabilities (N, K) = softmax(logits) for each text (and pair)."""
    if not texts:
        raise MinilmError("nothing to predict: pass --text TEXT or --file FILE")
    if pairs is not None and len(pairs) != len(texts):
        raise MinilmError(f"{len(texts)} texts but {len(pairs)} pairs: give one --pair per --text")
    if run.pairs and pairs is None:
        raise MinilmError("this model was trained on text pairs: pass --pair for every --text "
                          "(or TEXT<TAB>PAIR lines in --file)")
    if pairs is not None and not run.pairs:
        raise MinilmError("this model was trained on single texts: leave out --pair")
    dev = resolve_device(device)
    model = run.model.to(dev)
    try:
        encoded = run.encoder.encode(texts, pairs, run.max_length)
    except ValueError as err:           # e.g. a text that is not valid Unicode (undecodable bytes)
        raise MinilmError(str(err)) from err
    return predict_logits(model, encoded, run.encoder.pad_id, batch_size, dev).softmax(-1)


def export(run_dir: str | Path, out_dir: str | Path, weights: Weights = "best") -> Path:
    """Write a transformers *ForSequenceClassification directory (config with id2label /
    label2id set to the run's labels) plus the tokenizer: Hugging Face inits get their own
    tokenizer files (AutoTokenizer loads them); minilm tokenizers go to minilm_tokenizer/."""
    from minilm.hf import to_hf

    run = load_run(run_dir, weights)
    out = Path(out_dir)
    new_run_dir(out, hint="pass OUT_DIR a new directory")
    hf_model = to_hf(run.model)
    hf_model.config.id2label = dict(enumerate(run.labels.names))
    hf_model.config.label2id = {name: k for k, name in enumerate(run.labels.names)}
    hf_model.save_pretrained(str(out))
    run.encoder.save(out if run.encoder.kind == "hf" else out / "minilm_tokenizer")
    return out
