"""The one training loop that train.py and finetune.py share.

    for step:                                   lr = schedule(step, progress)
        for micro-batch in grad_accum:          loss = model(**batch).loss · n_micro / n_step
            backward (scaled for fp16)
        clip grad norm -> AdamW step -> zero grads
        log / evaluate / keep best / save resume state
    until max_steps, max_tokens or time_budget is reached

Batches come from `get_batch(i)`, a pure function of the micro-batch index i: resuming at
step s needs no data-loader state, only s. Together with the saved weights, optimizer,
grad scaler and RNG state this makes an interrupted-and-resumed run bit-identical to an
uninterrupted one (tests/test_training.py checks it). Ctrl-C is held until the step in
progress ends, then the state is saved, so an interrupted run can always be resumed.

Device and precision are resolved here once (`resolve_device`, `resolve_dtype`), and the
run's curves are read back and drawn here (`read_metrics`, `plot_curves`).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from minilm.checkpoint import load_state, save_state, save_weights
from minilm.config import check_choices, check_ranges, flag
from minilm.errors import MinilmError
from minilm.model import PreTrained
from minilm.objectives import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------
# device and precision, decided in one place
# --------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda -> mps -> cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise MinilmError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinilmError("--device cuda requested but no CUDA GPU is visible: use --device auto or cpu")
    return device


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX): then bf16 is ~3x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


Precision = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(device: torch.device, name: Precision = "auto") -> torch.dtype:
    """Autocast precision. auto: bf16 where the hardware does it natively, fp16 (+ grad
    scaling) on older CUDA GPUs, fp32 otherwise. Weights and optimizer stay fp32."""
    if name != "auto":
        if name not in DTYPES:
            raise MinilmError(f"--dtype {name!r}: choose auto, fp32, bf16 or fp16")
        if name == "fp16" and device.type == "cpu":
            raise MinilmError("--dtype fp16 is not supported on CPU: use bf16 or fp32")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def tune_cpu_allocator() -> bool:
    """Keep freed memory inside the process (glibc only); True if it was applied.

    By default glibc serves every allocation above a threshold (128 KiB, adapting up to
    32 MiB) with its own mmap and hands it back to the OS on free, and trims the heap's
    free top too. A training step allocates and frees the same activations and logits
    every step, so each step page-faults them in again and the kernel zeroes every page:
    on a small CPU machine that is a large share of the step. Raising both thresholds
    (the same as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=…:glibc.malloc.trim_threshold=…)
    lets the next step reuse the memory. The price: the process keeps its peak memory
    instead of shrinking between steps. Call it once at start-up, before large allocations.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3          # from glibc's malloc.h
    ok = libc.mallopt(m_mmap_threshold, 1 << 30)         # only blocks of >= 1 GiB get their own mmap
    ok &= libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # never trim a free heap top below 2 GiB
    return bool(ok)


def setup_device(device_name: str = "auto", dtype_name_: Precision = "auto") -> tuple[torch.device, torch.dtype]:
    """The one place a run decides where and in what precision it computes; prints it.
    On CPU it also keeps freed memory in the process (tune_cpu_allocator)."""
    device = resolve_device(device_name)
    dtype = resolve_dtype(device, dtype_name_)
    tuned = device.type == "cpu" and tune_cpu_allocator()
    print(f"device: {device}, precision: {dtype_name(dtype)} autocast, threads: {torch.get_num_threads()}"
          + (", allocator keeps freed memory" if tuned else ""), flush=True)
    return device, dtype


