"""The shared training loop: schedule, optimizer groups, budgets, best checkpoint, exact resume."""

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from minilm import CausalLM, MaskedLM, SequenceClassifier, preset, training
from minilm.errors import MinilmError
from minilm.training import Interrupted, LoopConfig, Trainer, layer_of, lr_at, make_optimizer, resolve_dtype


def tiny_model(seed: int = 0, dropout: float = 0.1) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(preset("gpt-mini", vocab_size=50, max_seq_len=16, d_model=32, n_heads=4, d_ff=64,
                           dropout=dropout, attn_dropout=dropout))


def get_batch(i: int) -> dict:
    """A pure function of the micro-batch index, like the real data pipeline."""
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randint(0, 50, (4, 17), generator=g)
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def test_lr_schedule_warms_up_then_decays_to_floor():
    lrs = [lr_at(s, s / 100, 1.0, 10, "cosine", 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0))))
    assert max(lrs) == pytest.approx(lrs[9]) and lrs[9] > 0.98
    assert lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(50, 0.5, 1.0, 0, "linear", 0.0) == pytest.approx(0.5)


@pytest.mark.parametrize("steps, warmup, ended_in_warmup", [(4, 10, True), (6, 3, False)])
def test_a_run_that_ends_in_its_warmup_says_the_lr_never_peaked(tmp_path, capsys, steps, warmup, ended_in_warmup):
    loop = LoopConfig(lr=1e-3, warmup_steps=warmup, max_steps=steps, log_every=1, progress=False)
    Trainer(tiny_model(), get_batch, loop, tmp_path, torch.device("cpu"), torch.float32).fit()
    peak = lr_at(steps - 1, (steps - 1) / steps, 1e-3, warmup, "cosine", loop.min_lr_ratio)
    note = f"ended in its warmup (step {steps} of {warmup}), so the learning rate peaked at {peak:.2e}, not 0.001"
    assert (note in capsys.readouterr().out) is ended_in_warmup


def test_no_weight_decay_on_norms_biases_embeddings():
    model = tiny_model()
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        should = p.dim() >= 2 and "embeddings" not in name
        assert (id(p) in decayed) == should, name


def test_layer_wise_learning_rates(tmp_path):
    """γ = 0.5 on 4 blocks: embeddings lr·γ⁵, block 0 lr·γ⁴ … block 3 lr·γ, final norm (and head) lr;
    the weight-decay split is the same as without it, and the loop applies lr · lr_scale."""
    model = tiny_model()
    n = model.config.n_layers
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"), layer_lr_decay=0.5)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    expected_scale = {"transformer.embeddings.tokens.weight": 1 / 32, "transformer.blocks.0.mlp.fc_in.weight": 1 / 16,
                      "transformer.blocks.3.attn.qkv.weight": 0.5, "transformer.final_norm.weight": 1.0}
    names = dict(model.named_parameters())
    assert set(expected_scale) <= set(names)
    for name, scale in expected_scale.items():
        assert group_of[id(names[name])]["lr_scale"] == scale, name
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        assert g["lr_scale"] == 0.5 ** (n + 1 - layer_of(name, n))
        assert (g["weight_decay"] > 0) == (p.dim() >= 2 and "embeddings" not in name), name
    assert len(group_of) == len(names) and sum(len(g["params"]) for g in opt.param_groups) == len(names)
    # without decay: the two groups as before, scale 1
    plain = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0, 1.0]

    loop = LoopConfig(lr=1e-2, warmup_steps=0, schedule="constant", max_steps=1, progress=False, layer_lr_decay=0.5)
    trainer = Trainer(tiny_model(), get_batch, loop, tmp_path, torch.device("cpu"), torch.float32)
    trainer.train_step()
    assert sorted({g["lr"] for g in trainer.optimizer.param_groups}) == [1e-2 * 0.5 ** k for k in range(5, -1, -1)]
    for bad in (0.0, 1.5):
        with pytest.raises(MinilmError, match="layer-lr-decay"):
            LoopConfig(max_steps=1, layer_lr_decay=bad)


