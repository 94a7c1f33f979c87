"""The model's contract: config round-trip, shapes, masks, heads, losses, init, sizes."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from minilm import PRESETS, CausalLM, MaskedLM, ModelConfig, SequenceClassifier, preset
from minilm.attention import build_keep_mask
from minilm.checkpoint import load_model_dir, save_model_dir, save_state
from minilm.config import ATTENTIONS, POOLINGS, choice_fields
from minilm.errors import MinilmError
from minilm.model import ReplacedTokenDetection, pool
from minilm.objectives import RTD_WEIGHT, linear_cross_entropy, mask_tokens, replace_with_samples


def tiny(name: str, **overrides) -> ModelConfig:
    base = dict(vocab_size=61, max_seq_len=32, d_model=32, n_heads=4, d_ff=64, dropout=0.0, attn_dropout=0.0)
    if name == "llama-tiny":
        base["n_kv_heads"] = 2
    return preset(name, **{**base, **overrides})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name, tmp_path):
    config = PRESETS[name]
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="flash")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("bert-huge")
    with pytest.raises(ValueError, match="unknown config fields"):
        ModelConfig.from_dict({"d_modle": 3})


CHOICE_FIELDS = choice_fields(ModelConfig)


@pytest.mark.parametrize("name", sorted(CHOICE_FIELDS))
def test_config_choice_fields_take_only_their_listed_values(name):
    """Each field typed as a Literal accepts every value its type lists and nothing else."""
    assert set(CHOICE_FIELDS) == {"norm", "norm_position", "mlp", "position", "attention", "pooling"}
    for value in CHOICE_FIELDS[name]:
        assert getattr(ModelConfig(**{name: value}), name) == value
    with pytest.raises(ValueError, match=f"{name}='nonsense'; choose one of"):
        ModelConfig(**{name: "nonsense"})


@pytest.mark.parametrize("field, value, message", [
    ("n_heads", 0, "n_heads=0 must be > 0"), ("d_model", -8, "d_model=-8 must be > 0"),
    ("dropout", 1.5, r"dropout=1.5 must be in \[0, 1\)"), ("attn_dropout", -0.1, "attn_dropout=-0.1 must be")])
def test_config_rejects_sizes_and_rates_out_of_range(field, value, message):
    """Named in one line, before a division by zero or a torch error deep in a constructor."""
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{field: value})


def test_gpt2_small_has_gpt2_parameter_count():
    # GPT-2 124M as released: 124,439,808 parameters with the tied LM head
    with torch.device("meta"):
        model = CausalLM(PRESETS["gpt2-small"])
    assert model.num_parameters() == 124_439_808


def test_flops_per_token_is_six_n_plus_attention():
    config = PRESETS["gpt2-small"]
    n = config.n_matmul_params()
    assert config.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_every_head(name):
    config = tiny(name)
    ids = torch.randint(0, 61, (2, 9))
    assert MaskedLM(config)(ids).logits.shape == (2, 9, 61)
    assert CausalLM(config)(ids).logits.shape == (2, 9, 61)
    assert SequenceClassifier(config)(ids).logits.shape == (2, 2)


def test_causal_model_does_not_look_ahead():
    model = CausalLM(tiny("gpt-mini")).eval()
    ids = torch.randint(0, 61, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 61
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("name", ["bert-tiny", "gpt-mini", "llama-tiny"])
def test_padding_does_not_change_real_positions(name):
    model = MaskedLM(tiny(name)).eval() if name == "bert-tiny" else CausalLM(tiny(name)).eval()
    ids = torch.randint(5, 61, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], dim=1).long()
    assert torch.allclose(model(ids).logits, model(padded, mask).logits[:, :7], atol=1e-5)


def test_mlm_head_only_at_masked_positions():
    model = MaskedLM(tiny("bert-tiny")).eval()
    ids = torch.randint(5, 61, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 1], labels[1, 8] = 7, 9, 11
    out = model(ids, labels=labels)
    full = model(ids).logits
    assert out.logits.shape == (3, 61)
    assert torch.allclose(out.logits, full[labels != -100], atol=1e-5)
    nll = -F.log_softmax(full[labels != -100], -1)[torch.arange(3), torch.tensor([7, 9, 11])].mean()
    assert torch.allclose(out.loss, nll, atol=1e-5)


def test_causal_loss_is_mean_negative_log_likelihood_of_targets():
    model = CausalLM(tiny("gpt-mini")).eval()
    ids = torch.randint(0, 61, (2, 8))
    targets = torch.randint(0, 61, (2, 8))
    targets[1, 5:] = -100
    out = model(ids, labels=targets)
    assert out.logits is None                       # the chunked loss never builds them
    logp = F.log_softmax(model(ids).logits, -1)
    keep = targets != -100
    nll = -logp[keep].gather(1, targets[keep][:, None]).mean()
    assert torch.allclose(out.loss, nll, atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 5, 512])
def test_chunked_linear_cross_entropy_matches_plain_autograd(chunk_rows):
    """Loss and both gradients equal F.cross_entropy(h @ W.T) through autograd, whatever the
    chunking; ignored rows count for nothing; no gradient work without grad."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7), generator=gen)
    labels[0, :4] = -100
    plain = F.cross_entropy((h @ weight.t()).flatten(0, 1), labels.flatten())
    grads = torch.autograd.grad(plain, (h, weight))
    chunked = linear_cross_entropy(h, weight, labels, chunk_rows)
    assert torch.allclose(chunked, plain, atol=1e-6)
    for got, want in zip(torch.autograd.grad(2.0 * chunked, (h, weight)), grads):
        assert torch.allclose(got, 2.0 * want, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, weight, labels, chunk_rows), plain, atol=1e-6)
    all_ignored = linear_cross_entropy(h, weight, torch.full_like(labels, -100), chunk_rows)
    assert all_ignored.item() == 0.0


