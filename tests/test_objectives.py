"""Tests for minilm.objectives: BERT masking statistics, summed NLL, bits per character."""

from __future__ import annotations

import math
import platform

import pytest
import torch

from minilm.objectives import (IGNORE_INDEX, bits_per_char, choose_whole_words, mask_tokens, matmul_t, perplexity,
                               replace_with_samples, shift_for_clm, summed_nll)

VOCAB = 1000
SPECIALS = {0, 1, 2, 3, 4, 5, 6}  # [PAD] [UNK] [CLS] [SEP] [MASK] <s> </s>
PAD, CLS, SEP, MASK = 0, 2, 3, 4


def make_batch(batch: int = 256, length: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] random ordinary tokens [SEP] [PAD]..., with a random real length per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, VOCAB, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    positions = torch.arange(length)
    attention = (positions[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[attention == 0] = PAD
    return ids, attention


def run_masking(ids: torch.Tensor, attention: torch.Tensor | None, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(ids, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS, attention_mask=attention, generator=g)


def test_masking_statistics_follow_bert_recipe() -> None:
    ids, attention = make_batch()
    masked, labels = run_masking(ids, attention)
    maskable = (attention == 1) & (ids > 6)
    chosen = labels != IGNORE_INDEX

    n_chosen = int(chosen.sum())
    share = n_chosen / int(maskable.sum())
    assert abs(share - 0.15) < 0.005  # ~ 100k maskable positions: sd of the share ~ 0.001

    as_mask = int((masked[chosen] == MASK).sum()) / n_chosen
    unchanged = int((masked[chosen] == ids[chosen]).sum()) / n_chosen
    # Random replacements can equal the original by chance (1 in ~1000): they count as unchanged.
    replaced = int(((masked[chosen] != MASK) & (masked[chosen] != ids[chosen])).sum()) / n_chosen
    assert abs(as_mask - 0.8) < 0.01
    assert abs(unchanged - 0.1) < 0.01
    assert abs(replaced - 0.1) < 0.01


def test_labels_hold_original_ids_and_unchosen_inputs_are_untouched() -> None:
    ids, attention = make_batch(batch=32, length=128)
    masked, labels = run_masking(ids, attention)
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert masked.dtype == labels.dtype == torch.int64
    assert masked.shape == labels.shape == ids.shape


def test_specials_and_padding_never_masked_and_never_drawn() -> None:
    ids, attention = make_batch(batch=64, length=256)
    masked, labels = run_masking(ids, attention)
    special = torch.isin(ids, torch.tensor(sorted(SPECIALS)))
    assert (labels[special] == IGNORE_INDEX).all()
    assert torch.equal(masked[special], ids[special])
    # Random replacements come from the ordinary vocabulary only.
    chosen = labels != IGNORE_INDEX
    replaced = chosen & (masked != MASK)
    assert (masked[replaced] > 6).all()
    assert (masked < VOCAB).all()


def test_attention_mask_excludes_positions_even_without_pad_ids() -> None:
    ids, _ = make_batch(batch=16, length=64)
    ids = torch.randint(7, VOCAB, ids.shape)
    attention = torch.zeros_like(ids)
    attention[:, :10] = 1
    _, labels = run_masking(ids, attention)
    assert (labels[:, 10:] == IGNORE_INDEX).all()


def test_masking_is_reproducible_with_a_generator() -> None:
    ids, attention = make_batch(batch=8, length=64)
    first = run_masking(ids, attention, seed=5)
    second = run_masking(ids, attention, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def word_start_table(seed: int = 0) -> torch.Tensor:
    """A vocabulary where about a third of the ordinary ids continue a word."""
    starts = torch.rand(VOCAB, generator=torch.Generator().manual_seed(seed)) > 0.35
    starts[sorted(SPECIALS)] = True
    return starts


def test_whole_word_masking_chooses_every_piece_of_a_word_together() -> None:
    ids, attention = make_batch(batch=64, length=256)
    starts = word_start_table()
    g = torch.Generator().manual_seed(3)
    masked, labels = mask_tokens(ids, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                                 attention_mask=attention, word_starts=starts, generator=g)
    chosen = labels != IGNORE_INDEX
    maskable = (attention == 1) & (ids > 6)
    # A piece that continues a word is chosen exactly when the piece before it is.
    continues = ~starts[ids[:, 1:]] & maskable[:, 1:] & maskable[:, :-1]
    assert continues.sum() > 1000
    assert torch.equal(chosen[:, 1:][continues], chosen[:, :-1][continues])
    # Words, not pieces, are chosen at mask_prob: count word starts among the chosen.
    word_start = starts[ids] & maskable
    share = int((chosen & word_start).sum()) / int(word_start.sum())
    assert abs(share - 0.15) < 0.01
    # Specials and padding still never chosen; labels still hold the originals.
    assert not chosen[~maskable].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_whole_words_never_span_two_rows() -> None:
    """A row that opens with a continuation piece starts a word of its own: the draw for
    the last word of the row above must not decide it."""
    starts = torch.tensor([True] * 7 + [True, False])         # id 8 continues a word
    ids = torch.tensor([[7, 8, 8], [8, 8, 7]])
    hits = torch.stack([choose_whole_words(ids, starts, 0.5, torch.Generator().manual_seed(s))
                        for s in range(200)])                 # (200, 2, 3)
    assert (hits[:, 0, 0] == hits[:, 0, 2]).all() and (hits[:, 1, 0] == hits[:, 1, 1]).all()
    assert (hits[:, 0, 0] != hits[:, 1, 0]).any()              # the two rows' first words are drawn apart


def test_shift_for_clm_targets_the_next_real_token() -> None:
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert shift_for_clm(ids).tolist() == [[11, 12, 13, -100], [21, 0, 0, -100]]
    assert shift_for_clm(ids, attention).tolist() == [[11, 12, 13, -100], [21, -100, -100, -100]]


def test_summed_nll_matches_manual_sum_and_count() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = IGNORE_INDEX
    labels[1, 4] = IGNORE_INDEX
    total, count = summed_nll(logits, labels)
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = sum(
        -log_probs[b, t, labels[b, t]].item()
        for b in range(2) for t in range(5) if labels[b, t] != IGNORE_INDEX
    )
    assert count == 8
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_bits_per_char_and_perplexity_arithmetic() -> None:
    # 1000 characters coded in 1000 * ln 2 nats = exactly 1 bit per character.
    assert bits_per_char(1000 * math.log(2), 1000) == pytest.approx(1.0)
    # nanoGPT's reference: 1.886 nats per character = 2.72 bits per character.
    assert bits_per_char(1.886 * 5000, 5000) == pytest.approx(2.721, abs=1e-3)
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError):
        bits_per_char(1.0, 0)


def test_replace_with_samples_changes_only_chosen_positions() -> None:
    ids, attention = make_batch(batch=8, length=64)
    masked, labels = run_masking(ids, attention)
    chosen = labels != IGNORE_INDEX
    logits = torch.randn(int(chosen.sum()), VOCAB, requires_grad=True)
    corrupted, replaced = replace_with_samples(masked, labels, logits, torch.Generator().manual_seed(0))
    assert torch.equal(corrupted[~chosen], ids[~chosen])          # the original text elsewhere
    assert torch.equal(replaced, corrupted != ids)                 # flags compare with the original
    assert not replaced[~chosen].any() and replaced[chosen].float().mean() > 0.9  # near-uniform samples
    again, _ = replace_with_samples(masked, labels, logits, torch.Generator().manual_seed(0))
    assert torch.equal(again, corrupted)                           # reproducible with a generator
    assert not corrupted.requires_grad


def test_a_sample_equal_to_the_original_counts_as_original() -> None:
    """A generator certain of the original token replaces nothing: every flag is 0."""
    ids, attention = make_batch(batch=4, length=32)
    masked, labels = run_masking(ids, attention)
    targets = labels[labels != IGNORE_INDEX]
    logits = torch.full((len(targets), VOCAB), -1e4)
    logits[torch.arange(len(targets)), targets] = 0.0
    corrupted, replaced = replace_with_samples(masked, labels, logits)
    assert torch.equal(corrupted, ids) and not replaced.any()


def test_matmul_t_probe_works_under_autocast_and_leaves_the_rng_alone():
    """The first call may come inside bf16 autocast (train.py's default on a CPU with bf16):
    the probe must still run in float32, and must not draw from the global RNG."""
    from minilm.objectives import _onednn_linear_available
    _onednn_linear_available.cache_clear()
    a, b = torch.randn(4, 8), torch.randn(6, 8)
    state = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = matmul_t(a, b)
        available = _onednn_linear_available()
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), a @ b.t(), atol=0.1)
    assert torch.equal(torch.get_rng_state(), state)
    assert available == (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                         and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def test_matmul_t_is_a_times_b_transposed():
    """objectives.matmul_t (oneDNN on an x86 CPU) computes a @ bᵀ to float rounding, for
    contiguous and transposed operands, zero rows, and a weight changed in place between
    calls (nothing may be cached from the first call); a tensor that wants a gradient
    gets plain autograd matmul."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 64, generator=gen), torch.randn(50, 64, generator=gen)
    for x, y in ((a, b), (a, b.t().contiguous().t()), (a.t().contiguous().t(), b), (a[:0], b), (a[::2], b)):
        assert torch.allclose(matmul_t(x, y), x @ y.t(), atol=1e-5)
    b.add_(1.0)
    assert torch.allclose(matmul_t(a, b), a @ b.t(), atol=1e-4)
    w = b.clone().requires_grad_()
    out = matmul_t(a, w)
    assert out.requires_grad
    out.sum().backward()
    assert torch.allclose(w.grad, a.sum(0).expand_as(w), atol=1e-4)
