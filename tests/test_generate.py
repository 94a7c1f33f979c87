"""Tests for minilm/generate.py (KV cache, sampling, fill-mask) and the sample CLI.

The spec of the KV cache is the uncached program: greedy decoding with and without the
cache must agree token for token, for both model shapes (learned positions + MHA, and
RoPE + grouped-query attention), for both attention programs, and for batches of
left-padded prompts. Those parity tests run the tiny random models in float64: a random
model's logits are nearly tied, and argmax would turn float32 rounding differences
between two correct programs into different tokens.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from minilm import CausalLM, MaskedLM, preset
from minilm.checkpoint import save_model_dir
from minilm.config import ATTENTIONS
from minilm.errors import MinilmError
from minilm.generate import (apply_temperature, fill_in, fill_mask, generate, positions_from_mask,
                             sample_next_token, token_text, top_k_filter, top_p_filter)
from minilm.sample import main
from tokenizer import Tokenizer

VOCAB = 97
TINY = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=48)
SHAPES = {
    "gpt": preset("gpt-mini", **TINY),                               # learned positions, MHA
    "llama": preset("llama-tiny", **TINY, n_kv_heads=2),             # RoPE, GQA, SwiGLU, RMSNorm
}


def tiny_causal(shape: str, attention: str = "sdpa", dtype: torch.dtype = torch.float64,
                **overrides) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(SHAPES[shape].replace(attention=attention, **overrides)).to(dtype)


def random_prompt(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(7, VOCAB, (1, length), generator=generator)


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (1, T_i) prompts into (B, max T) ids and mask, padded on the left."""
    width = max(p.size(1) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.size(1):] = prompt[0]
        mask[row, width - prompt.size(1):] = 1
    return ids, mask


# --------------------------------------------------------------------------------------
# the KV cache computes the same function as re-encoding everything
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("shape", ["gpt", "llama"])
def test_cached_greedy_equals_uncached(shape, attention):
    model = tiny_causal(shape, attention)
    prompt = random_prompt(6, seed=1)
    cached = generate(model, prompt, max_new_tokens=25, greedy=True, use_cache=True)
    uncached = generate(model, prompt, max_new_tokens=25, greedy=True, use_cache=False)
    assert cached.shape == (1, 31)
    assert torch.equal(cached[:, :6], prompt)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("shape", ["gpt", "llama"])
def test_left_padded_batch_matches_each_prompt_alone(shape, attention):
    model = tiny_causal(shape, attention)
    prompts = [random_prompt(n, seed=n) for n in (3, 8, 5)]
    ids, mask = left_pad(prompts)
    new = 12
    cached = generate(model, ids, attention_mask=mask, max_new_tokens=new, greedy=True)
    uncached = generate(model, ids, attention_mask=mask, max_new_tokens=new, greedy=True, use_cache=False)
    assert torch.equal(cached, uncached)
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt, max_new_tokens=new, greedy=True)
        assert torch.equal(cached[row, -new:], alone[0, -new:]), f"row {row} differs from its prompt alone"


def test_positions_from_mask_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("shape", ["gpt", "llama"])
def test_beyond_max_seq_len_slides_the_window(shape):
    model = tiny_causal(shape, max_seq_len=12)
    max_len = model.config.max_seq_len
    prompt = random_prompt(5, seed=2)
    fed = []        # how many tokens each forward pass reads
    model.transformer.register_forward_hook(lambda module, args, out: fed.append(args[0].size(1)))
    # the cache serves while the sequence fits (prefill 5, then one token at a time up to 12 in
    # all); it cannot slide, so from there each step re-encodes the last 12
    cached = generate(model, prompt, max_new_tokens=max_len, greedy=True, use_cache=True)
    assert fed == [5] + [1] * 7 + [max_len] * (max_len - 8)
    uncached = generate(model, prompt, max_new_tokens=max_len, greedy=True, use_cache=False)
    assert cached.shape == (1, 5 + max_len)
    assert torch.equal(cached, uncached)
    fed.clear()                 # exactly filling the context: the last sampled token is never fed
    generate(model, prompt, max_new_tokens=max_len - 5 + 1, greedy=True, use_cache=True)
    assert fed == [5] + [1] * (max_len - 5)
    # the last token is predicted from the last max_len tokens alone, renumbered from 0
    window = cached[:, -max_len - 1:-1]
    assert torch.equal(generate(model, window, max_new_tokens=1, greedy=True)[0, -1], cached[0, -1])