def test_needs_a_budget():
    with pytest.raises(MinilmError, match="budget"):
        LoopConfig()


@pytest.mark.parametrize("field, value, message", [
    ("max_steps", 0, "--max-steps must be > 0, got 0"), ("time_budget", -5.0, "--time-budget must be > 0"),
    ("lr", float("nan"), "--lr must be > 0, got nan"), ("log_every", 0, "--log-every must be > 0"),
    ("warmup_steps", -1, "--warmup-steps must be >= 0"), ("patience", -2, "--patience must be >= 0"),
    ("min_lr_ratio", 1.5, r"--min-lr-ratio must be in \[0, 1\]")])
def test_out_of_range_settings_are_one_line_errors(field, value, message):
    """A negative budget would train forever, log_every 0 would divide by zero: caught up front."""
    with pytest.raises(MinilmError, match=message):
        LoopConfig(**{"max_steps": 10, field: value})


def test_dtype_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype(cpu, "fp32") == torch.float32
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert resolve_dtype(cpu, "auto") == torch.bfloat16
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    assert resolve_dtype(cpu, "auto") == torch.float32
    with pytest.raises(MinilmError):
        resolve_dtype(cpu, "fp16")


def run(tmp_path, steps, resume=False, interrupt_at=None, evaluate=None, ctrl_c_at=None):
    loop = LoopConfig(lr=3e-3, warmup_steps=3, max_steps=steps, log_every=1, save_every=4, progress=False)

    def batches(i):
        if interrupt_at is not None and i == interrupt_at:
            raise KeyboardInterrupt
        if ctrl_c_at is not None and i == ctrl_c_at:
            os.kill(os.getpid(), signal.SIGINT)      # the user presses Ctrl-C while batch i is read
        return get_batch(i)

    trainer = Trainer(tiny_model(), batches, loop, tmp_path, torch.device("cpu"), torch.float32, evaluate)
    if resume:
        trainer.resume()
    return trainer.fit()


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def counting_batch(i: int) -> dict:
    """Learnable data: each row counts up by one from a random start (mod 50)."""
    starts = torch.randint(0, 50, (8, 1), generator=torch.Generator().manual_seed(i))
    x = (starts + torch.arange(17)) % 50
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def test_training_learns_what_can_be_learned(tmp_path):
    """From ln 50 = 3.9 nats (a uniform guess) to far below: the optimizer really steps."""
    loop = LoopConfig(lr=1e-2, warmup_steps=5, max_steps=60, log_every=1, progress=False)
    Trainer(tiny_model(), counting_batch, loop, tmp_path, torch.device("cpu"), torch.float32).fit()
    curve = losses(tmp_path)
    assert curve[0][1] > 3.5 and curve[-1][1] < 0.5 * curve[0][1], curve[::10]


def class_batch(i: int) -> dict:
    """8 rows of 3 classes with class weights, for a classifier: the weighted mean divides by
    the summed weights of the rows' classes, not by the rows."""
    g = torch.Generator().manual_seed(i)
    return {"input_ids": torch.randint(0, 50, (8, 16), generator=g), "labels": torch.randint(0, 3, (8,), generator=g),
            "class_weights": torch.tensor([0.5, 1.0, 4.0])}


def masked_batch(i: int) -> dict:
    """8 rows for a masked LM with about 15% of the targets kept: the halves hold different
    numbers of masked tokens, the denominators of their mean losses."""
    full = counting_batch(i)
    g = torch.Generator().manual_seed(10_000 + i)
    labels = full["labels"].masked_fill(torch.rand(full["labels"].shape, generator=g) > 0.15, -100)
    return {"input_ids": full["input_ids"], "labels": labels}