# --------------------------------------------------------------------------------------
# optimizer and schedule
# --------------------------------------------------------------------------------------
def layer_of(name: str, n_layers: int) -> int:
    """Depth of a parameter in the stack, for layer-wise learning rates: 0 for the
    embeddings, i + 1 for transformer block i, n_layers + 1 for everything above the body
    (final norm, pooler, heads)."""
    if name.startswith("transformer.embeddings."):
        return 0
    if name.startswith("transformer.blocks."):
        return int(name.split(".")[2]) + 1
    return n_layers + 1


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device, layer_lr_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices that multiply activations.

    Norm gains, biases and embedding tables (including a tied output matrix, which is
    the embedding) are not decayed: shrinking them toward 0 has no regularising meaning.

    layer_lr_decay = γ < 1 gives each parameter group a learning-rate scale (the
    "lr_scale" key; the loop sets lr · lr_scale every step)

        lr_scale = γ^(L + 1 − depth)        depth = layer_of(name, L), L = n_layers

    so the head learns at the full rate, the top block at γ·lr, the embeddings at γ^(L+1)·lr.
    Finetuning with few labels then changes the general features of the lower layers
    less than the task-specific top (ULMFiT's discriminative finetuning; ELECTRA uses 0.8).
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n_layers = model.config.n_layers if hasattr(model, "config") else 0
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = p.dim() >= 2 and id(p) not in embedding_params
        scale = layer_lr_decay ** (n_layers + 1 - layer_of(name, n_layers))
        groups.setdefault((decayed, scale), []).append(p)
    # a fixed group order (decayed first, then by falling lr) so a saved optimizer state fits
    order = sorted(groups, key=lambda key: (not key[0], -key[1]))
    param_groups = [{"params": groups[decayed, scale], "weight_decay": weight_decay if decayed else 0.0,
                     "lr_scale": scale} for decayed, scale in order]
    # fused: one kernel for all parameters (CUDA, and CPU since torch 2.4)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)


Schedule = Literal["cosine", "linear", "constant"]


def lr_at(step: int, progress: float, max_lr: float, warmup_steps: int, schedule: Schedule,
          min_lr_ratio: float) -> float:
    """A linear warmup factor times a decay over training progress p in [0, 1]:

        lr = max_lr · w · d(p),   w = min(1, (step + 1) / warmup_steps)
        cosine: d = r + (1 - r) · ½(1 + cos πp)     linear: d = r + (1 - r)(1 - p)
        constant: d = 1                              (r = min_lr_ratio)

    Progress is the fraction of the budget used (steps, tokens or seconds), so the
    schedule also ends on time when the budget is wall-clock. The decay runs from step 0,
    warmup included (one formula for every kind of budget, where the step at which warmup
    ends is no known fraction of a wall-clock budget), so the peak is max_lr · d(p) at the
    end of warmup: 0.955 · max_lr for 100 warmup steps of 2,000 (linear, r = 0.1). A run
    that ends during its warmup never reaches max_lr; Trainer.fit says so.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        decay = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    elif schedule == "linear":
        decay = min_lr_ratio + (1 - min_lr_ratio) * (1 - p)
    else:
        decay = 1.0
    return max_lr * warm * decay


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # max global grad norm; 0 disables
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    time_budget: float | None = None  # seconds of training (evaluation excluded)
    log_every: int = 10
    eval_every: int = 0               # steps; 0 -> only at the end
    save_every: int = 0               # steps between resume states; 0 -> only at the end
    best_metric: str = "val_loss"
    best_mode: Literal["min", "max"] = "min"
    patience: int = 0                 # early stopping after this many evals without improvement
    layer_lr_decay: float = 1.0       # < 1: lower layers learn slower (make_optimizer)
    compile: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_choices(self, MinilmError, as_flags=True)
        budgets = {"max_steps": self.max_steps, "max_tokens": self.max_tokens, "time_budget": self.time_budget}
        if all(b is None for b in budgets.values()):
            raise MinilmError("no training budget: give --max-steps, --max-tokens or --time-budget")
        check_ranges(self, MinilmError, as_flags=True, positive=(*budgets, "lr", "grad_accum", "log_every"),
                     non_negative=("warmup_steps", "eval_every", "save_every", "patience", "weight_decay", "grad_clip"))
        if not 0 <= self.min_lr_ratio <= 1:
            raise MinilmError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.layer_lr_decay <= 1:
            raise MinilmError(f"--layer-lr-decay must be in (0, 1], got {self.layer_lr_decay}")
        if self.patience and not self.eval_every:
            raise MinilmError(f"--patience {self.patience} needs periodic evaluations: set --eval-every")


def format_metric(name: str, value: float) -> str:
    """'loss 3.142', 'lr 3.00e-04', 'val_acc 91.2%': a metric as a log line shows it."""
    if isinstance(value, int):
        return f"{name} {value}"
    if name == "lr":
        return f"{name} {value:.2e}"
    if name.endswith(("acc", "accuracy")):
        return f"{name} {value:.1%}"
    return f"{name} {value:.0f}" if name == "tok_per_s" else f"{name} {value:.4g}"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during Trainer.fit, raised once the step in progress has finished and the
    resume state is saved (a second Ctrl-C stops at once, without saving)."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(f"interrupted at step {step}")
        self.run_dir, self.step = run_dir, step


@contextmanager
def deferred_interrupt() -> Iterator[threading.Event]:
    """While inside, the first Ctrl-C (SIGINT) only sets the yielded event; the loop checks
    it between steps, so an interrupted run stops with a consistent state it can save."""
    requested = threading.Event()

    def on_sigint(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:          # not the main thread, where Ctrl-C is delivered: nothing to defer
        yield requested
        return
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def loss_terms(batch: dict) -> float:
    """What a model's mean loss on `batch` divides by: its labelled targets (rows, masked
    tokens, next tokens), or their summed class weights when the loss weighs classes.

    Accumulated micro-batches are weighted by it, so N of them give the gradient of one batch
    N times larger even when they differ in size (an epoch's last batch, a varying number of
    masked tokens) or in class mix. ELECTRA's loss adds a mean over the real tokens to the
    generator's mean over the masked ones; weighting both by the masked count makes that one
    match only approximately."""
    labels = batch["labels"]
    weights = batch.get("class_weights")
    if weights is not None:
        return float(weights[labels].sum())
    return float((labels != IGNORE_INDEX).sum())


class Trainer:
    """Runs `LoopConfig` on a model; owns the optimizer, scaler, metrics log and state files."""

    def __init__(self, model: PreTrained, get_batch: Callable[[int], Batch], loop: LoopConfig,
                 run_dir: Path, device: torch.device, dtype: torch.dtype,
                 evaluate: Callable[[PreTrained, bool], dict[str, float]] | None = None,
                 final_scores_more: bool = False):
        """evaluate(model, final) -> metrics; final=True at the end asks for the full score.
        final_scores_more: the periodic evaluations score a cheaper subset (pretraining's
        --eval-tokens), so the best checkpoint is chosen on that subset throughout, the last step
        included, and the full final score is reported beside it without competing."""
        self.model, self.get_batch, self.loop, self.run_dir = model, get_batch, loop, Path(run_dir)
        self.device, self.dtype, self.evaluate_fn = device, dtype, evaluate
        self.final_scores_more = final_scores_more
        self.optimizer = make_optimizer(model, loop.lr, loop.weight_decay, (loop.beta1, loop.beta2), device,
                                        loop.layer_lr_decay)
        # fp16 has too few exponent bits for small gradients: scale the loss up, unscale before the step
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.step_model = torch.compile(model) if loop.compile else model
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.best: float | None = None
        self.evals_without_improvement = 0
        self.evaluated_step: int | None = None      # the step of the last evaluation that competed for best
        self.grad_norm: float | None = None         # of the last step, before clipping (grad_clip > 0)
        self.history: list[dict] = []

    # ---- state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                "best": self.best, "evals_without_improvement": self.evals_without_improvement,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def resume(self) -> None:
        state = load_state(self.run_dir, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        self.best, self.evals_without_improvement = state["best"], state["evals_without_improvement"]
        if self.progress() >= 1:
            raise MinilmError(f"{self.run_dir} has already spent its budget (step {self.step}): give a larger "
                              "--max-steps, --max-tokens or --time-budget to train it further")
        # drop log lines written after the state was saved: they will be written again
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            self.history = [r for r in read_metrics(self.run_dir) if r["step"] <= self.step]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def save(self) -> None:
        save_state(self.run_dir, self.model, self.state_dict())

    # ---- progress and budget ------------------------------------------------------------
    def budget_used(self) -> dict[str, float]:
        """The share used of each budget the loop has, by field name."""
        loop = self.loop
        used = {"max_steps": (self.step, loop.max_steps), "max_tokens": (self.tokens, loop.max_tokens),
                "time_budget": (self.train_seconds, loop.time_budget)}
        return {name: spent / limit for name, (spent, limit) in used.items() if limit}

    def progress(self) -> float:
        return max(self.budget_used().values())

    # ---- one optimisation step ----------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, lr). With
        clipping on, self.grad_norm is the global gradient norm before clipping."""
        loop, model = self.loop, self.step_model
        lr = lr_at(self.step, self.progress(), loop.lr, loop.warmup_steps, loop.schedule, loop.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)      # no lr_scale in states saved before it existed
        model.train()
        total_loss = 0.0
        micro_batches = [self.get_batch(self.step * loop.grad_accum + micro) for micro in range(loop.grad_accum)]
        terms = [loss_terms(batch) for batch in micro_batches]
        total_terms = sum(terms) or 1.0     # none (an MLM batch with nothing masked): the loss is nan anyway
        for batch, n in zip(micro_batches, terms):
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast(self.device, self.dtype):
                loss = model(**batch).loss * (n / total_terms)     # exactly 1.0 without accumulation
            self.scaler.scale(loss).backward()
            total_loss += loss.item()
            mask = batch.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        if loop.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            # the norm before clipping, logged: spikes in it come before a loss that diverges
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), loop.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total_loss, lr

    def evaluate(self, final: bool = False, compete: bool = True) -> dict[str, float]:
        """The metrics of evaluate_fn; with compete, the weights become best.safetensors when
        they beat the best so far (and the patience count moves)."""
        if self.evaluate_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.dtype):
            metrics = self.evaluate_fn(self.model, final)
        if not compete:
            return metrics
        self.evaluated_step = self.step
        value = metrics.get(self.loop.best_metric)
        if value is not None:
            better = self.best is None or (value < self.best if self.loop.best_mode == "min" else value > self.best)
            if better:
                self.best = value
                self.evals_without_improvement = 0
                save_weights(self.model, self.run_dir / "best.safetensors")
            else:
                self.evals_without_improvement += 1
        return metrics

    def log(self, row: dict) -> None:
        self.history.append(row)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if not self.loop.progress:      # no bar to show it: one line per logged row (logs, CI, pipes)
            print(" ".join(format_metric(k, v) for k, v in row.items() if k not in ("tokens", "train_seconds")),
                  flush=True)

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until the budget is spent (or early stopping); returns the final metrics."""
        loop = self.loop
        bar = tqdm(total=100, initial=round(100 * self.progress(), 1), disable=not loop.progress, mininterval=1.0,
                   bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]", dynamic_ncols=True)
        with deferred_interrupt() as interrupt:
            stop_reason, row = self.train_until_done(bar, interrupt)
        bar.close()
        # The last step gets one row: its training window, the evaluation that competes for the
        # best checkpoint (unless early stopping has just made it) and, where the periodic
        # evaluations score a subset, the full score beside it.
        final = {k: v for k, v in row.items() if k.startswith("val_")}
        if self.evaluated_step != self.step:
            final = self.evaluate(final=not self.final_scores_more)
        if self.final_scores_more:
            final = self.evaluate(final=True, compete=False)
        self.log({**row, **final})
        if self.step < loop.warmup_steps:
            say(f"note: the run ended in its warmup (step {self.step} of {loop.warmup_steps}), so the learning rate "
                f"peaked at {row.get('lr', 0.0):.2e}, not {loop.lr:g}: lower --warmup-steps or give a larger budget")
        save_weights(self.model, self.run_dir / "model.safetensors")
        self.save()
        return {"stop_reason": stop_reason, "steps": self.step, "tokens": self.tokens,
                "train_seconds": round(self.train_seconds, 2), "best": self.best, **final}

    def train_until_done(self, bar: tqdm, interrupt: threading.Event) -> tuple[str, dict]:
        """Steps, with a log row every log_every steps and an evaluation every eval_every, until
        the budget is spent; returns why it stopped and the last step's row, unwritten (fit
        completes it). On Ctrl-C it saves the state and raises Interrupted."""
        loop = self.loop
        window_loss, window_steps, window_tokens, window_time, window_grad = 0.0, 0, 0, 0.0, None
        row: dict = {"step": self.step, "tokens": self.tokens}
        while self.progress() < 1.0:
            t0, tokens0 = time.perf_counter(), self.tokens
            loss, lr = self.train_step()
            if not math.isfinite(loss):
                hint = "" if self.dtype == torch.float32 else " or use --dtype fp32"
                raise MinilmError(f"loss became {loss} at step {self.step}: lower --lr{hint}")
            elapsed = time.perf_counter() - t0
            self.train_seconds += elapsed
            window_loss, window_steps = window_loss + loss, window_steps + 1
            window_tokens, window_time = window_tokens + self.tokens - tokens0, window_time + elapsed
            if self.grad_norm is not None:      # the window's largest: a spike is what one looks for
                window_grad = max(window_grad or 0.0, self.grad_norm)
            done = self.progress() >= 1.0
            metrics, stop_reason = {}, None
            if loop.eval_every and self.step % loop.eval_every == 0 and not done:
                metrics = self.evaluate()
                if loop.patience and self.evals_without_improvement >= loop.patience:
                    stop_reason = f"early stop: {loop.best_metric} did not improve in {loop.patience} evaluations"
            row = {"step": self.step, "tokens": self.tokens, "lr": lr}
            if self.step % loop.log_every == 0 or done or stop_reason:   # (a resumed run's first window may be shorter)
                row.update(loss=window_loss / window_steps, tok_per_s=window_tokens / max(window_time, 1e-9),
                           train_seconds=self.train_seconds)
                if window_grad is not None:
                    row["grad_norm"] = window_grad
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tok_per_s']:.0f}")
                window_loss, window_steps, window_tokens, window_time, window_grad = 0.0, 0, 0, 0.0, None
            row.update(metrics)
            bar.n = round(min(100.0, 100 * self.progress()), 1)
            bar.refresh()
            if stop_reason or done:
                spent = ", ".join(flag(name) for name, used in self.budget_used().items() if used >= 1)
                return stop_reason or f"budget: {spent}", row
            if len(row) > 3:        # more than step, tokens, lr: a log row or an evaluation
                self.log(row)
            if interrupt.is_set():
                bar.close()
                self.save()
                raise Interrupted(self.run_dir, self.step)
            if loop.save_every and self.step % loop.save_every == 0:
                self.save()
        return "budget", row


# --------------------------------------------------------------------------------------
# reporting: what both scripts print and draw
# --------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(message, flush=True)


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl: one dict per logged step."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_curves(run_dir: Path) -> None:
    """loss.png with train and validation curves; skipped quietly without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = read_metrics(run_dir)
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