def test_prompt_longer_than_max_seq_len_is_cropped():
    """The model reads the prompt's last max_seq_len tokens; the output keeps the whole prompt."""
    model = tiny_causal("gpt", max_seq_len=12)
    prompt = random_prompt(model.config.max_seq_len + 5, seed=3)
    out = generate(model, prompt, max_new_tokens=3, greedy=True)
    assert out.shape == (1, model.config.max_seq_len + 8) and torch.equal(out[:, :17], prompt)
    assert torch.equal(out[0, -3:], generate(model, prompt[:, -12:], max_new_tokens=3, greedy=True)[0, -3:])


def test_generate_restores_training_mode_and_needs_no_grad():
    model = tiny_causal("gpt", dtype=torch.float32)
    model.train()
    out = generate(model, random_prompt(4, seed=0), max_new_tokens=3)
    assert model.training and not out.requires_grad
    model.eval()
    generate(model, random_prompt(4, seed=0), max_new_tokens=3)
    assert not model.training


def test_right_padding_is_refused():
    model = tiny_causal("gpt", dtype=torch.float32)
    ids, mask = torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, ids, attention_mask=mask, max_new_tokens=2)


def test_ids_outside_the_vocabulary_are_refused_by_name():
    model = tiny_causal("gpt", dtype=torch.float32)
    vocab = model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=rf"token ids in \[0, {vocab}\), got"):
            generate(model, torch.tensor([[1, bad]]), max_new_tokens=1)


# --------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible():
    model = tiny_causal("llama", dtype=torch.float32)
    prompt = random_prompt(4, seed=0).repeat(3, 1)

    def draw(seed: int) -> torch.Tensor:
        return generate(model, prompt, max_new_tokens=20, temperature=1.5,
                        generator=torch.Generator().manual_seed(seed))

    first, again, other = draw(0), draw(0), draw(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # rows of one batch draw independently


def test_top_k_1_and_temperature_0_are_greedy():
    model = tiny_causal("gpt", dtype=torch.float32)
    prompt = random_prompt(5, seed=4)
    greedy = generate(model, prompt, max_new_tokens=15, greedy=True)
    top1 = generate(model, prompt, max_new_tokens=15, top_k=1, temperature=2.0,
                    generator=torch.Generator().manual_seed(0))
    cold = generate(model, prompt, max_new_tokens=15, temperature=0.0)
    assert torch.equal(top1, greedy)
    assert torch.equal(cold, greedy)


def test_top_k_filter_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]
    assert torch.equal(kept[torch.isfinite(kept)], torch.tensor([5.0, 4.0]))
    assert torch.equal(top_k_filter(logits, 10), logits)


@pytest.mark.parametrize("p, expected", [
    (0.05, {2}),             # the top token is always kept
    (0.45, {2}),             # 0.5 alone reaches it
    (0.55, {2, 0}),          # 0.5 + 0.3
    (0.79, {2, 0}),
    (0.85, {2, 0, 3}),       # 0.5 + 0.3 + 0.15
    (0.97, {2, 0, 3, 1}),
    (1.00, {2, 0, 3, 1}),
])
def test_top_p_filter_keeps_the_smallest_nucleus(p, expected):
    probs = torch.tensor([0.3, 0.05, 0.5, 0.15], dtype=torch.float64)   # deliberately unsorted
    kept = top_p_filter(probs.log()[None], p)[0]
    assert set(torch.isfinite(kept).nonzero().flatten().tolist()) == expected
    survivors = torch.isfinite(kept)
    assert torch.equal(kept[survivors], probs.log()[survivors])        # logits unchanged


def test_top_p_sampling_draws_only_from_the_nucleus():
    logits = torch.tensor([[0.3, 0.05, 0.5, 0.15]]).log().repeat(2000, 1)
    drawn = sample_next_token(logits, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 2}
    share_of_top = (drawn == 2).float().mean().item()
    assert abs(share_of_top - 0.5 / 0.8) < 0.04                         # renormalised: 0.625


def test_lower_temperature_is_sharper():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 2

    def entropy(temperature: float) -> torch.Tensor:
        probs = apply_temperature(logits, temperature).softmax(-1)
        return -(probs * probs.log()).sum(-1)

    assert (entropy(0.5) < entropy(1.0)).all()
    assert (entropy(1.0) < entropy(2.0)).all()
    # a tiny temperature is (nearly) greedy, never NaN: logits / 1e-45 alone would be inf - inf
    assert torch.equal(sample_next_token(logits, temperature=1e-45), logits.argmax(-1))


