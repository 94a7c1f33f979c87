"""The architecture of a minilm model, as one typed dataclass.

One `ModelConfig` describes BERT (encoder, post-LN, learned positions + token types),
GPT-2 (decoder, pre-LN, learned positions) and Llama (decoder, pre-RMSNorm, RoPE,
SwiGLU, grouped-query attention) exactly. Everything the model builds is derived
from these fields; nothing else is read from anywhere.

Notation used across the package:

    B   batch size                 T   query length (tokens in this forward)
    S   key length (T + cached)    V   vocabulary size
    d   model width (d_model)      nh  attention heads     hs  head size = d / nh
    nkv key/value heads (GQA)      ff  MLP hidden width    L   layers
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

Attention = Literal["sdpa", "manual"]
NormPosition = Literal["pre", "post"]
Pooling = Literal["cls", "mean", "max", "last"]
# the one list of each: command-line choices and tests read these, the config check reads the types
ATTENTIONS: tuple[str, ...] = get_args(Attention)
POOLINGS: tuple[str, ...] = get_args(Pooling)


@functools.cache
def choice_fields(cls: type) -> dict[str, tuple]:
    """The dataclass fields typed as a Literal, each with the values its type allows
    (None among them for a field typed `Literal[...] | None`)."""
    hints = get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        literal = next((t for t in (hint, *get_args(hint)) if get_origin(t) is Literal), None)
        if literal is not None:
            optional = type(None) in get_args(hint)
            fields[f.name] = get_args(literal) + ((None,) if optional else ())
    return fields


def flag(field_name: str) -> str:
    """The command-line flag that sets a config field: init_weights -> --init-weights."""
    return "--" + field_name.replace("_", "-")


def check_choices(settings: object, error: type[Exception] = ValueError, as_flags: bool = False) -> None:
    """Raise `error` for the first Literal-typed field of dataclass `settings` whose value its
    type does not list. as_flags: name the field as its command-line flag (--init-weights)."""
    for name, allowed in choice_fields(type(settings)).items():
        value = getattr(settings, name)
        if value not in allowed:
            label = f"{flag(name)} " if as_flags else f"{name}="
            listed = ", ".join(str(v) for v in allowed if v is not None)
            raise error(f"{label}{value!r}; choose one of {listed}")


def check_ranges(settings: object, error: type[Exception] = ValueError, as_flags: bool = False, *,
                 positive: Iterable[str] = (), non_negative: Iterable[str] = (),
                 fractions: Iterable[str] = ()) -> None:
    """Raise `error` for the first field of `settings` out of its range: `positive` ones must be
    > 0, `non_negative` ones >= 0, `fractions` in [0, 1). None (not set) passes; NaN fails
    every test. as_flags: name the field as its command-line flag."""
    ranges = ((positive, "> 0", lambda v: v > 0), (non_negative, ">= 0", lambda v: v >= 0),
              (fractions, "in [0, 1)", lambda v: 0 <= v < 1))
    for names, bound, ok in ranges:
        for name in names:
            value = getattr(settings, name)
            if value is not None and not ok(value):
                raise error(f"{flag(name)} must be {bound}, got {value}" if as_flags
                            else f"{name}={value} must be {bound}")


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 8192
    max_seq_len: int = 512          # learned positions / RoPE table length
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None   # None -> n_heads (multi-head); fewer -> grouped-query
    d_ff: int = 1024
    type_vocab_size: int = 0        # BERT's segment embeddings (2); 0 -> none

    # shape of the network
    causal: bool = False            # decoder (GPT, Llama) if True, encoder (BERT) if False
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_position: NormPosition = "pre"
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    bias: bool = True               # biases in attention/MLP linears and norms
    tie_embeddings: bool = True     # LM/MLM decoder shares the token-embedding matrix

    # regularisation and init
    dropout: float = 0.1            # on embeddings and residual branches
    attn_dropout: float = 0.1       # on attention probabilities
    init_std: float = 0.02

    # attention implementation: same function, two programs (see attention.py)
    attention: Attention = "sdpa"

    # heads
    pad_token_id: int = 0
    mlm_head_bias: bool = True      # BERT's MLM decoder has its own output bias
    num_labels: int = 2             # sequence classification
    pooling: Pooling = "cls"
    pooler: bool = False            # BERT's pooler: tanh(W h_cls + b) before the classifier
    classifier_bias: bool = True    # GPT-2's score head has none
    generator_layers: int = 1       # ELECTRA (head "rtd"): depth of the generator, same width

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        # n_layers 0 is allowed: embeddings straight into the head (a bigram model)
        check_ranges(self, positive=("vocab_size", "max_seq_len", "d_model", "n_heads", "n_kv_heads", "d_ff",
                                     "num_labels"),
                     non_negative=("n_layers",), fractions=("dropout", "attn_dropout"))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.position == "rope" and self.head_size % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.head_size}")
        check_choices(self)

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads

    # ---- JSON round-trip -------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes) -> ModelConfig:
        """A copy with fields changed. Changing n_heads of a multi-head config keeps it multi-head."""
        if "n_heads" in changes and "n_kv_heads" not in changes and self.n_kv_heads == self.n_heads:
            changes["n_kv_heads"] = None
        return dataclasses.replace(self, **changes)

    # ---- size accounting -------------------------------------------------------------
    def flops_per_token(self, seq_len: int | None = None, n_params: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), the PaLM-paper estimate:

            6·N + 12·L·d·T

        6·N: each weight is used in one multiply-add (2 FLOPs) forward and two backward.
        12·L·d·T: the attention scores QKᵀ and the mix ·V, which have no weights, over a
        context of T tokens (full square, as a dense kernel computes it). N counts the
        weights in matmuls: the blocks and the output projection, not the embedding lookups.
        """
        seq_len = seq_len or self.max_seq_len
        if n_params is None:
            n_params = self.n_matmul_params()
        return 6.0 * n_params + 12.0 * self.n_layers * self.d_model * seq_len

    def n_matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (blocks + output projection)."""
        d, ff, L = self.d_model, self.d_ff, self.n_layers
        kv = self.n_kv_heads * self.head_size
        attn = d * (d + 2 * kv) + d * d
        mlp = (3 if self.mlp == "swiglu" else 2) * d * ff
        return L * (attn + mlp) + d * self.vocab_size


PRESETS: dict[str, ModelConfig] = {
    # BERT shapes (Turc et al. 2019 "well-read students" sizes): encoder, post-LN, GELU
    "bert-tiny": ModelConfig(d_model=128, n_layers=2, n_heads=2, d_ff=512, type_vocab_size=2,
                             causal=False, norm_position="post", norm_eps=1e-12, pooler=True),
    "bert-mini": ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=1024, type_vocab_size=2,
                             causal=False, norm_position="post", norm_eps=1e-12, pooler=True),
    # GPT-2 shapes: decoder, pre-LN, tanh-GELU, tied LM head
    "gpt-mini": ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=1024, causal=True,
                            mlp="gelu_tanh", pooling="last", classifier_bias=False),
    "gpt2-small": ModelConfig(vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=12,
                              n_heads=12, d_ff=3072, causal=True, mlp="gelu_tanh",
                              pooling="last", classifier_bias=False),
    # Llama shape: pre-RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied
    "llama-tiny": ModelConfig(d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=688,
                              causal=True, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
                              position="rope", bias=False, tie_embeddings=False, dropout=0.0,
                              attn_dropout=0.0, mlm_head_bias=False, pooling="last",
                              classifier_bias=False),
}


# The fields a command line may change over a preset (train.py and finetune.py --init scratch).
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "d_ff", "norm_position")


def shape_overrides(settings: object) -> dict:
    """The SHAPE_FIELDS that `settings` (a CLI's config dataclass) sets, i.e. that are not None."""
    return {name: getattr(settings, name) for name in SHAPE_FIELDS if getattr(settings, name, None) is not None}


def preset(name: str, **overrides) -> ModelConfig:
    """A named architecture, optionally with fields changed: preset("gpt-mini", vocab_size=4096)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