def test_untrained_loss_is_near_log_vocab():
    model = CausalLM(tiny("gpt-mini"))
    ids, targets = torch.randint(0, 61, (4, 16)), torch.randint(0, 61, (4, 16))
    assert abs(model(ids, labels=targets).loss.item() - math.log(61)) < 0.1


def test_pooling_respects_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool(h, right, "cls"), h[:, 0])
    assert torch.allclose(pool(h, right, "mean")[0], h[0, :2].mean(0))
    assert torch.allclose(pool(h, right, "mean")[1], h[1].mean(0))
    negative = -h                                      # the padding must not win the maximum
    assert torch.equal(pool(negative, right, "max"), torch.stack([negative[0, :2].amax(0), negative[1].amax(0)]))
    assert torch.equal(pool(negative, left, "max")[0], negative[0, 2:].amax(0))
    assert torch.equal(pool(h, None, "max"), h.amax(1))
    assert torch.equal(pool(h, right, "last"), torch.stack([h[0, 1], h[1, 3]]))
    assert torch.equal(pool(h, left, "last"), torch.stack([h[0, 3], h[1, 3]]))


def test_classifier_loss_and_class_weights():
    model = SequenceClassifier(tiny("bert-tiny", num_labels=3)).eval()
    ids = torch.randint(5, 61, (4, 6))
    labels = torch.tensor([0, 1, 2, 1])
    out = model(ids, labels=labels)
    assert out.logits.shape == (4, 3)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
    weights = torch.tensor([1.0, 2.0, 0.5])
    weighted = model(ids, labels=labels, class_weights=weights).loss
    assert torch.allclose(weighted, F.cross_entropy(out.logits, labels, weight=weights))


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = CausalLM(tiny("gpt-mini"))
    assert tied.lm_head.weight is tied.transformer.embeddings.tokens.weight
    untied = CausalLM(tiny("llama-tiny"))
    assert untied.lm_head.weight is not untied.transformer.embeddings.tokens.weight


