"""Benchmark minilm against Hugging Face transformers: same weights, same process, same step.

    python -m minilm.bench                                    # CPU, fp32, eager, size "mini"
    python -m minilm.bench --workloads mlm-train,clm-train --steps 20
    python -m minilm.bench --compile                          # torch.compile on both sides
    python -m minilm.bench --workloads attention              # only the attention sweep

For every workload the benchmark builds a minilm model, converts it with `minilm.hf.to_hf`
into the transformers model with identical weights, and then

1. checks parity: both models run the same inputs in eval mode; the largest absolute
   difference of their logits (relative to the logits' size) must be within the tolerance of
   the precision (fp32 1e-4, bf16/fp16 3e-2). A pair that disagrees is REFUSED and not
   timed: a fast wrong model is not a result. (The CLI exits with status 1 then.)
2. times both in the same process, alternating minilm / HF step by step (the order flips
   every repetition) after warm-up steps, and reports the median step time, tokens/s and
   the peak memory of one step (see below). On CUDA it also reports MFU.

Workloads (each a "step"):

  mlm-train         BERT shape: MaskedLM vs BertForMaskedLM, forward + backward + AdamW step.
                    15% of positions are targets; HF gets labels with -100 elsewhere (its
                    usual API) and so does minilm, which runs its MLM head only on the
                    target rows. Dropout is on (train mode), as in real training.
  clm-train         GPT-2 shape: CausalLM vs GPT2LMHeadModel, forward + backward + AdamW.
                    HF shifts its labels internally; minilm gets them shifted already, and
                    computes the loss a chunk of rows at a time (linear_cross_entropy)
                    where HF materialises all B·T·V logits.
  classify-forward  BERT shape: SequenceClassifier vs BertForSequenceClassification,
                    inference (eval, torch.inference_mode) on a right-padded batch whose
                    rows hold between T/2 and T real tokens.
  clm-generate      GPT-2 shape: greedy generation with a KV cache, prompt T/2 tokens,
                    T/2 new tokens (minilm.generate.generate vs HF model.generate).
  attention         not a minilm/HF pair: minilm's two attention programs, manual (the
                    formula written out) and sdpa (PyTorch's fused kernel), forward +
                    backward with a causal mask, timed and measured over sequence lengths
                    (CPU 128 … 1024, CUDA 512 … 8192). The plot (attention.png) shows why
                    fused attention matters: the manual path stores (T × T) scores per
                    head, the fused kernel does not. With --dtype bf16 or fp16 on a CPU a
                    third program is timed: PyTorch's kernel called as is, in that precision,
                    whose backward is slow at short T (why minilm's sdpa path runs it in fp32).

Both sides use the same optimizer (torch AdamW, fused where available), the same
precision and the same batch. The speed-up compares the two libraries as each runs by
default, so it includes these differences of method (MLM head on the target rows only,
chunked LM loss, a preallocated KV cache against HF's default dynamic one), not only
kernel speed; the parity gate checks that both compute the same function first. Training
workloads run under autocast (fp32 weights, the usual mixed precision); inference workloads
cast both models to the dtype.

Measurements:
  * step time: wall clock of one step, synchronised on CUDA and MPS; the median of --steps.
  * tokens/s: tokens per step / median step time (training and forward: B·T input tokens,
    generation: B·new tokens).
  * peak memory: the most memory allocated during one step above what was allocated
    before it (weights and optimizer state are not counted, gradients and activations
    are). CUDA: torch.cuda.max_memory_allocated; CPU: the same quantity from the CPU
    allocator's allocation events, recorded by torch.profiler(profile_memory=True) in
    one extra, untimed step.
  * MFU (CUDA only): model FLOPs per second / the device's peak dense FLOPs for the dtype
    (table `PEAK_TFLOPS`). Model FLOPs per token are ModelConfig.flops_per_token (6·N +
    12·L·d·T for training, a third of it for a forward pass; N without the LM head for the
    classifier; generation adds each new token's share of the prompt's prefill), the same
    for both sides. A device missing from the table gets no MFU: it is omitted, never guessed.

CPU allocator. On Linux, glibc returns large freed blocks to the OS at once (mmap
threshold), so every step page-faults its activations and logits back in, and the
kernel zeroes them again: that costs markedly on small machines. The benchmark calls
`minilm.training.tune_cpu_allocator()` (mallopt: keep freed memory in the process) at
start-up, which applies to BOTH sides equally (one process); --no-malloc-tuning
measures glibc's default behaviour instead. bench.json records which.

Outputs (in --out, a new directory, default runs/bench-TIMESTAMP/): a markdown table on
stdout and in bench.md (minilm vs HF with a speed-up column, HF time / minilm time),
bench.json (everything measured, with the machine's load average, versions and options),
bench.png (grouped bars) and, with the attention workload, attention.png.

Timings on a shared machine are noisy: check the load average in bench.json (or
`uptime`) before trusting a number; alternating the two sides in one process makes their
RATIO robust to slow drifts, not to a busy machine.

Running it on a CUDA GPU (GPT-2 124M shape, seq 1024, bf16, compiled; MFU reported):

    python -m minilm.bench --device cuda --dtype bf16 --compile --size gpt2-small \\
        --seq-len 1024 --batch-size 8 --workloads clm-train,attention --steps 20

  then read MFU in the table (goal: ≥ 50% on H100/H200) and, in the attention table,
  the sdpa / manual peak-memory ratio at T = 4096 (goal: ≤ 1/4). The attention sweep
  runs T = 512 … 8192 on CUDA (--sweep-lengths to change); the manual path reports OOM
  where it does not fit. Add --workloads all for every workload at that shape.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minilm.attention import manual_attention, sdpa_attention
from minilm.checkpoint import new_run_setup
from minilm.cli import ArgumentParser, HelpFormatter, main_guard
from minilm.config import ModelConfig, flag, preset
from minilm.errors import MinilmError, import_transformers
from minilm.model import CausalLM, MaskedLM, SequenceClassifier
from minilm.objectives import IGNORE_INDEX, mask_tokens, shift_for_clm
from minilm.training import autocast, dtype_name, resolve_device, resolve_dtype, tune_cpu_allocator

PAIR_WORKLOADS = ("mlm-train", "clm-train", "classify-forward", "clm-generate")
WORKLOADS = PAIR_WORKLOADS + ("attention",)

# Model sizes: the body shape shared by the BERT-shaped and GPT-2-shaped workloads.
SIZES: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=2, d_ff=512, vocab_size=8192),
    "mini": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, vocab_size=8192),
    "small": dict(d_model=512, n_layers=4, n_heads=8, d_ff=2048, vocab_size=8192),
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, vocab_size=50257),  # 124M
}

# |minilm - HF| / max(1, max|HF logits|) allowed before a pair is refused
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}

# Peak dense (no sparsity) tensor throughput in TFLOPS from the vendors' datasheets, by
# device name (regex on torch.cuda.get_device_name) and dtype; fp32 means plain FP32
# (PyTorch's default matmul precision), "tf32" is used when TF32 matmuls are enabled.
# GeForce cards: the FP16/BF16 rate with FP32 accumulation, which is what PyTorch uses.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H100.*PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (r"H100.*NVL|H200.*NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100|H200|GH200|H800", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100|A800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 4080", {"bf16": 97.5, "fp16": 97.5, "tf32": 48.7, "fp32": 48.7}),
    (r"RTX 3090", {"bf16": 35.6, "fp16": 35.6, "tf32": 35.6, "fp32": 35.6}),
    (r"RTX 3080", {"bf16": 29.8, "fp16": 29.8, "tf32": 29.8, "fp32": 29.8}),
    (r"RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", {"fp16": 65.0, "fp32": 8.1}),
]

MIB = 2 ** 20


class ParityError(MinilmError):
    """minilm and HF disagree on the same inputs: the pair is not timed."""


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak dense TFLOPS for this dtype, or None when unknown (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = dtype_name(dtype)
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    for pattern, table in PEAK_TFLOPS:
        if re.search(pattern, name):
            return table.get(key)
    return None


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    device: str = "cpu"
    dtype: str = "fp32"
    compile: bool = False
    batch_size: int = 16
    seq_len: int = 128
    size: str = "mini"
    workloads: tuple[str, ...] = WORKLOADS
    steps: int = 10                   # timed steps per side
    warmup: int = 3                   # untimed steps per side first (compilation happens here)
    out: str = "runs/bench"
    sweep_lengths: tuple[int, ...] | None = None   # None: CPU 128…1024, CUDA 512…8192
    sweep_batch: int = 1
    malloc_tuning: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.workloads) - set(WORKLOADS)
        if not self.workloads:
            raise MinilmError(f"--workloads names none; choose from {', '.join(WORKLOADS)} or all")
        if unknown:
            raise MinilmError(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)} or all")
        if self.size not in SIZES:
            raise MinilmError(f"--size {self.size!r}: choose one of {', '.join(SIZES)}")
        least = {"seq_len": 4, "batch_size": 1, "steps": 1, "warmup": 0, "sweep_batch": 1}
        for name, minimum in least.items():
            if getattr(self, name) < minimum:
                raise MinilmError(f"{flag(name)} must be >= {minimum}, got {getattr(self, name)}")
        if self.sweep_lengths is not None and min(self.sweep_lengths, default=0) < least["seq_len"]:
            raise MinilmError(f"--sweep-lengths must be >= {least['seq_len']} each, got {self.sweep_lengths}")


def model_config(opts: BenchOptions, family: str) -> ModelConfig:
    """The size's shape as a BERT (post-LN encoder) or GPT-2 (pre-LN decoder) config."""
    base = "bert-mini" if family == "bert" else "gpt-mini"
    return preset(base, max_seq_len=opts.seq_len, **SIZES[opts.size])


