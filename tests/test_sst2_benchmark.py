"""benchmarks/sst2.py's results table: one row per (model, training set), mean ± sample sd over seeds.
(The benchmark itself needs ../shared/data, which no test may; its table logic needs nothing.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sst2.py"


@pytest.fixture(scope="module")
def sst2():
    spec = importlib.util.spec_from_file_location("sst2_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(kind: str, train_set: str, seed: int, accuracy: float) -> dict:
    return {"kind": kind, "train_set": train_set, "seed": seed, "val_accuracy": accuracy,
            "val_macro_f1": accuracy - 0.01, "steps": 100, "epochs": 2.0,
            "final_weights": {"val_accuracy": accuracy - 0.02}}


def test_table_rows_means_and_spreads(sst2):
    args = sst2.parse_args(["data"])
    results = {"times": {"pretrain": 1218.0, "pretrained-few-seed0": 40.0, "pretrained-few-seed1": 44.0},
               "tfidf": {"val_accuracy": 0.786, "train_rows": 60904, "seconds": 1.0},
               "tfidf-few": {"val_accuracy": 0.668, "train_rows": 2000, "seconds": 0.2},
               "pretrain": {"val_mlm_acc": 0.315},
               "pretrained-few-seed0": run("pretrained", "few", 0, 0.70),
               "pretrained-few-seed1": run("pretrained", "few", 1, 0.74),
               "scratch-few-seed0": run("scratch", "few", 0, 0.64),
               "scratch-own-few-seed0": run("scratch-own", "few", 0, 0.66),
               "pretrained-all-seed0": run("pretrained", "all", 0, 0.79)}
    lines = sst2.markdown_table(results, {"all": 60904, "few": 2000}, args).splitlines()
    assert lines[2].startswith("| TF-IDF") and "| 60,904 | 78.6% |" in lines[2]
    assert lines[3].startswith("| TF-IDF") and "| 2,000 | 66.8% |" in lines[3]
    body = lines[4:]
    # order: pretrained (all, few), scratch, scratch with its own flags; one row each
    assert [("2,000" in line, "own flags" in line) for line in body] == [
        (False, False), (True, False), (True, False), (True, True)]
    assert "MLM-pretrained for 20:18 (masked-token accuracy 31.5%)" in body[0]
    # two seeds: mean ± sample standard deviation (0.028...) and each run; mean wall-clock "each"
    assert "72.0% ± 2.8% (2 seeds: 70.0%, 74.0%) | 70.0% |" in body[1] and "0:42 each" in body[1]
    assert "| 64.0% |" in body[2]
    assert args.scratch_few_args in body[3] and "| 66.0% |" in body[3]


def test_many_seeds_give_ranges_not_lists(sst2):
    results = {"times": {}, **{f"pretrained-few-seed{s}": {**run("pretrained", "few", s, 0.60 + 0.01 * s),
                                                           "steps": 100 + 10 * s, "epochs": 2.0 + s}
                               for s in range(8)}}
    row = sst2.markdown_table(results, {"all": 10, "few": 5}, sst2.parse_args(["data"])).splitlines()[2]
    assert "63.5% ± 2.4% (8 seeds) |" in row and "| 100–170 (2–9) |" in row


def test_several_pretraining_runs_pool_into_one_row_with_each_runs_mean(sst2):
    """--pretrain-seeds 2: finetunes on the second pretraining run carry pretrain_seed; the
    pretrained row pools both runs and gives each one's mean (old results have no field)."""
    args = sst2.parse_args(["data", "--pretrain-seeds", "2"])
    results = {"times": {},
               "pretrained-few-seed0": run("pretrained", "few", 0, 0.72),
               "pretrained-few-seed1": run("pretrained", "few", 1, 0.74),
               "pretrained-p1-few-seed0": {**run("pretrained", "few", 0, 0.68), "pretrain_seed": 1},
               "pretrained-p1-few-seed1": {**run("pretrained", "few", 1, 0.70), "pretrain_seed": 1},
               "scratch-few-seed0": run("scratch", "few", 0, 0.66)}
    body = sst2.markdown_table(results, {"all": 10, "few": 5}, args).splitlines()[2:]
    assert len(body) == 2
    assert "71.0% ± 2.6% (4 runs: 72.0%, 74.0%, 68.0%, 70.0%); per pretraining seed 0: 73.0%, 1: 69.0% |" in body[0]
    assert "per pretraining" not in body[1] and "| 66.0% |" in body[1]


def test_few_label_flags_come_last_and_reach_the_stricter_scratch_row(sst2):
    args = sst2.parse_args(["data"])
    assert "--lr 5e-4" in " ".join(sst2.minilm_flags(args, "pretrained", "all"))
    assert "--lr 1e-3" not in " ".join(sst2.minilm_flags(args, "scratch", "all"))
    for kind in ("pretrained", "scratch", "scratch-own"):
        flags = sst2.minilm_flags(args, kind, "few")
        assert flags[-2:] == ["--lr", "1e-3"], kind         # last, so finetune.py's argparse takes it
    assert "--layer-lr-decay" in sst2.minilm_flags(args, "scratch", "few")
    assert "--layer-lr-decay" not in sst2.minilm_flags(args, "scratch-own", "few")
    assert sst2.minilm_flags(sst2.parse_args(["data", "--few-args", ""]), "pretrained", "few") == \
        sst2.minilm_flags(args, "pretrained", "all")


def fake_run(run_dir: Path, *flags: str) -> list[str]:
    """A command that makes run_dir with a summary.json, as train.py and finetune.py do."""
    script = ("import json, os, sys; os.makedirs(sys.argv[1]); "
              "json.dump({'val_accuracy': 0.5}, open(os.path.join(sys.argv[1], 'summary.json'), 'w'))")
    return [sys.executable, "-c", script, str(run_dir), *flags]


def test_a_finished_run_is_reused_only_with_the_same_arguments(sst2, tmp_path, capsys):
    results = {"times": {}}
    run_dir = tmp_path / "pretrained-few-seed0"
    assert sst2.reuse_or_run("r", run_dir, fake_run(run_dir, "--lr", "5e-4"), tmp_path / "logs", results) == \
        {"val_accuracy": 0.5}
    assert "r" in results["times"] and results["commands"]["r"][-3:] == ["{out}/pretrained-few-seed0", "--lr", "5e-4"]
    # the same arguments: reused, not run again (the command would fail: the directory exists)
    sst2.reuse_or_run("r", run_dir, fake_run(run_dir, "--lr", "5e-4"), tmp_path / "logs", results)
    assert "reusing" in capsys.readouterr().out
    # a changed flag: refused, with what changed
    with pytest.raises(SystemExit) as refused:
        sst2.reuse_or_run("r", run_dir, fake_run(run_dir, "--lr", "1e-3"), tmp_path / "logs", results)
    assert "other arguments (--lr 5e-4 -> --lr 1e-3)" in str(refused.value) and "delete it" in str(refused.value)
    # a work directory moved elsewhere still matches (paths inside it are recorded as {out})
    again = tmp_path / "elsewhere" / "pretrained-few-seed0"
    again.parent.mkdir()
    run_dir.rename(again)
    sst2.reuse_or_run("r", again, fake_run(again, "--lr", "5e-4"), tmp_path / "logs", results)
    # a run from before the record: reused, with a note, and not recorded under the new flags
    del results["commands"]["r"]
    sst2.reuse_or_run("r", again, fake_run(again, "--lr", "1e-3"), tmp_path / "logs", results)
    assert "not recorded" in capsys.readouterr().out and "r" not in results["commands"]