def test_residual_projections_get_scaled_init():
    config = tiny("gpt-mini", d_model=256, d_ff=1024, n_layers=8)
    model = CausalLM(config)
    for block in model.transformer.blocks:      # GPT-2: the projections into the residual stream get 0.02/√(2L)
        assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
        for projection in (block.attn.out, block.mlp.fc_out):
            assert abs(projection.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001


def test_sequence_longer_than_context_is_refused():
    model = CausalLM(tiny("gpt-mini"))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_classifier_loss_weights_and_smooths_the_targets():
    """cross-entropy against (1 - ε)·one_hot + ε/K, each row weighted by its class's weight
    (the weighted mean: Σ w_y · loss / Σ w_y, as F.cross_entropy computes it)."""
    torch.manual_seed(0)
    model = SequenceClassifier(tiny("bert-tiny", num_labels=3)).eval()
    ids, labels, weights = torch.randint(5, 61, (4, 6)), torch.tensor([0, 2, 1, 2]), torch.tensor([1.0, 2.0, 0.5])
    out = model(ids, labels=labels, class_weights=weights, label_smoothing=0.1)
    log_p = out.logits.float().log_softmax(-1)
    target = torch.full((4, 3), 0.1 / 3) + 0.9 * F.one_hot(labels, 3)
    per_row = -(target * log_p * weights).sum(-1)
    assert out.loss.item() == pytest.approx((per_row.sum() / weights[labels].sum()).item(), rel=1e-5)


def test_bf16_autocast_forward_backward():
    """bf16 autocast: the loss stays fp32 and within bf16's rounding of the fp32 loss; so do the gradients."""
    torch.manual_seed(0)
    model = CausalLM(tiny("llama-tiny"))
    ids = torch.randint(0, 61, (2, 8))
    fp32_loss = model(ids, labels=ids).loss
    fp32_loss.backward()
    fp32_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.loss.item() == pytest.approx(fp32_loss.item(), rel=2e-2)
    cosines = [F.cosine_similarity(p.grad.flatten(), g.flatten(), dim=0) for p, g in zip(model.parameters(), fp32_grads)]
    assert min(cosines) > 0.98


# ---- computing only the rows a head reads, and dropout -----------------------------------
def padded_batch(gen: torch.Generator):
    ids = torch.randint(5, 61, (4, 12), generator=gen)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    mask[3] = 0                                                  # a fully padded row
    return ids, mask


@pytest.mark.parametrize("name", ["bert-tiny", "gpt-mini", "llama-tiny"])
@pytest.mark.parametrize("path", ATTENTIONS)
def test_mlm_last_layer_on_masked_rows_only_changes_nothing(name, path):
    """MaskedLM with labels runs its last block on the masked rows only: the logits, the loss
    and every gradient equal those of the full computation."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MaskedLM(tiny(name))
    ids, mask = padded_batch(gen)
    labels = torch.full_like(ids, -100)
    chosen = (torch.rand(ids.shape, generator=gen) < 0.3) & (mask == 1)
    chosen[2, 0] = True
    labels[chosen] = ids[chosen]

    out = model(ids, mask, labels=labels, attention=path)
    out.loss.backward()
    pruned = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = model.head(model.transformer(ids, mask, attention=path)[chosen])
    loss = F.cross_entropy(full, labels[chosen])
    loss.backward()
    assert out.logits.shape == full.shape
    assert (out.logits - full).abs().max() <= 1e-5 and (out.loss - loss).abs() <= 1e-6
    for n, p in model.named_parameters():
        assert (pruned[n] - p.grad).abs().max() <= 1e-5, n


@pytest.mark.parametrize("name", ["bert-tiny", "gpt-mini", "llama-tiny"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_classifier_last_layer_on_pooled_row_only_changes_nothing(name, pooling):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = SequenceClassifier(tiny(name, pooling=pooling, pooler=name == "bert-tiny")).eval()
    ids, mask = padded_batch(gen)
    for attention_mask in (mask, None):
        pooled = pool(model.transformer(ids, attention_mask), attention_mask, pooling)
        if model.pooler is not None:
            pooled = torch.tanh(model.pooler(pooled))
        expected = model.classifier(pooled)
        assert (model(ids, attention_mask).logits - expected).abs().max() <= 1e-5


def test_transformer_rows_returns_those_positions():
    model = CausalLM(tiny("gpt-mini")).eval()
    ids = torch.randint(0, 61, (2, 10))
    rows = torch.tensor([[9, 0, 4], [3, 3, 7]])
    full = model.transformer(ids)
    picked = model.transformer(ids, rows=rows)
    assert picked.shape == (2, 3, 32)
    assert (picked - torch.stack([full[0, rows[0]], full[1, rows[1]]])).abs().max() <= 1e-5


def test_dropout_keeps_1_minus_p_scaled_and_gradients_follow():
    from minilm.attention import dropout
    torch.manual_seed(0)
    x = torch.ones(400, 500, requires_grad=True)
    y = dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())                       # d(x·s)/dx = s
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert dropout(x.detach().bfloat16(), 0.5).dtype == torch.bfloat16


def masked_batch(vocab: int = 61, seed: int = 0):
    """Two rows (the second right-padded) masked the BERT way; ids 0-4 are specials."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 20), generator=g)
    attention_mask = torch.ones(2, 20, dtype=torch.long)
    attention_mask[1, 14:] = 0
    ids[1, 14:] = 0
    masked, labels = mask_tokens(ids, vocab_size=vocab, mask_id=4, special_ids=range(5),
                                 attention_mask=attention_mask, mask_prob=0.3, generator=g)
    return ids, masked, labels, attention_mask


@pytest.mark.parametrize("name", ["bert-mini", "llama-tiny"])
def test_electra_generator_shares_the_embeddings_and_is_shallower(name):
    model = ReplacedTokenDetection(tiny(name, n_layers=3, generator_layers=1))
    assert model.generator.transformer.embeddings is model.transformer.embeddings
    assert len(model.generator.transformer.blocks) == 1 and len(model.transformer.blocks) == 3
    tied = model.generator.decoder.weight is model.transformer.embeddings.tokens.weight
    assert tied == model.config.tie_embeddings


def test_electra_loss_is_generator_mlm_plus_weighted_detection():
    """L = CE(G(x̃), x) + 50 · mean BCE(D(x'), [x' ≠ x]) over real tokens, recomputed by hand."""
    model = ReplacedTokenDetection(tiny("bert-mini"))
    ids, masked, labels, attention_mask = masked_batch()
    out = model(masked, attention_mask, labels=labels, sampler=torch.Generator().manual_seed(3))

    generated = model.generator(masked, attention_mask, labels=labels)
    corrupted, replaced = replace_with_samples(masked, labels, generated.logits, torch.Generator().manual_seed(3))
    logits = model.detector(model.transformer(corrupted, attention_mask)).squeeze(-1)
    real = attention_mask.bool()
    bce = F.binary_cross_entropy_with_logits(logits[real], replaced[real].float())
    assert torch.allclose(out.loss, generated.loss + RTD_WEIGHT * bce, atol=1e-5)
    assert torch.equal(out.replaced, replaced) and torch.equal(out.real, real)
    assert torch.equal(replaced, corrupted != ids)


def test_electra_detection_loss_does_not_train_the_generator():
    """No gradient through the sampling: the detection loss reaches the discriminator and the
    shared embeddings, never the generator's own blocks; the MLM loss never the discriminator's."""
    model = ReplacedTokenDetection(tiny("bert-mini"))
    ids, masked, labels, attention_mask = masked_batch()
    out = model(masked, attention_mask, labels=labels)
    out.detection_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in model.generator.transformer.blocks.parameters())
    assert model.transformer.embeddings.tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)
    out.generator_loss.backward()
    assert all(p.grad is None for p in model.transformer.blocks.parameters())
    assert all(p.grad is None for p in model.detector.parameters())