# --------------------------------------------------------------------------------------
# a workload: the two models, one batch, and what one step of each does
# --------------------------------------------------------------------------------------
@dataclass
class Pair:
    name: str
    description: str
    config: ModelConfig
    minilm: nn.Module
    hf: nn.Module
    tokens_per_step: int
    flops_per_token: float
    # (model, side) -> logits to compare in eval mode, aligned between the sides
    parity_logits: Callable[[nn.Module, str], Tensor]
    # side -> a zero-argument function running one step
    make_step: Callable[[str], Callable[[], object]]
    notes: dict = field(default_factory=dict)


def _train_step(model: nn.Module, inputs: dict, device: torch.device, dtype: torch.dtype,
                compile_model: bool) -> Callable[[], float]:
    """forward + backward + fused AdamW step; returns the closure that runs one."""
    # the same optimizer on both sides; no weight-decay groups (they cost nothing to time)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    forward = torch.compile(model) if compile_model else model
    model.train()

    def step() -> float:
        with autocast(device, dtype):
            loss = forward(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def build_pair(name: str, opts: BenchOptions) -> Pair:
    """The minilm model, its HF twin (to_hf: identical weights) and the batch for a workload."""
    from minilm.hf import to_hf  # needs transformers

    device, dtype = resolve_device(opts.device), resolve_dtype(resolve_device(opts.device), opts.dtype)
    B, T = opts.batch_size, opts.seq_len
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    family = "bert" if name in ("mlm-train", "classify-forward") else "gpt2"
    config = model_config(opts, family)
    V = config.vocab_size
    ids = torch.randint(5, V, (B, T), generator=gen)          # 0…4 are kept for special tokens

    if name == "mlm-train":
        minilm = MaskedLM(config)
        inputs, labels = mask_tokens(ids, vocab_size=V, mask_id=4, special_ids=range(5), generator=gen)
        batch = {"input_ids": inputs.to(device), "labels": labels.to(device)}
        hf_batch = batch
        description = "MLM training step (BERT, 15% targets)"
        tokens = B * T
        flops = config.flops_per_token(T)

        def parity_logits(model: nn.Module, side: str) -> Tensor:
            logits = model(**batch).logits
            # minilm returns the target rows only, in row-major order; HF returns all of them
            return logits if side == "minilm" else logits[batch["labels"] != IGNORE_INDEX]

    elif name == "clm-train":
        minilm = CausalLM(config)
        ids = ids.to(device)
        batch = {"input_ids": ids, "labels": shift_for_clm(ids)}
        hf_batch = {"input_ids": ids, "labels": ids}                 # HF shifts inside
        description = "CLM training step (GPT-2)"
        tokens = B * T
        flops = config.flops_per_token(T)

        def parity_logits(model: nn.Module, side: str) -> Tensor:
            return model(input_ids=ids).logits

    elif name == "classify-forward":
        minilm = SequenceClassifier(config)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        batch = {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}
        hf_batch = batch
        description = "classification forward (inference, padded)"
        tokens = B * T
        # no LM head: the classifier's matmuls are the blocks, the pooler and d × num_labels
        head = config.d_model * (config.num_labels + (config.d_model if config.pooler else 0))
        flops = config.flops_per_token(T, n_params=config.n_matmul_params()
                                       - config.d_model * config.vocab_size + head) / 3

        def parity_logits(model: nn.Module, side: str) -> Tensor:
            return model(**batch).logits

    elif name == "clm-generate":
        minilm = CausalLM(config)
        prompt_len, new_tokens = T // 2, T - T // 2
        prompt = ids[:, :prompt_len].to(device)
        description = f"greedy generation, KV cache ({prompt_len} + {new_tokens} tokens)"
        tokens = B * new_tokens
        # per generated token: its own forward at the mean context, plus its share of the prefill
        prefill = prompt_len * config.flops_per_token(prompt_len) / 3
        flops = (prefill + new_tokens * config.flops_per_token(prompt_len + new_tokens // 2) / 3) / new_tokens

        def parity_logits(model: nn.Module, side: str) -> Tensor:
            return model(input_ids=prompt).logits
    else:
        raise MinilmError(f"{name!r} is not a minilm/HF workload; choose from {', '.join(PAIR_WORKLOADS)}")

    minilm = minilm.to(device)
    hf = to_hf(minilm).to(device)           # to_hf builds the HF model on the CPU
    inference = name in ("classify-forward", "clm-generate")
    if inference and dtype != torch.float32:      # inference: cast the weights (training: autocast)
        minilm, hf = minilm.to(dtype), hf.to(dtype)
    notes = {"hf_attention": getattr(hf.config, "_attn_implementation", None)}

    def make_step(side: str) -> Callable[[], object]:
        model = minilm if side == "minilm" else hf
        if name in ("mlm-train", "clm-train"):
            return _train_step(model, batch if side == "minilm" else hf_batch, device, dtype, opts.compile)
        model.eval()
        if name == "classify-forward":
            forward = torch.compile(model) if opts.compile else model

            def step():
                with torch.inference_mode():
                    return forward(**batch).logits
            return step
        # clm-generate: what generation calls is compiled in place (Module.compile)
        if side == "minilm":
            from minilm.generate import generate
            if opts.compile:
                model.transformer.compile(dynamic=True)

            def step():
                return generate(model, prompt, max_new_tokens=new_tokens, greedy=True)
        else:
            from transformers import GenerationConfig
            gen_config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                          eos_token_id=None, pad_token_id=config.pad_token_id)
            if opts.compile:
                model.compile(dynamic=True)

            def step():
                with torch.inference_mode():
                    return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                          generation_config=gen_config)
        return step

    return Pair(name, description, config, minilm, hf, tokens, flops, parity_logits, make_step, notes)


# --------------------------------------------------------------------------------------
# parity gate
# --------------------------------------------------------------------------------------
def check_parity(pair: Pair, opts: BenchOptions) -> dict:
    """Both models on the same inputs in eval mode -> {max_abs_diff, relative, tolerance, ok}."""
    device = resolve_device(opts.device)
    dtype = resolve_dtype(device, opts.dtype)
    outputs = {}
    for side, model in (("minilm", pair.minilm), ("hf", pair.hf)):
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            outputs[side] = pair.parity_logits(model, side).float()
        model.train(was_training)
    a, b = outputs["minilm"], outputs["hf"]
    if a.shape != b.shape:
        diff = math.inf
    else:
        diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.abs().max().item() if b.numel() else 1.0)
    tolerance = TOLERANCE[dtype]
    ok = diff / scale <= tolerance          # NaN compares False: refused
    return {"max_abs_diff": diff, "relative": diff / scale, "tolerance": tolerance, "ok": ok}


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    """Wait for queued kernels, so that the clock measures their work (GPUs run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_step_memory(step: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one step, above what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    # CPU: replay the allocator's allocation (+bytes) and free (-bytes) events in time order
    from torch.profiler import ProfilerActivity, profile
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:  # the profiler's result object changed shape: no number, not a wrong one
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _stderr_silenced():
    """Hide what C++ code writes to stderr (the profiler logs two lines per session)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def time_alternating(steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                     label: str, progress: bool) -> dict[str, list[float]]:
    """Run the sides' steps alternately (order flipped each repetition); seconds per step."""
    from tqdm.auto import tqdm
    sides = list(steps)
    times: dict[str, list[float]] = {s: [] for s in sides}
    total = (warmup + repeats) * len(sides)
    with tqdm(total=total, desc=label, disable=not progress, leave=False, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for i in range(warmup + repeats):
            order = sides if i % 2 == 0 else sides[::-1]
            for side in order:
                _sync(device)
                t0 = time.perf_counter()
                steps[side]()
                _sync(device)
                if i >= warmup:
                    times[side].append(time.perf_counter() - t0)
                bar.update(1)
    return times


def run_pair(pair: Pair, opts: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """Parity gate, then timing and memory of both sides. A refused pair is not timed."""
    device = resolve_device(opts.device)
    dtype = resolve_dtype(device, opts.dtype)
    parity = check_parity(pair, opts)
    verdict = "ok" if parity["ok"] else f"REFUSED (tolerance {parity['tolerance']:.0e})"
    log(f"[{pair.name}] parity: max |minilm - HF| = {parity['max_abs_diff']:.3g} "
        f"(relative {parity['relative']:.2g}) {verdict}")
    result = {"workload": pair.name, "description": pair.description, "tokens_per_step": pair.tokens_per_step,
              "parity": parity, "refused": not parity["ok"], **pair.notes}
    if not parity["ok"]:
        return result

    steps = {"minilm": pair.make_step("minilm"), "hf": pair.make_step("hf")}
    times = time_alternating(steps, device, opts.warmup, opts.steps, pair.name, opts.progress)
    peak = peak_tflops(device, dtype)
    for side in ("minilm", "hf"):
        median = statistics.median(times[side])
        tokens_per_s = pair.tokens_per_step / median
        memory = peak_step_memory(steps[side], device)
        result[side] = {
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * min(times[side]),
            "times_ms": [round(1e3 * t, 3) for t in times[side]],
            "tokens_per_s": tokens_per_s,
            "peak_mem_mib": None if memory is None else memory / MIB,
            "mfu": None if peak is None else tokens_per_s * pair.flops_per_token / (peak * 1e12),
        }
    result["speedup"] = result["hf"]["median_ms"] / result["minilm"]["median_ms"]
    log(f"[{pair.name}] minilm {result['minilm']['median_ms']:.1f} ms, HF {result['hf']['median_ms']:.1f} ms "
        f"per step: {result['speedup']:.2f}x")
    return result


# --------------------------------------------------------------------------------------
# attention sweep: one function, two programs
# --------------------------------------------------------------------------------------
def attention_sweep(opts: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """Forward + backward of causal attention alone, manual vs sdpa, over sequence lengths."""
    device = resolve_device(opts.device)
    dtype = resolve_dtype(device, opts.dtype)
    shape = SIZES[opts.size]
    n_heads, head_size = shape["n_heads"], shape["d_model"] // shape["n_heads"]
    lengths = opts.sweep_lengths or ((512, 1024, 2048, 4096, 8192) if device.type == "cuda"
                                     else (128, 256, 512, 1024))
    programs = {"manual": manual_attention, "sdpa": sdpa_attention}
    if device.type == "cpu" and dtype != torch.float32:
        # sdpa_attention runs this case in float32 (see its docstring); the kernel called as
        # is, in the half precision, shows what that buys
        programs["kernel"] = F.scaled_dot_product_attention
    rows = []
    for T in lengths:
        gen = torch.Generator().manual_seed(opts.seed)
        q, k, v = (torch.randn(opts.sweep_batch, n_heads, T, head_size, generator=gen).to(device, dtype)
                   .requires_grad_() for _ in range(3))
        grad = torch.randn(q.shape, generator=gen).to(device, dtype)

        def make_step(attend):
            def step():
                attend(q, k, v, is_causal=True).backward(grad)
                q.grad = k.grad = v.grad = None
            return step

        row: dict = {"seq_len": T, "max_abs_diff": None}
        steps = {}
        for name, fn in programs.items():   # memory first, one program at a time: each may not fit
            try:
                memory = peak_step_memory(make_step(fn), device)
                row[name] = {"median_ms": None, "peak_mem_mib": None if memory is None else memory / MIB}
                steps[name] = make_step(fn)
            except torch.OutOfMemoryError:  # the manual path at long T: that is the point
                row[name] = {"median_ms": None, "peak_mem_mib": None, "oom": True}
                q.grad = k.grad = v.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if len(steps) == len(programs):
            with torch.no_grad():
                row["max_abs_diff"] = (manual_attention(q, k, v, is_causal=True).float()
                                       - sdpa_attention(q, k, v, is_causal=True).float()).abs().max().item()
        if steps:
            times = time_alternating(steps, device, 1, max(3, opts.steps // 2), f"attention T={T}", opts.progress)
            for name in steps:
                row[name]["median_ms"] = 1e3 * statistics.median(times[name])
        rows.append(row)
        log(f"[attention] T={T}: " + ", ".join(
            f"{name} {_fmt(row[name]['median_ms'], '.2f')} ms {_fmt(row[name]['peak_mem_mib'], '.1f')} MiB"
            for name in programs))
    return {"batch": opts.sweep_batch, "n_heads": n_heads, "head_size": head_size, "causal": True,
            "dtype": dtype_name(dtype), "rows": rows}


# --------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def markdown_table(report: dict) -> str:
    """The results as markdown: minilm vs HF per workload, then the attention sweep."""
    meta = report["meta"]
    lines = [f"minilm vs Hugging Face transformers {meta['transformers']} — {meta['device_name']}, "
             f"{meta['dtype']}, {'compiled' if meta['compile'] else 'eager'}, size {meta['size']}, "
             f"batch {meta['batch_size']} × seq {meta['seq_len']}, {meta['threads']} threads, "
             f"load avg {meta['load_avg_start'][0]:.2f} → {meta['load_avg_end'][0]:.2f}", ""]
    if report["results"]:
        lines += ["| workload | minilm ms | HF ms | speed-up | minilm tok/s | HF tok/s | minilm peak MiB | "
                  "HF peak MiB | MFU minilm | MFU HF | max abs diff |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["results"]:
            if r["refused"]:
                lines.append(f"| {r['workload']} | REFUSED: outputs differ | | | | | | | | | "
                             f"{r['parity']['max_abs_diff']:.2e} |")
                continue
            m, h = r["minilm"], r["hf"]
            mfu = [_fmt(None if x["mfu"] is None else 100 * x["mfu"], ".1f", "%") for x in (m, h)]
            lines.append(f"| {r['workload']} | {m['median_ms']:.1f} | {h['median_ms']:.1f} | "
                         f"**{r['speedup']:.2f}×** | {m['tokens_per_s']:,.0f} | {h['tokens_per_s']:,.0f} | "
                         f"{_fmt(m['peak_mem_mib'], '.1f')} | {_fmt(h['peak_mem_mib'], '.1f')} | "
                         f"{mfu[0]} | {mfu[1]} | {r['parity']['max_abs_diff']:.2e} |")
    sweep = report.get("attention_sweep")
    if sweep:
        kernel = "kernel" in sweep["rows"][0]
        lines += ["", f"attention alone, forward + backward, causal, batch {sweep['batch']}, "
                  f"{sweep['n_heads']} heads × {sweep['head_size']}, {sweep['dtype']}", "",
                  "| seq len | manual ms | sdpa ms |" + (" PyTorch kernel as is, ms |" if kernel else "")
                  + " manual peak MiB | sdpa peak MiB | sdpa/manual memory |",
                  "|---:|---:|---:|" + ("---:|" if kernel else "") + "---:|---:|---:|"]
        for row in sweep["rows"]:
            m, s = row["manual"], row["sdpa"]
            ratio = (s["peak_mem_mib"] / m["peak_mem_mib"]
                     if m.get("peak_mem_mib") and s.get("peak_mem_mib") is not None else None)
            lines.append(f"| {row['seq_len']} | {_fmt(m['median_ms'], '.2f')} | {_fmt(s['median_ms'], '.2f')} | "
                         + (f"{_fmt(row['kernel']['median_ms'], '.2f')} | " if kernel else "")
                         + f"{'OOM' if m.get('oom') else _fmt(m['peak_mem_mib'], '.1f')} | "
                         f"{_fmt(s['peak_mem_mib'], '.1f')} | {_fmt(ratio, '.3f')} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> list[Path]:
    """bench.png: tokens/s and peak memory, minilm vs HF, grouped by workload; attention.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def log_axis(ax) -> None:  # log scale with ticks at 1, 2, 5, 10, … written as plain numbers
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())

    written = []
    results = [r for r in report["results"] if not r["refused"]]
    if results:
        fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
        x = range(len(results))
        width = 0.38
        for ax, key, ylabel in ((ax_speed, "tokens_per_s", "tokens / s (higher is better)"),
                                (ax_mem, "peak_mem_mib", "peak MiB per step (lower is better)")):
            for offset, side, color in ((-width / 2, "minilm", "tab:blue"), (width / 2, "hf", "tab:orange")):
                values = [r[side][key] or 0.0 for r in results]
                ax.bar([i + offset for i in x], values, width, label="minilm" if side == "minilm" else "HF",
                       color=color)
            ax.set_xticks(list(x), [r["workload"] for r in results], rotation=15)
            ax.set_ylabel(ylabel)
            log_axis(ax)
            ax.legend()
        for i, r in zip(x, results):
            ax_speed.annotate(f"{r['speedup']:.2f}×", (i - width / 2, r["minilm"]["tokens_per_s"]),
                              ha="center", va="bottom", fontsize=9)
        meta = report["meta"]
        fig.suptitle(f"minilm vs HF — {meta['device_name']}, {meta['dtype']}, "
                     f"{'compiled' if meta['compile'] else 'eager'}, batch {meta['batch_size']} × {meta['seq_len']}")
        fig.tight_layout()
        fig.savefig(out / "bench.png", dpi=120)
        plt.close(fig)
        written.append(out / "bench.png")

    sweep = report.get("attention_sweep")
    if sweep:
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, marker in (("manual", "o"), ("sdpa", "s"), ("kernel", "^")):
            if name not in sweep["rows"][0]:
                continue
            pts = [(r["seq_len"], r[name]["median_ms"], r[name]["peak_mem_mib"]) for r in sweep["rows"]
                   if r[name].get("median_ms") is not None]
            ax_time.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=name)
            ax_mem.plot([p[0] for p in pts], [p[2] or 0.0 for p in pts], marker=marker, label=name)
        for ax, ylabel in ((ax_time, "ms, forward + backward"), (ax_mem, "peak MiB")):
            ax.set_xscale("log", base=2)
            ax.set_xticks([r["seq_len"] for r in sweep["rows"]], [str(r["seq_len"]) for r in sweep["rows"]])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            log_axis(ax)
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(ylabel)
            ax.legend()
            ax.grid(alpha=0.3)
        fig.suptitle(f"causal attention, manual (T×T scores) vs fused SDPA — {sweep['n_heads']} heads × "
                     f"{sweep['head_size']}, batch {sweep['batch']}, {sweep['dtype']}")
        fig.tight_layout()
        fig.savefig(out / "attention.png", dpi=120)
        plt.close(fig)
        written.append(out / "attention.png")
    return written


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"
    return device.type


def run(opts: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """All requested workloads -> the report (also written to opts.out)."""
    device = resolve_device(opts.device)
    dtype = resolve_dtype(device, opts.dtype)
    tuned = opts.malloc_tuning and device.type == "cpu" and tune_cpu_allocator()    # False where no glibc
    transformers = import_transformers()
    transformers.logging.set_verbosity_error()   # config warnings about unused GPT-2 bos/eos ids are noise here

    meta = {"device": str(device), "device_name": device_name(device), "dtype": dtype_name(dtype),
            "compile": opts.compile, "batch_size": opts.batch_size, "seq_len": opts.seq_len, "size": opts.size,
            "steps": opts.steps, "warmup": opts.warmup, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_allocator": "tuned (mallopt)" if tuned else "default",
            "load_avg_start": list(os.getloadavg()), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = []
    for name in opts.workloads:
        if name == "attention":
            continue
        pair = build_pair(name, opts)
        results.append(run_pair(pair, opts, log))
        del pair
        gc.collect()
    sweep = attention_sweep(opts, log) if "attention" in opts.workloads else None
    meta["load_avg_end"] = list(os.getloadavg())
    report = {"meta": meta, "results": results, "attention_sweep": sweep}

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(report)
    (out / "bench.md").write_text(table)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    report["files"] = ["bench.json", "bench.md"] + [path.name for path in plot(report, out)]
    return report


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> BenchOptions:
    p = ArgumentParser(prog="python -m minilm.bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16 (CUDA) or auto")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--size", default="mini", choices=list(SIZES), help="model shape, the same on both sides")
    p.add_argument("--workloads", default="all", help=f"comma-separated from {','.join(WORKLOADS)}, or all")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before timing")
    p.add_argument("--sweep-lengths", default=None, help="attention sweep sequence lengths, e.g. 128,256,512 "
                   "(default: CPU 128,256,512,1024; CUDA 512 … 8192)")
    p.add_argument("--sweep-batch", type=int, default=1, help="batch size of the attention sweep")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="keep glibc's default allocator behaviour on CPU (see the module docstring)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs")
    p.add_argument("--out", default=None, help="a new directory for bench.md, bench.json, bench.png (the model "
                   "workloads) and attention.png (the attention sweep) [runs/bench-TIMESTAMP]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    workloads = WORKLOADS if a.workloads == "all" else tuple(w.strip() for w in a.workloads.split(",") if w.strip())
    try:
        lengths = tuple(int(x) for x in a.sweep_lengths.split(",")) if a.sweep_lengths else None
    except ValueError as err:
        raise MinilmError(f"--sweep-lengths {a.sweep_lengths!r}: give integers separated by commas") from err
    return BenchOptions(device=a.device, dtype=a.dtype, compile=a.compile, batch_size=a.batch_size,
                        seq_len=a.seq_len, size=a.size, workloads=workloads, steps=a.steps, warmup=a.warmup,
                        out=a.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}",
                        sweep_lengths=lengths, sweep_batch=a.sweep_batch,
                        malloc_tuning=not a.no_malloc_tuning, seed=a.seed, progress=not a.no_progress)


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with new_run_setup(Path(opts.out)):     # checked before minutes of measuring; never over an earlier report
        report = run(opts, log_stderr)
    print(markdown_table(report))
    print(f"wrote {Path(opts.out)}/: {', '.join(report['files'])}", file=sys.stderr)
    return 1 if any(r["refused"] for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
