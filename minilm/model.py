"""The Transformer: embeddings, N blocks, and its heads (masked LM, causal LM, classifier, ELECTRA).

    tokens (B, T) ─► Embeddings ─► Block × L ─► [final norm] ─► hidden (B, T, d) ─► head

A Block is attention then MLP, each wrapped in a residual connection and a norm:

    pre-LN  (GPT-2, Llama):  x = x + Attn(Norm(x));   x = x + MLP(Norm(x))
    post-LN (BERT):          x = Norm(x + Attn(x));   x = Norm(x + MLP(x))

Pre-LN keeps an un-normalised residual stream and so needs one final norm at the top;
post-LN normalises the embeddings instead. That is the whole difference in wiring
between the BERT and GPT shapes; the rest (causal mask, positions, MLP kind, norm kind)
is a config field. Symbols as in config.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minilm.attention import (ATTENTION, KVCache, SelfAttention, build_keep_mask, dropout, keep_for_rows,
                              rope_tables)
from minilm.config import Attention, ModelConfig, Pooling
from minilm.objectives import (IGNORE_INDEX, RTD_WEIGHT, linear_cross_entropy,  # IGNORE_INDEX: a label with no loss
                               replace_with_samples)


@dataclass
class ModelOutput:
    logits: Tensor | None          # (B, T, V), (N_masked, V) or (B, num_labels); None: CausalLM with labels
    loss: Tensor | None = None     # mean cross-entropy in nats, when labels are given


class Dropout(nn.Dropout):
    """nn.Dropout computed by `minilm.attention.dropout`: the same function, a cheaper
    random mask on CPU (see there)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x (B, T, d), rows (B, M) positions -> (B, M, d): row b keeps x[b, rows[b]]."""
    return x.gather(1, rows[..., None].expand(-1, -1, x.size(-1)))


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm: (x - mean) / std · γ + β.   RMSNorm: x / rms(x) · γ (no centring, no β)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def activation(config: ModelConfig) -> nn.Module:
    """GELU(x) = x·Φ(x) (BERT), its tanh approximation (GPT-2), or SiLU for SwiGLU (Llama)."""
    return {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "swiglu": nn.SiLU()}[config.mlp]


class MLP(nn.Module):
    """Position-wise feed-forward network, d -> ff -> d.

    GELU:   fc_out(act(fc_in(x)))
    SwiGLU: fc_out(silu(x W_gate) ⊙ (x W_up)) — fc_in holds [W_gate; W_up] in one matmul.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        width = 2 * config.d_ff if self.gated else config.d_ff
        self.fc_in = nn.Linear(config.d_model, width, bias=config.bias)
        self.act = activation(config)
        self.fc_out = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)                                   # (B, T, ff or 2·ff)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.fc_out(h)                               # (B, T, d)