def test_electra_save_and_load_keeps_the_sharing(tmp_path):
    model = ReplacedTokenDetection(tiny("bert-mini", generator_layers=2))
    save_model_dir(model, tmp_path)
    loaded = load_model_dir(tmp_path)
    assert isinstance(loaded, ReplacedTokenDetection) and loaded.config.generator_layers == 2
    assert loaded.generator.transformer.embeddings is loaded.transformer.embeddings
    ids, masked, labels, attention_mask = masked_batch()
    with torch.no_grad():
        a = model(masked, attention_mask, labels=labels, sampler=torch.Generator().manual_seed(0))
        b = loaded(masked, attention_mask, labels=labels, sampler=torch.Generator().manual_seed(0))
    assert torch.equal(a.loss, b.loss)


def test_a_run_directory_of_another_kind_is_a_clear_error(tmp_path):
    save_model_dir(MaskedLM(tiny("bert-mini")), tmp_path / "mlm")
    with pytest.raises(MinilmError, match="mlm holds a MaskedLM .config.json., not a SequenceClassifier"):
        load_model_dir(tmp_path / "mlm", head="classify")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(MinilmError, match="is a Hugging Face model directory.*--init hf:"):
        load_model_dir(hf_dir)
    save_model_dir(CausalLM(tiny("gpt-mini")), tmp_path / "clm")
    (tmp_path / "clm" / "model.safetensors").replace(tmp_path / "mlm" / "model.safetensors")
    with pytest.raises(MinilmError, match="does not fit the model of its config.json"):
        load_model_dir(tmp_path / "mlm")