@pytest.mark.parametrize("split, batch, model", [
    (4, counting_batch, "clm"),
    (4, masked_batch, "mlm"),
    (6, counting_batch, "clm"),         # micro-batches of 6 and 2 rows: an epoch's short last batch
    (5, class_batch, "classifier"),     # class weights: each half's mean has its own denominator
])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, split, batch, model):
    """grad_accum=2 over two parts of a batch takes the same steps as the whole batch at once."""
    def part(j: int) -> dict:
        full = batch(j // 2)
        rows = slice(0, split) if j % 2 == 0 else slice(split, 8)
        return {k: v if k == "class_weights" else v[rows] for k, v in full.items()}

    def new_model():
        if model == "clm":
            return tiny_model(dropout=0.0)
        torch.manual_seed(0)
        if model == "mlm":
            return MaskedLM(preset("bert-tiny", vocab_size=50, max_seq_len=16, d_model=32, n_heads=4, d_ff=64,
                                   dropout=0.0, attn_dropout=0.0))
        return SequenceClassifier(preset("bert-tiny", vocab_size=50, max_seq_len=16, d_model=32, n_heads=4,
                                         d_ff=64, dropout=0.0, attn_dropout=0.0, num_labels=3))

    runs = []
    for accum, batches, out in ((1, batch, tmp_path / "one"), (2, part, tmp_path / "two")):
        out.mkdir()
        loop = LoopConfig(lr=1e-2, warmup_steps=0, max_steps=3, grad_accum=accum, log_every=1, progress=False)
        trainer = Trainer(new_model(), batches, loop, out, torch.device("cpu"), torch.float32)
        grads, step = [], trainer.optimizer.step

        def record_then_step(*args, **kwargs):      # the gradients each optimizer step sees
            grads.append([p.grad.clone() for p in trainer.model.parameters()])
            return step(*args, **kwargs)

        trainer.optimizer.step = record_then_step
        trainer.fit()
        assert trainer.tokens == 3 * 8 * 16
        runs.append((grads, losses(out), trainer.model.state_dict()))
    (grads_1, losses_1, weights_1), (grads_2, losses_2, weights_2) = runs
    assert len(grads_1) == len(grads_2) == 3
    for g1, g2 in zip(grads_1, grads_2):           # AdamW hides a gradient's scale: compare the gradients
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g1, g2))
    assert [loss for _, loss in losses_1] == pytest.approx([loss for _, loss in losses_2], rel=1e-5)
    assert all(torch.allclose(weights_1[k], weights_2[k], atol=1e-4) for k in weights_1)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    run(straight, 12)
    with pytest.raises(KeyboardInterrupt):
        run(broken, 12, interrupt_at=10)             # dies in step 10, after the state saved at step 8
    assert max(step for step, _ in losses(broken)) == 10    # steps 1..10 were logged; 9, 10 get redone
    run(broken, 12, resume=True)
    assert losses(broken) == losses(straight)          # identical curve, bit for bit
    a, b = load_file(straight / "model.safetensors"), load_file(broken / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_finishes_the_step_saves_the_state_and_resumes_exactly(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    run(straight, 12)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as stop:
        run(broken, 12, ctrl_c_at=5)                 # Ctrl-C during step 6; the last periodic save was at 4
    assert signal.getsignal(signal.SIGINT) is handler          # Ctrl-C behaves as before outside fit()
    assert (stop.value.step, stop.value.run_dir) == (6, broken)
    assert torch.load(broken / "state" / "trainer.pt", weights_only=True)["step"] == 6
    run(broken, 12, resume=True)
    assert losses(broken) == losses(straight)
    a, b = load_file(straight / "model.safetensors"), load_file(broken / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("grad_clip", [0.05, 0.0])
def test_gradients_are_clipped_to_the_global_norm(tmp_path, grad_clip):
    loop = LoopConfig(lr=1e-3, warmup_steps=0, max_steps=2, grad_clip=grad_clip, progress=False)
    trainer = Trainer(tiny_model(), counting_batch, loop, tmp_path, torch.device("cpu"), torch.float32)
    norms, step = [], trainer.optimizer.step

    def record_then_step(*args, **kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()])))
        return step(*args, **kwargs)

    trainer.optimizer.step = record_then_step
    trainer.fit()
    assert len(norms) == 2
    if grad_clip:
        assert all(n <= grad_clip * (1 + 1e-4) for n in norms) and max(norms) > 0.9 * grad_clip
    else:
        assert min(norms) > 0.05            # 0 disables clipping: the raw norm (about 1 here) comes through


