"""The benchmark's parity gate and output format (no timings are asserted: they are noise)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from minilm import bench  # noqa: E402

TINY = ["--size", "tiny", "--seq-len", "16", "--batch-size", "2", "--steps", "1", "--warmup", "0",
        "--sweep-lengths", "16,32", "--no-progress", "--no-malloc-tuning"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_options(**changes) -> bench.BenchOptions:
    return bench.BenchOptions(**{**dict(size="tiny", seq_len=16, batch_size=2, steps=1, warmup=0,
                                        progress=False, malloc_tuning=False), **changes})


@pytest.mark.parametrize("workload", bench.PAIR_WORKLOADS)
def test_identical_pairs_pass_the_gate(workload):
    opts = tiny_options()
    parity = bench.check_parity(bench.build_pair(workload, opts), opts)
    assert parity["ok"] and parity["max_abs_diff"] < 1e-4


def test_a_perturbed_pair_is_refused_and_not_timed():
    opts = tiny_options()
    pair = bench.build_pair("mlm-train", opts)
    with torch.no_grad():                    # a wrong model: one weight of one block changed
        pair.minilm.transformer.blocks[0].mlp.fc_out.weight[3, 5] += 1.0

    def no_timing(side):
        raise AssertionError("a refused pair must not be timed")
    pair.make_step = no_timing
    lines = []
    result = bench.run_pair(pair, opts, log=lines.append)
    assert result["refused"] and not result["parity"]["ok"]
    assert result["parity"]["relative"] > result["parity"]["tolerance"]
    assert "minilm" not in result and "speedup" not in result
    assert "REFUSED" in lines[0] and "max |minilm - HF|" in lines[0]


def test_cli_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(TINY + ["--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert set(report) == {"meta", "results", "attention_sweep"}
    for key in ("device", "device_name", "dtype", "compile", "batch_size", "seq_len", "size", "threads",
                "torch", "transformers", "cpu_allocator", "load_avg_start", "load_avg_end"):
        assert key in report["meta"], key
    assert [r["workload"] for r in report["results"]] == list(bench.PAIR_WORKLOADS)
    for r in report["results"]:
        assert not r["refused"] and r["parity"]["ok"]
        assert r["speedup"] == pytest.approx(r["hf"]["median_ms"] / r["minilm"]["median_ms"])
        for side in ("minilm", "hf"):
            assert set(r[side]) >= {"median_ms", "tokens_per_s", "peak_mem_mib", "mfu", "times_ms"}
            assert r[side]["median_ms"] > 0 and r[side]["tokens_per_s"] > 0
            assert r[side]["peak_mem_mib"] is not None and r[side]["peak_mem_mib"] > 0
            assert r[side]["mfu"] is None                       # CPU: no MFU, never a guess
    sweep = report["attention_sweep"]
    assert [row["seq_len"] for row in sweep["rows"]] == [16, 32]
    for row in sweep["rows"]:
        assert row["max_abs_diff"] < 1e-4
        assert row["manual"]["median_ms"] > 0 and row["sdpa"]["peak_mem_mib"] is not None

    table = capsys.readouterr().out
    assert table == (out / "bench.md").read_text() + "\n"
    assert "| workload | minilm ms | HF ms | speed-up |" in table
    assert "| mlm-train |" in table and "| seq len | manual ms | sdpa ms |" in table
    for png in ("bench.png", "attention.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "bench.json").read_bytes()
    with pytest.raises(bench.MinilmError, match="already exists and is not empty"):
        bench.main(TINY + ["--out", str(out)])          # an earlier report is never overwritten
    assert (out / "bench.json").read_bytes() == before


def test_cli_exits_1_and_marks_a_refused_workload(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "check_parity", lambda pair, opts: {
        "max_abs_diff": 0.7, "relative": 0.7, "tolerance": 1e-4, "ok": False})
    out = tmp_path / "bench"
    assert bench.main(TINY + ["--workloads", "classify-forward", "--out", str(out)]) == 1
    assert "| classify-forward | REFUSED" in capsys.readouterr().out
    report = json.loads((out / "bench.json").read_text())
    assert report["results"][0]["refused"] and report["attention_sweep"] is None


def test_model_flops_count_the_matmuls_each_workload_runs():
    """Forward FLOPs = 2 per weight of each matmul + 4·L·d·T for QKᵀ and ·V, counted by hand from
    the minilm model's own linear layers."""
    opts = tiny_options()
    T = opts.seq_len

    def forward_flops(model, context: int) -> float:
        weights = sum(m.weight.numel() for m in model.transformer.blocks.modules() if isinstance(m, torch.nn.Linear))
        heads = sum(m.weight.numel() for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and not name.startswith("transformer."))
        c = model.config
        return 2 * (weights + heads) + 4 * c.n_layers * c.d_model * context

    classify = bench.build_pair("classify-forward", opts)          # pooler + classifier, no LM head
    assert classify.flops_per_token == pytest.approx(forward_flops(classify.minilm, T))
    generate = bench.build_pair("clm-generate", opts)              # prefill of T/2, then T/2 new tokens
    prompt, new = T // 2, T - T // 2
    per_new = (prompt * forward_flops(generate.minilm, prompt)
               + new * forward_flops(generate.minilm, prompt + new // 2)) / new
    assert generate.flops_per_token == pytest.approx(per_new)


def test_mfu_needs_a_known_device(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert bench.peak_tflops(cuda, torch.bfloat16) == pytest.approx(989.4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert bench.peak_tflops(cuda, torch.bfloat16) == pytest.approx(756.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    assert bench.peak_tflops(cuda, torch.bfloat16) is None       # not an A10: no guess
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert bench.peak_tflops(cuda, torch.bfloat16) is None
    assert bench.peak_tflops(torch.device("cpu"), torch.float32) is None


def test_bad_options_are_user_errors():
    with pytest.raises(bench.MinilmError, match="unknown workloads"):
        bench.parse_args(["--workloads", "mlm-train,nope"])
    with pytest.raises(bench.MinilmError, match="--workloads names none"):
        bench.parse_args(["--workloads", " , "])
    with pytest.raises(bench.MinilmError, match="sweep-lengths"):
        bench.parse_args(["--sweep-lengths", "128,abc"])
    # each bad number names its flag (these used to end in a traceback from inside the sweep)
    for flags, message in ((["--sweep-lengths", "128,0"], "--sweep-lengths must be >= 4 each, got (128, 0)"),
                           (["--sweep-batch", "0"], "--sweep-batch must be >= 1, got 0"),
                           (["--steps", "0"], "--steps must be >= 1, got 0"),
                           (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
                           (["--size", "huge"], "argument --size: invalid choice: 'huge'")):
        with pytest.raises(bench.MinilmError) as err:
            bench.parse_args(flags)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_attention_sweep_reports_a_program_that_does_not_fit(monkeypatch):
    real = bench.manual_attention

    def manual_that_runs_out_of_memory(q, *args, **kwargs):
        if q.size(2) >= 32:
            raise torch.OutOfMemoryError("simulated")
        return real(q, *args, **kwargs)
    monkeypatch.setattr(bench, "manual_attention", manual_that_runs_out_of_memory)
    sweep = bench.attention_sweep(tiny_options(sweep_lengths=(16, 32)), log=lambda line: None)
    short, long = sweep["rows"]
    assert short["manual"]["median_ms"] > 0 and short["max_abs_diff"] < 1e-4
    assert long["manual"] == {"median_ms": None, "peak_mem_mib": None, "oom": True}
    assert long["sdpa"]["median_ms"] > 0 and long["max_abs_diff"] is None
    table = bench.markdown_table({"meta": {"transformers": "x", "device_name": "cpu", "dtype": "fp32",
                                           "compile": False, "size": "tiny", "batch_size": 2, "seq_len": 16,
                                           "threads": 1, "load_avg_start": [0.0], "load_avg_end": [0.0]},
                                  "results": [], "attention_sweep": sweep})
    assert "| 32 | – |" in table and "OOM" in table


def test_half_precision_cpu_sweep_times_the_kernel_as_is_too(tmp_path):
    """bf16 on a CPU: sdpa_attention runs the kernel in fp32, so the sweep also times the kernel
    called in bf16 (the reason for that route); in fp32 there is nothing to compare."""
    meta = {"transformers": "x", "device_name": "cpu", "compile": False, "size": "tiny", "batch_size": 2,
            "seq_len": 16, "threads": 1, "load_avg_start": [0.0], "load_avg_end": [0.0]}
    half = bench.attention_sweep(tiny_options(sweep_lengths=(16,), dtype="bf16"), log=lambda line: None)
    assert half["dtype"] == "bf16" and half["rows"][0]["kernel"]["median_ms"] > 0
    table = bench.markdown_table({"meta": {**meta, "dtype": "bf16"}, "results": [], "attention_sweep": half})
    assert "PyTorch kernel as is" in table and table.splitlines()[-1].count("|") == 8
    assert bench.plot({"meta": meta, "results": [], "attention_sweep": half}, tmp_path) == [tmp_path / "attention.png"]
    full = bench.attention_sweep(tiny_options(sweep_lengths=(16,)), log=lambda line: None)
    assert "kernel" not in full["rows"][0]
    table = bench.markdown_table({"meta": {**meta, "dtype": "fp32"}, "results": [], "attention_sweep": full})
    assert "kernel" not in table and table.splitlines()[-1].count("|") == 7
