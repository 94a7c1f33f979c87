"""The manual and SDPA attention paths compute the same function, values and gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minilm import CausalLM, MaskedLM, preset
from minilm.attention import (KVCache, apply_rope, build_keep_mask, causal_keep, manual_attention,
                              rope_tables, sdpa_attention)

TOL = 1e-5


def random_padding(B: int, S: int, gen: torch.Generator, fully_padded_row: bool) -> torch.Tensor:
    """(B, S) attention mask with right padding of random length; optionally row 0 all pad."""
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    if fully_padded_row:
        mask[0] = 0
    return mask


def both_paths(q, k, v, keep, is_causal):
    """Run both programs on leaf copies; return outputs and input gradients of each."""
    results = []
    for fn in (manual_attention, sdpa_attention):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, keep, is_causal)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, qq.grad, kk.grad, vv.grad))
    return results


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), nkv=st.sampled_from([1, 2, 4]), rep=st.sampled_from([1, 2, 3]),
       T=st.integers(1, 24), hs=st.sampled_from([4, 8, 16]), causal=st.booleans(),
       padded=st.booleans(), fully_padded=st.booleans(), rope=st.booleans(), seed=st.integers(0, 10_000))
def test_manual_and_sdpa_agree(B, nkv, rep, T, hs, causal, padded, fully_padded, rope, seed):
    gen = torch.Generator().manual_seed(seed)
    nh = nkv * rep
    q = torch.randn(B, nh, T, hs, generator=gen)
    k = torch.randn(B, nkv, T, hs, generator=gen)
    v = torch.randn(B, nkv, T, hs, generator=gen)
    if rope:
        cos, sin = rope_tables(T, hs)
        q, k = apply_rope(q, cos[None, None], sin[None, None]), apply_rope(k, cos[None, None], sin[None, None])
    if causal and not padded:       # what a causal LM's training batch takes: the flag, no mask tensor
        keep, is_causal = None, True
    else:
        attention_mask = random_padding(B, T, gen, fully_padded) if padded else None
        keep, is_causal = build_keep_mask(attention_mask, T, T, causal), False
    (out_m, *grads_m), (out_s, *grads_s) = both_paths(q, k, v, keep, is_causal=is_causal)
    assert torch.isfinite(out_m).all() and torch.isfinite(out_s).all()
    assert (out_m - out_s).abs().max() <= TOL
    for g_m, g_s in zip(grads_m, grads_s):
        # gradients reach |g| ~ 30: float32 rounding scales with them, so does the tolerance
        assert torch.isfinite(g_m).all() and (g_m - g_s).abs().max() <= TOL * max(1.0, g_s.abs().max().item())


def test_is_causal_flag_equals_explicit_mask():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=gen) for _ in range(3))
    explicit = manual_attention(q, k, v, causal_keep(9, 9)[None, None])
    for fn in (manual_attention, sdpa_attention):
        assert (fn(q, k, v, None, is_causal=True) - explicit).abs().max() <= TOL


def test_causal_mask_is_bottom_right_aligned_for_a_cache():
    keep = causal_keep(2, 5)
    assert keep.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_fully_padded_row_gives_zeros_not_nan():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    keep = build_keep_mask(torch.zeros(1, 4, dtype=torch.long), 4, 4, causal=True)
    for fn in (manual_attention, sdpa_attention):
        out = fn(q, k, v, keep)
        assert torch.equal(out, torch.zeros_like(out))  # no key visible -> nothing to mix


def test_rope_preserves_norm_and_depends_on_relative_position():
    cos, sin = rope_tables(32, 8)
    q, k = torch.randn(8), torch.randn(8)

    def rotated(x, pos):
        return apply_rope(x.view(1, 1, 1, 8), cos[pos].view(1, 1, 1, 8), sin[pos].view(1, 1, 1, 8)).flatten()

    assert torch.allclose(rotated(q, 5).norm(), q.norm(), atol=1e-6)
    assert torch.allclose(rotated(q, 3) @ rotated(k, 1), rotated(q, 12) @ rotated(k, 10), atol=1e-5)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name", ["bert-tiny", "gpt-mini", "llama-tiny"])
def test_model_paths_agree_with_gradients(name, padded):
    """Whole models: logits and every parameter gradient agree between the two paths, with
    padding (a mask tensor) and without (causal models then pass is_causal=True instead)."""
    torch.manual_seed(0)
    config = preset(name, vocab_size=97, max_seq_len=32, d_model=32, n_heads=4,
                    n_kv_heads=2 if name == "llama-tiny" else 4, d_ff=64, dropout=0.0, attn_dropout=0.0)
    model = (MaskedLM if name.startswith("bert") else CausalLM)(config)
    ids = torch.randint(5, 97, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2] = 0                                    # a fully padded row
    labels = ids.masked_fill(mask == 0, -100)
    if not padded:
        mask, labels = None, ids
    grads = {}
    for path in ("manual", "sdpa"):
        model.zero_grad()
        model(ids, mask, labels=labels, attention=path).loss.backward()
        logits = model(ids, mask, attention=path).logits.detach()
        grads[path] = (logits, {n: p.grad.clone() for n, p in model.named_parameters()})
    (logits_m, g_m), (logits_s, g_s) = grads["manual"], grads["sdpa"]
    assert torch.isfinite(logits_m).all()
    assert (logits_m - logits_s).abs().max() <= TOL
    for name_, g in g_m.items():
        assert (g - g_s[name_]).abs().max() <= TOL, name_


@pytest.mark.parametrize("left_padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", ["gpt-mini", "llama-tiny"])
@pytest.mark.parametrize("path", ["manual", "sdpa"])
def test_kv_cache_matches_full_forward(path, name, left_padded):
    """A prompt, a chunk of 3 tokens (its causal mask is bottom-right aligned to the cache),
    then one token at a time: the logits at every real position equal one full forward."""
    torch.manual_seed(0)
    config = preset(name, vocab_size=50, max_seq_len=32, d_model=32, n_heads=4,
                    n_kv_heads=2 if name == "llama-tiny" else 4, d_ff=48)
    model = CausalLM(config).eval()
    ids = torch.randint(1, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    if left_padded:
        mask[1, :3] = 0                                                  # row 1: three pads, then 7 tokens
    positions = (mask.cumsum(1) - 1).clamp(min=0)                        # each row's tokens count from 0
    full = model(ids, mask, position_ids=positions, attention=path).logits
    cache = KVCache(config, batch_size=2, max_len=16)
    pieces = []
    for start, end in [(0, 4), (4, 7), *((t, t + 1) for t in range(7, 10))]:
        pieces.append(model(ids[:, start:end], mask[:, :end], position_ids=positions[:, start:end], cache=cache,
                            attention=path).logits)
    assert cache.length == 10
    real = mask.bool()
    assert (torch.cat(pieces, dim=1)[real] - full[real]).abs().max() <= TOL


def test_kv_cache_overflow_is_an_error():
    config = preset("gpt-mini", vocab_size=50, max_seq_len=32, d_model=32, n_heads=4, d_ff=48)
    model, cache = CausalLM(config).eval(), KVCache(config, batch_size=1, max_len=5)
    model(torch.randint(0, 50, (1, 4)), cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 5 tokens; 6 requested"):
        model(torch.randint(0, 50, (1, 2)), cache=cache)


def test_training_dropout_on_cpu_runs_the_manual_program():
    """PyTorch has no fused CPU kernel with attention dropout; sdpa_attention then runs the
    manual program, so with the same random state both paths drop the same weights."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=gen) for _ in range(3))
    outs = []
    for fn in (manual_attention, sdpa_attention):
        torch.manual_seed(1)
        outs.append(fn(q, k, v, None, is_causal=True, dropout_p=0.3))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], manual_attention(q, k, v, None, is_causal=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
def test_half_precision_cpu_training_runs_the_kernel_in_float32(dtype, padded):
    """On CPU the fused kernel's half-precision backward is slow at short sequences, so a
    bf16/fp16 input that needs a gradient goes through the float32 kernel: the output is
    that kernel's, cast back, and the gradients match the float32 manual program's to the
    input precision. Without a gradient (inference) the half-precision kernel runs as is."""
    gen = torch.Generator().manual_seed(0)
    B, nh, nkv, T, hs = 3, 4, 2, 40, 16
    q32, k32, v32 = (torch.randn(B, n, T, hs, generator=gen) for n in (nh, nkv, nkv))
    keep = build_keep_mask(random_padding(B, T, gen, False), T, T, False) if padded else None
    is_causal = not padded
    q, k, v = (t.to(dtype).requires_grad_() for t in (q32, k32, v32))
    out = sdpa_attention(q, k, v, keep, is_causal)
    float_kernel = torch.nn.functional.scaled_dot_product_attention(
        q.detach().float(), k.detach().float(), v.detach().float(), attn_mask=keep, is_causal=is_causal,
        enable_gqa=True).to(dtype)
    assert out.dtype == dtype and torch.equal(out, float_kernel)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out.float() * weights).sum().backward()
    refs = [t.to(dtype).float().requires_grad_() for t in (q32, k32, v32)]
    (manual_attention(*refs, keep, is_causal) * weights).sum().backward()
    for half, ref in zip((q, k, v), refs):
        assert half.grad.dtype == dtype
        assert (half.grad.float() - ref.grad).abs().max() <= 2e-2 * ref.grad.abs().max()
    with torch.no_grad():
        inference = sdpa_attention(q.detach(), k.detach(), v.detach(), keep, is_causal)
    half_kernel = torch.nn.functional.scaled_dot_product_attention(
        q.detach(), k.detach(), v.detach(), attn_mask=keep, is_causal=is_causal, enable_gqa=True)
    assert torch.equal(inference, half_kernel)