@pytest.mark.parametrize("grad_clip", [0.5, 0.0])
def test_log_rows_carry_the_windows_largest_gradient_norm_before_clipping(tmp_path, monkeypatch, grad_clip):
    norms, clip = [], torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        norms.append(float(clip(*args, **kwargs)))       # what clip_grad_norm_ returns: the norm before
        return norms[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    loop = LoopConfig(lr=1e-2, warmup_steps=0, max_steps=6, log_every=3, grad_clip=grad_clip, progress=False)
    Trainer(tiny_model(), counting_batch, loop, tmp_path, torch.device("cpu"), torch.float32).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if grad_clip:
        assert [r["grad_norm"] for r in rows] == pytest.approx([max(norms[:3]), max(norms[3:])])
    else:                   # no clipping, no norm computed: none logged
        assert norms == [] and not any("grad_norm" in r for r in rows)


def test_best_checkpoint_and_early_stopping(tmp_path):
    scores = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9])
    at_best = {}

    def evaluate(model, final):
        score = next(scores)
        if score == 2.0:
            at_best.update({k: v.clone() for k, v in model.state_dict().items()})
        return {"val_loss": score}

    loop = LoopConfig(lr=1e-3, warmup_steps=0, max_steps=100, eval_every=2, patience=2, progress=False)
    trainer = Trainer(tiny_model(), get_batch, loop, tmp_path, torch.device("cpu"), torch.float32, evaluate=evaluate)
    summary = trainer.fit()
    assert summary["stop_reason"].startswith("early stop")
    assert summary["steps"] == 8 and summary["best"] == 2.0
    best, final = load_file(tmp_path / "best.safetensors"), load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(best[k], at_best[k]) for k in best)               # the weights of the 2.0 evaluation
    assert not all(torch.equal(best[k], final[k]) for k in best)             # not the last ones
    assert next(scores) == 2.7          # the early-stopped weights were not evaluated a second time
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 8 and "loss" in last and last["val_loss"] == 2.6     # its training window too


@pytest.mark.parametrize("steps", [7, 10])
def test_the_last_step_has_one_row_with_its_own_training_window(tmp_path, steps):
    """log_every 5: a run of 10 steps logs 5 and 10 once each; a run of 7 logs 5 and 7, and
    row 7 holds the loss of steps 6-7 and the lr step 7 trained at."""
    loop = LoopConfig(lr=1e-3, warmup_steps=2, max_steps=steps, log_every=5, eval_every=0, progress=False)
    Trainer(tiny_model(), get_batch, loop, tmp_path, torch.device("cpu"), torch.float32,
            evaluate=lambda model, final: {"val_loss": 1.0}).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, steps]
    last = rows[-1]
    assert {"loss", "tok_per_s", "train_seconds", "val_loss"} <= set(last)
    assert last["lr"] == pytest.approx(lr_at(steps - 1, (steps - 1) / steps, 1e-3, 2, "cosine", loop.min_lr_ratio))


def test_with_a_subset_evaluated_periodically_the_best_is_chosen_on_the_subset(tmp_path):
    """Pretraining scores the first --eval-tokens periodically and everything at the end: the
    last step must compete on the subset too, not with its full score (another set's number)."""
    subset_scores = iter([3.0, 2.0, 1.5])          # steps 2, 4, and 5 (the last)

    def evaluate(model, final):
        return {"val_loss": 9.0 if final else next(subset_scores)}

    loop = LoopConfig(lr=1e-3, warmup_steps=0, max_steps=5, eval_every=2, progress=False)
    summary = Trainer(tiny_model(), get_batch, loop, tmp_path, torch.device("cpu"), torch.float32,
                      evaluate=evaluate, final_scores_more=True).fit()
    assert summary["best"] == 1.5 and summary["val_loss"] == 9.0
    best, final = load_file(tmp_path / "best.safetensors"), load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)     # 1.5 beat 2.0: the last weights are best


def test_patience_needs_periodic_evaluations():
    with pytest.raises(MinilmError, match="--patience 2 needs periodic evaluations"):
        LoopConfig(max_steps=10, eval_every=0, patience=2)