@pytest.mark.parametrize("bad, message", [(dict(temperature=-1.0), "temperature"), (dict(temperature=math.nan),
                                          "temperature"), (dict(top_k=0), "top_k"),
                                          (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_options_are_user_errors(bad, message):
    model = tiny_causal("gpt", dtype=torch.float32)
    with pytest.raises(MinilmError, match=message):
        generate(model, random_prompt(3, seed=0), max_new_tokens=2, **bad)


# --------------------------------------------------------------------------------------
# end of sequence
# --------------------------------------------------------------------------------------
def test_eos_stops_generation():
    model = tiny_causal("llama")
    prompt = random_prompt(5, seed=5)
    free = generate(model, prompt, max_new_tokens=20, greedy=True)[0, 5:].tolist()
    eos = free[3]
    stop = free.index(eos)                          # first time the greedy path emits it
    out = generate(model, prompt, max_new_tokens=20, greedy=True, eos_id=eos)
    assert out[0, 5:].tolist() == free[:stop + 1]   # ends with the eos itself


def test_finished_rows_are_padded_while_others_continue():
    model = tiny_causal("llama")
    prompts = [random_prompt(5, seed=5), random_prompt(5, seed=6)]
    ids, mask = left_pad(prompts)
    free = generate(model, ids, attention_mask=mask, max_new_tokens=20, greedy=True)[:, 5:]
    eos = next(t for t in free[0].tolist() if t not in free[1].tolist())  # row 1 never emits it
    stop = free[0].tolist().index(eos)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=20, greedy=True, eos_id=eos)[:, 5:]
    assert out.shape == (2, 20)
    assert out[0, :stop + 1].tolist() == free[0, :stop + 1].tolist()
    assert (out[0, stop + 1:] == model.config.pad_token_id).all()
    assert torch.equal(out[1], free[1])


# --------------------------------------------------------------------------------------
# fill-mask and the sample CLI, with a tiny trained tokenizer
# --------------------------------------------------------------------------------------
WORDS = "the cat dog sat ran on a mat rug big small red blue and then".split()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(500)]
    return Tokenizer.train(texts, vocab_size=300)


def tiny_config(tok: Tokenizer, shape: str):
    return preset(shape, vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                  max_seq_len=64, **({"n_kv_heads": 1} if shape == "llama-tiny" else {}))


def test_fill_mask_returns_sorted_top_k(tok):
    torch.manual_seed(0)
    model = MaskedLM(tiny_config(tok, "bert-tiny"))
    result = fill_mask(model, tok, "the [MASK] sat on the [MASK] mat", top_k=4)
    assert len(result) == 2                                             # one list per [MASK]
    for candidates in result:
        assert len(candidates) == 4
        probs = [p for _, p in candidates]
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 < p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-6
        assert all(isinstance(token, str) for token, _ in candidates)
    assert model.training                                               # mode restored
    # the model's own top 4: the full forward over the same input, softmax at the [MASK]s over
    # the ordinary tokens (special tokens are never MLM targets)
    seen = []
    model.transformer.register_forward_hook(lambda module, args, kwargs, out: seen.append((args[0], kwargs)),
                                            with_kwargs=True)
    result = fill_mask(model, tok, "the [MASK] sat on the [MASK] mat", top_k=4)
    ids, kwargs = seen[-1]
    with torch.no_grad():
        model.eval()
        logits = model(ids, token_type_ids=kwargs["token_type_ids"]).logits[0, ids[0] == tok.mask_id]
    logits[:, sorted(tok.special_ids)] = float("-inf")
    expected = logits.softmax(-1).topk(4)
    # asked for more than there are: every ordinary token once, and no special one
    all_tokens = fill_mask(model, tok, "the [MASK] sat", top_k=10 * tok.vocab_size)[0]
    assert len(all_tokens) == tok.vocab_size - len(set(tok.special_ids))
    assert sum(p for _, p in all_tokens) == pytest.approx(1.0, abs=1e-5)
    assert not {token_text(tok, i) for i in tok.special_ids} & {token for token, _ in all_tokens}
    for candidates, values, indices in zip(result, expected.values, expected.indices):
        assert [p for _, p in candidates] == pytest.approx(values.tolist(), abs=1e-5)
        assert [token for token, _ in candidates] == [token_text(tok, i) for i in indices.tolist()]


def test_fill_mask_hides_a_whole_word_with_its_leading_space(tok):
    """'the [MASK] sat': the model reads [CLS] the [MASK] ▁sat [SEP], as in training, where
    [MASK] replaced a token like '▁cat' with its space, not [CLS] the ▁ [MASK] ▁sat [SEP]."""
    model = MaskedLM(tiny_config(tok, "bert-tiny"))
    seen = []
    model.transformer.register_forward_hook(lambda module, args, out: seen.append(args[0][0].tolist()))
    fill_mask(model, tok, "the [MASK] sat", top_k=1)
    assert seen == [[tok.cls_id, *tok.encode("the"), tok.mask_id, *tok.encode(" sat"), tok.sep_id]]


@pytest.mark.parametrize("text, fills, expected", [
    ("[MASK] cat sat on the [MASK].", [" The", " mat"], "The cat sat on the mat."),   # by position
    ("the[MASK].", [" mat"], "the mat."),
    ("a [MASK] and a [MASK]", [" cat", " dog"], "a cat and a dog"),
    ("[MASK][MASK]", ["ab", "cd"], "abcd"),
    # a fill without a leading space (punctuation) attaches directly: the model read no space there
    ("The cat [MASK]", ["."], "The cat."),
    ("[MASK] cat sat on the [MASK]", [" The", "."], "The cat sat on the."),
])
def test_fill_in_puts_each_fill_at_its_own_mask(text, fills, expected):
    assert fill_in(text, fills) == expected


def test_fill_mask_without_mask_is_a_user_error(tok):
    model = MaskedLM(tiny_config(tok, "bert-tiny"))
    with pytest.raises(MinilmError, match=r"no \[MASK\]"):
        fill_mask(model, tok, "the cat sat")


def make_run_dir(path, model, tok):
    save_model_dir(model, path)
    tok.save(path / "tokenizer")
    return path


def test_sample_cli_causal(tmp_path, tok, capsys):
    torch.manual_seed(0)
    run = make_run_dir(tmp_path / "gpt", CausalLM(tiny_config(tok, "gpt-mini")), tok)
    code = main([str(run), "--prompt", "the cat", "--max-new-tokens", "8", "--num-samples", "2",
                 "--device", "cpu", "--seed", "1"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.count("--- sample") == 2
    assert [line for line in out.splitlines() if not line.startswith("---")][0].startswith("the cat")
    assert "causal LM" in err
    # same seed, same text; greedy works too
    assert main([str(run), "--prompt", "the cat", "--max-new-tokens", "8", "--num-samples", "2",
                 "--device", "cpu", "--seed", "1"]) == 0
    assert capsys.readouterr().out == out
    assert main([str(run), "--prompt", "", "--greedy", "--no-cache", "--max-new-tokens", "5"]) == 0


def test_sample_cli_masked(tmp_path, tok, capsys):
    torch.manual_seed(0)
    run = make_run_dir(tmp_path / "bert", MaskedLM(tiny_config(tok, "bert-tiny")), tok)
    assert json.loads((run / "config.json").read_text())["head"] == "mlm"
    code = main([str(run), "--prompt", "the [MASK] sat", "--num-candidates", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == "[MASK] 1"
    assert "probability" in out and out.count("\n") == 1 + 1 + 3 + 1     # title, header, 3 rows, best
    assert out.splitlines()[-1].startswith("best: the")
    # a causal LM's flags mean nothing to a masked LM, and the other way round: one line, not ignored
    assert main([str(run), "--prompt", "the [MASK] sat", "--temperature", "0.5", "--no-cache"]) == 2
    assert "--no-cache, --temperature: not read by a masked LM" in capsys.readouterr().err
    gpt = make_run_dir(tmp_path / "gpt", CausalLM(tiny_config(tok, "gpt-mini")), tok)
    assert main([str(gpt), "--prompt", "the", "--num-candidates", "3"]) == 2
    assert "--num-candidates: not read by a causal LM" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "not found"),
    (["{file}"], "is a file, not a run directory"),
    (["{damaged}"], "model.safetensors is damaged: not a complete safetensors file"),
    (["{run}", "--top-p", "1.5"], "top_p"),
    (["{run}", "--temperature", "-1"], "temperature"),
    (["{run}", "--num-samples", "0"], "--num-samples"),
    (["{run}", "--max-new-tokens", "many"], "invalid int"),
    (["{run}", "--no-such-flag"], "unrecognized"),
    (["{run}", "--device", "cuda:x"], "--device"),
    (["{run}", "--prompt", "ab\udcffcd"], "--prompt is not valid UTF-8"),     # how argv carries a stray byte
])
def test_sample_cli_user_errors_are_one_line(tmp_path, tok, capsys, argv, message):
    run = make_run_dir(tmp_path / "gpt", CausalLM(tiny_config(tok, "gpt-mini")), tok)
    damaged = make_run_dir(tmp_path / "damaged", CausalLM(tiny_config(tok, "gpt-mini")), tok)
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:1000])
    (tmp_path / "file").write_text("not a run\n")
    argv = [a.format(missing=tmp_path / "nope", run=run, file=tmp_path / "file", damaged=damaged) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_sample_cli_mlm_prompt_without_mask(tmp_path, tok, capsys):
    run = make_run_dir(tmp_path / "bert", MaskedLM(tiny_config(tok, "bert-tiny")), tok)
    assert main([str(run), "--prompt", "the cat sat"]) == 2
    assert "[MASK]" in capsys.readouterr().err