def test_saving_the_state_after_a_crash_mid_swap_keeps_a_whole_state(tmp_path):
    """A crash after state.tmp/ became state/ but before state.old/ was removed leaves both;
    the next save must still succeed (it used to fail renaming state/ onto state.old/)."""
    model = CausalLM(tiny("gpt-mini"))
    save_state(tmp_path, model, {"step": 1})
    shutil.copytree(tmp_path / "state", tmp_path / "state.old")     # the crash's leftovers
    save_state(tmp_path, model, {"step": 2})
    assert torch.load(tmp_path / "state" / "trainer.pt", weights_only=True) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


@pytest.mark.parametrize("name", ["bert-mini", "gpt-mini", "llama-tiny"])
def test_a_block_compiles_without_graph_breaks(name):
    """torch.compile sees a Block as one graph (torch._dynamo.explain), with a padding mask
    and RoPE where the shape has them. (Transformer.forward itself breaks once when given
    an attention_mask, in drop_full_mask: is the mask all ones, so SDPA can get no mask at all?)"""
    torch._dynamo.reset()
    config = tiny(name)
    model = SequenceClassifier(config).eval()
    block = model.transformer.blocks[0]
    x = torch.randn(2, 12, config.d_model)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    keep = build_keep_mask(mask, 12, 12, config.causal, x.device)
    rope = None
    if config.position == "rope":
        rope = (model.transformer.rope_cos[None, None, :12], model.transformer.rope_sin[None, None, :12])
    explained = torch._dynamo.explain(block)(x, keep, False, rope, None, "sdpa")
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.autocast("cpu", dtype=torch.bfloat16):     # bf16 training: SDPA's float32 route on CPU
        explained = torch._dynamo.explain(block.train())(x.requires_grad_(), keep, False, rope, None, "sdpa")
    assert explained.graph_break_count == 0, explained.break_reasons
    explained = torch._dynamo.explain(model.eval().transformer)(torch.randint(5, 61, (2, 12)))   # no mask: one graph
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_mlm_breaks_its_graph_only_where_planned(caplog):
    """The data-dependent steps (is the mask all ones? how many masked rows?) sit in
    functions torch.compile skips, so compiling gives eager's loss and logs no warning
    (before, dynamo printed a dozen lines about Tensor.item() on every train.py --compile)."""
    torch._dynamo.reset()
    model = MaskedLM(tiny("llama-tiny"))
    compiled = torch.compile(model)
    _, masked, labels, attention_mask = masked_batch()
    with caplog.at_level("WARNING"):
        for mask in (attention_mask, torch.ones_like(attention_mask)):
            out = compiled(masked, mask, labels=labels)
            out.loss.backward()
            torch.testing.assert_close(out.loss, model(masked, mask, labels=labels).loss)
    assert not [r for r in caplog.records if r.name.startswith("torch")], caplog.text