class Block(nn.Module):
    """One Transformer layer: attention and MLP sublayers with residuals (pre- or post-LN)."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = make_norm(config)
        self.attn = SelfAttention(config, layer_index)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, keep: Tensor | None, is_causal: bool, rope: tuple[Tensor, Tensor] | None,
                cache: KVCache | None, attention: Attention, rows: Tensor | None = None) -> Tensor:
        """x (B, T, d) -> (B, T, d), or (B, M, d) for only the positions `rows` (B, M)."""
        # with rows, the residual stream continues at those positions only
        residual = x if rows is None else take_rows(x, rows)
        if self.pre_norm:
            x = residual + self.dropout(self.attn(self.attn_norm(x), keep, is_causal, rope, cache, attention, rows))
            x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        else:
            x = self.attn_norm(residual + self.dropout(self.attn(x, keep, is_causal, rope, cache, attention, rows)))
            x = self.mlp_norm(x + self.dropout(self.mlp(x)))
        return x


class Embeddings(nn.Module):
    """token (+ learned position) (+ token type) embeddings -> [norm, post-LN only] -> dropout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        self.token_types = nn.Embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        self.norm = make_norm(config) if config.norm_position == "post" else None
        self.dropout = Dropout(config.dropout)

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        x = self.tokens(input_ids)                                          # (B, T, d)
        if self.positions is not None:
            x = x + self.positions(position_ids)
        if self.token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_types(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


@torch.compiler.disable
def drop_full_mask(attention_mask: Tensor) -> Tensor | None:
    """None when the mask keeps every position. A mask tensor only when needed: a square
    causal mask without padding is done by the kernel itself (is_causal), which lets SDPA
    pick FlashAttention. Data-dependent, so torch.compile breaks its graph here, as planned."""
    return None if bool(attention_mask.all()) else attention_mask


class Transformer(nn.Module):
    """The body shared by every head: token ids (B, T) -> hidden states (B, T, d)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config) if config.norm_position == "pre" else None
        if config.position == "rope":
            cos, sin = rope_tables(config.max_seq_len, config.head_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None, attention: Attention | None = None,
                rows: Tensor | None = None) -> Tensor:
        """input_ids (B, T); attention_mask (B, S) 1 = real token (S = cached + T);
        position_ids (B, T), default past_length + 0 … T-1; attention "sdpa"|"manual"
        overrides the config for this call. Returns hidden states (B, T, d).

        rows (B, M): the positions the caller will read (a head that needs few: MLM
        targets, the pooled token). The last block then computes only those rows — its
        queries, attention output, MLP and norms; its keys and values still come from all
        T positions, and every earlier block runs in full, since later layers read all of
        it. Returns (B, M, d), row b holding the hidden states at positions rows[b]."""
        config = self.config
        attention = attention or config.attention
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r}; choose one of {sorted(ATTENTION)}")
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if S > config.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds max_seq_len={config.max_seq_len}")
        if rows is not None and cache is not None:
            raise ValueError("rows and a KV cache cannot be combined: a cache needs every position's keys")
        if position_ids is None:
            position_ids = torch.arange(past, S, device=input_ids.device)[None]   # (1, T)

        if attention_mask is not None:
            attention_mask = drop_full_mask(attention_mask)
        square_causal = config.causal and attention_mask is None and past == 0
        # one new query after a cached prefix (T == 1) may see every key: no causal mask to build
        keep = None if square_causal else build_keep_mask(attention_mask, T, S, config.causal and T > 1,
                                                           input_ids.device)

        rope = None
        if config.position == "rope":
            cos = self.rope_cos[position_ids][:, None]                          # (B or 1, 1, T, hs)
            sin = self.rope_sin[position_ids][:, None]
            rope = (cos, sin)

        x = self.embeddings(input_ids, position_ids, token_type_ids)           # (B, T, d)
        for i, block in enumerate(self.blocks):
            if rows is not None and i == len(self.blocks) - 1:     # the last block: only the rows asked for
                x = block(x, keep=keep_for_rows(keep, square_causal, rows, T, S), is_causal=False, rope=rope,
                          cache=cache, attention=attention, rows=rows)
            else:
                x = block(x, keep=keep, is_causal=square_causal, rope=rope, cache=cache, attention=attention)
        if rows is not None and len(self.blocks) == 0:
            x = take_rows(x, rows)
        if cache is not None:
            cache.advance(T)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x


# --------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------
def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean −log p(label) over the labels that are not IGNORE_INDEX (computed in fp32)."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


class PreTrained(nn.Module):
    """What every head shares: the body, weight init, parameter counting."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)

    def init_weights(self) -> None:
        """N(0, 0.02) for matrices and embeddings, zero biases, unit norms; the projections
        that write into the residual stream get std 0.02/√(2L) (GPT-2): the stream sums 2L
        of them, so its variance then stays O(1) with depth."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.transformer.blocks:
            for proj in (block.attn.out, block.mlp.fc_out):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters: a tied matrix counts once (parameters() deduplicates)."""
        params = list(self.parameters())
        if exclude_embeddings:
            emb = self.transformer.embeddings
            tables = [t.weight for t in (emb.tokens, emb.positions, emb.token_types) if t is not None]
            params = [p for p in params if not any(p is t for t in tables)]
        return sum(p.numel() for p in params)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.config.flops_per_token(seq_len)


@torch.compiler.disable
def selected_positions(selected: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) bool -> rows (B, M): each row's selected positions in increasing order, then
    other positions as filler up to M = the most any row has; real (B, M): which entries
    are selected. h[real] of the (B, M) rows is then h_full[selected], in the same order.

    M depends on the data (a .item()), so torch.compile must break its graph here; disabling
    it for this function makes that break a planned one instead of a dozen lines of warning."""
    counts = selected.sum(dim=1)                                                  # (B,)
    M = int(counts.max()) if selected.numel() else 0
    rows = selected.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :M]
    real = torch.arange(M, device=selected.device) < counts[:, None]
    return rows, real


class MaskedLM(PreTrained):
    """BERT's masked-LM: predict the original token at masked positions.

    head(h) = LayerNorm(act(h W + b)) Eᵀ + b_out, with E the token-embedding matrix (tied).
    Given labels, only the masked rows (labels != -100, ~15%) go through the head: the
    (d × V) decoder is the most expensive matmul, so this saves ~85% of it. For the same
    reason the last block computes only those rows (Transformer.forward `rows`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.transform = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.act = nn.GELU(approximate="tanh" if config.mlp == "gelu_tanh" else "none")
        self.norm = make_norm(config)
        self.decoder = nn.Linear(config.d_model, config.vocab_size, bias=config.mlm_head_bias)
        if config.tie_embeddings:
            self.decoder.weight = self.transformer.embeddings.tokens.weight
        self.init_weights()

    def head(self, h: Tensor) -> Tensor:
        # the norm gets float32, as inside the blocks (where the residual stream is float32):
        # under bf16 autocast RMSNorm is not upcast for us and would leave its fused kernel
        return self.decoder(self.norm(self.act(self.transform(h)).float()))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None,
                attention: Attention | None = None) -> ModelOutput:
        """labels (B, T): original ids at masked positions, -100 elsewhere. With labels,
        logits are (N_masked, V) in row-major order of the masked positions; without,
        (B, T, V)."""
        if labels is None:
            return ModelOutput(self.head(self.transformer(input_ids, attention_mask, token_type_ids,
                                                          attention=attention)))
        masked = labels != IGNORE_INDEX                                  # (B, T)
        rows, real = selected_positions(masked)                          # (B, M) each
        h = self.transformer(input_ids, attention_mask, token_type_ids, attention=attention, rows=rows)
        logits = self.head(h[real])                                      # (N_masked, V)
        return ModelOutput(logits, cross_entropy(logits, labels[masked]))


class CausalLM(PreTrained):
    """GPT / Llama: p(x_{t+1} | x_≤t) = softmax(h_t Wᵀ), W tied to the embeddings or not."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.embeddings.tokens.weight
        self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None, attention: Attention | None = None) -> ModelOutput:
        """Without labels: logits (B, T, V). With labels (B, T), the TARGETS already aligned
        (labels[:, t] is the token that should follow input_ids[:, :t+1], -100 to skip;
        objectives.shift_for_clm builds them): the loss only, logits None. The loss is
        computed a chunk of rows at a time (linear_cross_entropy), so the (B, T, V) logits,
        a training step's largest tensor, never exist whole."""
        h = self.transformer(input_ids, attention_mask, position_ids=position_ids,
                             cache=cache, attention=attention)                    # (B, T, d)
        if labels is None:
            return ModelOutput(self.lm_head(h))
        return ModelOutput(None, linear_cross_entropy(h, self.lm_head.weight, labels))


def pooled_position(input_ids: Tensor, attention_mask: Tensor | None, how: Pooling) -> Tensor:
    """(B,) the position each row of input_ids (B, T) is pooled from: 0 for "cls", the
    last real token for "last" (right or left padding: the highest index whose mask is 1)."""
    B, T = input_ids.shape[:2]
    if how == "cls" or attention_mask is None:
        return torch.full((B,), 0 if how == "cls" else T - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * attention_mask).argmax(dim=1)


def pool(h: Tensor, attention_mask: Tensor | None, how: Pooling) -> Tensor:
    """(B, T, d) -> (B, d): the [CLS] (first) token; the mean over real tokens; the maximum
    over real tokens, feature by feature (max-over-time, as in Kim's 2014 sentence CNN: one
    strongly worded phrase is not averaged away in a long sentence); or the last real token
    (works for right and left padding: the highest index whose mask is 1)."""
    if how == "cls":
        return h[:, 0]
    if how == "mean":
        if attention_mask is None:
            return h.mean(1)
        mask = attention_mask.to(h.dtype)[..., None]                        # (B, T, 1)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if how == "max":
        if attention_mask is None:
            return h.amax(1)
        padding = (attention_mask == 0)[..., None]                          # (B, T, 1)
        return h.masked_fill(padding, torch.finfo(h.dtype).min).amax(1)
    last = pooled_position(h, attention_mask, how)                          # (B,)
    return h[torch.arange(h.size(0), device=h.device), last]


class SequenceClassifier(PreTrained):
    """Sentence -> class: pool the hidden states, [BERT pooler tanh(W·+b)], dropout, linear."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.pooler = nn.Linear(config.d_model, config.d_model) if config.pooler else None
        self.dropout = Dropout(config.dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels, bias=config.classifier_bias)
        self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None,
                attention: Attention | None = None, class_weights: Tensor | None = None,
                label_smoothing: float = 0.0) -> ModelOutput:
        """labels (B,) class indices. logits (B, num_labels). The loss is cross-entropy, each
        class weighted by class_weights (K,) if given, against targets smoothed by ε =
        label_smoothing: (1 − ε)·one_hot(label) + ε/K."""
        how = self.config.pooling
        if how in ("mean", "max"):
            h = self.transformer(input_ids, attention_mask, token_type_ids, attention=attention)
            pooled = pool(h, attention_mask, how)                              # (B, d)
        else:  # one position per row is read: the last block computes only that one
            rows = pooled_position(input_ids, attention_mask, how)[:, None]    # (B, 1)
            pooled = self.transformer(input_ids, attention_mask, token_type_ids, attention=attention,
                                      rows=rows)[:, 0]                        # (B, d)
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(pooled))
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing)
        return ModelOutput(logits, loss)


@dataclass
class DetectionOutput(ModelOutput):
    """ReplacedTokenDetection's output: logits (B, T) are the discriminator's "replaced" logits;
    loss = generator_loss + RTD_WEIGHT · detection_loss."""
    generator_loss: Tensor | None = None     # the generator's MLM cross-entropy (nats)
    generator_logits: Tensor | None = None   # (N_masked, V) the generator's logits at the masked positions
    detection_loss: Tensor | None = None     # mean binary cross-entropy over real tokens
    replaced: Tensor | None = None           # (B, T) bool: which tokens the generator changed
    real: Tensor | None = None               # (B, T) bool: which positions count (not padding)


class ReplacedTokenDetection(PreTrained):
    """ELECTRA pretraining (Clark et al., 2020): a discriminator learns from every token.

    A masked LM learns only at the ~15% masked positions. ELECTRA puts a small masked LM,
    the *generator* G, in front: it fills the masked positions with plausible samples, and
    the *discriminator* D (this model's `transformer`, the body that finetuning keeps)
    predicts for every token whether it was replaced:

        x̃ = mask(x)                        ŷ_i ~ softmax(G(x̃)_i)  at masked positions
        x' = x with the masked positions set to ŷ       r_t = [x'_t ≠ x_t]
        L = CE(G(x̃), x)  +  λ · mean_t BCE(D(x')_t, r_t)         λ = RTD_WEIGHT = 50

    No gradient flows through the sampling: G learns only its MLM loss. G has the same width
    and `config.generator_layers` blocks (ELECTRA: a generator ~1/4-1/2 the discriminator's
    size works best) and shares D's embeddings, as in the paper.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.detector = nn.Sequential(nn.Linear(config.d_model, config.d_model, bias=config.bias),
                                      nn.GELU(),
                                      nn.Linear(config.d_model, 1, bias=config.bias))
        self.init_weights()
        self.generator = MaskedLM(config.replace(n_layers=config.generator_layers))
        self.generator.transformer.embeddings = self.transformer.embeddings         # shared
        if config.tie_embeddings:
            self.generator.decoder.weight = self.transformer.embeddings.tokens.weight

    def detect(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None, attention: Attention | None = None) -> Tensor:
        """(B, T) logits of "this token was replaced"."""
        h = self.transformer(input_ids, attention_mask, token_type_ids, attention=attention)  # (B, T, d)
        return self.detector(h).squeeze(-1).float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None,
                attention: Attention | None = None, sampler: torch.Generator | None = None) -> ModelOutput:
        """input_ids (B, T) and labels as for MaskedLM (objectives.mask_tokens). Without labels:
        the discriminator's logits on input_ids as given. sampler: a torch.Generator for the
        generator's samples (default: the global RNG, which training checkpoints)."""
        if labels is None:
            return ModelOutput(self.detect(input_ids, attention_mask, token_type_ids, attention))
        generated = self.generator(input_ids, attention_mask, token_type_ids, labels=labels, attention=attention)
        corrupted, replaced = replace_with_samples(input_ids, labels, generated.logits, sampler)
        logits = self.detect(corrupted, attention_mask, token_type_ids, attention)              # (B, T)
        real = torch.ones_like(replaced) if attention_mask is None else attention_mask.bool()
        detection_loss = F.binary_cross_entropy_with_logits(logits[real], replaced[real].float())
        return DetectionOutput(logits, generated.loss + RTD_WEIGHT * detection_loss,
                               generated.loss, generated.logits, detection_loss, replaced, real)


HEADS = {"mlm": MaskedLM, "clm": CausalLM, "classify": SequenceClassifier, "rtd": ReplacedTokenDetection}
