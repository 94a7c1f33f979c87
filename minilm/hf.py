"""Hugging Face conversion, both ways: BERT, GPT-2 and Llama checkpoints <-> minilm models.

    from_hf(hf_model_or_directory, head=None) -> MaskedLM | CausalLM | SequenceClassifier
    to_hf(minilm_model, directory=None)       -> the matching transformers model (and saves it)
    config_from_hf(hf_config) -> ModelConfig;  config_to_hf(config, head) -> transformers config

    python -m minilm.hf export RUN_DIR OUT_DIR [--weights final|best]    # a train.py run, for transformers

`transformers` is optional. Reading a local directory (config.json + model.safetensors or
pytorch_model.bin) needs only `json` and `safetensors`; building a transformers model
(`to_hf`, `config_to_hf`) needs `pip install 'minilm[hf]'`.

Conventions the conversion has to bridge (everything else is a rename):

* Fused QKV. minilm computes queries, keys and values with ONE linear layer whose output
  rows are [Q (nh·hs); K (nkv·hs); V (nkv·hs)], each head-major ("(h hs)"), exactly the
  row order of HF's separate query/key/value (q_proj/k_proj/v_proj) matrices. Importing
  concatenates them along dim 0 (weights and biases); exporting splits at the sizes of the
  HF tensors. Llama's SwiGLU is fused the same way: minilm's fc_in rows = [gate (ff); up (ff)].
* Conv1D. GPT-2's linear layers are `Conv1D` modules that store weights as (in, out), the
  transpose of nn.Linear's (out, in). GPT-2's c_attn already holds [Q | K | V] as columns,
  so one transpose turns it into minilm's fused qkv.
* Tied weights. When the token embedding and the output projection (CausalLM.lm_head,
  MaskedLM.decoder) are one matrix, checkpoints usually store it once (HF's save_pretrained
  drops `lm_head.weight`); minilm loads the embedding and the tie does the rest. BERT also
  ties its MLM output bias: `cls.predictions.decoder.bias` is `cls.predictions.bias`.
* Rotary embeddings. minilm's RoPE rotates channel pairs (i, i + hs/2) ("rotate_half"), as
  HF's Llama does, so q/k weights are copied as they are, without a permutation.
* Bodies and heads. An HF model with a head keeps its body under a prefix ("bert.",
  "transformer.", "model."); a bare BertModel / GPT2Model / LlamaModel has no prefix and no
  head. A bare body loads into the head you name (`head="mlm" | "clm" | "classify"`) and the
  head starts freshly initialised. Nothing is dropped or invented silently: every minilm
  parameter is either loaded or reported as missing, every checkpoint tensor is either used
  or reported as unused (`LoadReport`, also issued as a warning); a missing *body* tensor or a
  shape mismatch is an error. Non-weight buffers (position_ids, GPT-2's causal-mask
  `attn.bias`, RoPE `inv_freq`) are skipped.
* Training-only settings that minilm does not model separately (BERT's classifier_dropout,
  GPT-2's embd_pdrop) are not carried over; they never change eval-mode outputs.

Each family is one table of name mappings (`FAMILIES`); the code below only walks tables.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, get_args

import torch
from torch import Tensor, nn

from minilm.checkpoint import WEIGHT_FILES, Weights, load_model_config, load_model_dir, new_run_dir
from minilm.config import ModelConfig
from minilm.data import load_tokenizer
from minilm.errors import MinilmError, import_transformers
from minilm.model import HEADS, CausalLM, MaskedLM, SequenceClassifier

# --------------------------------------------------------------------------------------
# name tables: one per family
# --------------------------------------------------------------------------------------
class Row(NamedTuple):
    """minilm parameter name <-> HF tensor name(s). `{i}` is a layer index, `{p}` is
    weight|bias. A list of HF names is concatenated along dim 0 into one fused minilm tensor.
    transpose: the HF module is a Conv1D, whose 2-D weight is stored (in, out)."""
    minilm: str
    hf: str | tuple[str, ...]
    transpose: bool = False


@dataclass(frozen=True)
class Family:
    model_type: str
    base: str                              # prefix of the body inside an HF model with a head
    body: tuple[Row, ...]                  # minilm names under "transformer.", HF names under `base`
    heads: dict[str, tuple[Row, ...]]      # minilm head -> rows (full HF names)
    classes: dict[str, str]                # "body" / minilm head -> transformers class name
    aliases: dict[str, str] = field(default_factory=dict)  # HF key -> the HF key it is tied to


def _qkv(fmt: str) -> tuple[str, ...]:
    return tuple(fmt.format(x) for x in ("query", "key", "value"))


BERT = Family(
    model_type="bert",
    base="bert.",
    body=(
        Row("embeddings.tokens.weight", "embeddings.word_embeddings.weight"),
        Row("embeddings.positions.weight", "embeddings.position_embeddings.weight"),
        Row("embeddings.token_types.weight", "embeddings.token_type_embeddings.weight"),
        Row("embeddings.norm.{p}", "embeddings.LayerNorm.{p}"),
        Row("blocks.{i}.attn.qkv.{p}", _qkv("encoder.layer.{{i}}.attention.self.{}.{{p}}")),
        Row("blocks.{i}.attn.out.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
        Row("blocks.{i}.attn_norm.{p}", "encoder.layer.{i}.attention.output.LayerNorm.{p}"),
        Row("blocks.{i}.mlp.fc_in.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
        Row("blocks.{i}.mlp.fc_out.{p}", "encoder.layer.{i}.output.dense.{p}"),
        Row("blocks.{i}.mlp_norm.{p}", "encoder.layer.{i}.output.LayerNorm.{p}"),
    ),
    heads={
        "mlm": (
            Row("transform.{p}", "cls.predictions.transform.dense.{p}"),
            Row("norm.{p}", "cls.predictions.transform.LayerNorm.{p}"),
            Row("decoder.weight", "cls.predictions.decoder.weight"),
            Row("decoder.bias", "cls.predictions.bias"),
        ),
        "classify": (
            Row("pooler.{p}", "bert.pooler.dense.{p}"),
            Row("classifier.{p}", "classifier.{p}"),
        ),
    },
    classes={"body": "BertModel", "mlm": "BertForMaskedLM", "classify": "BertForSequenceClassification"},
    aliases={"cls.predictions.decoder.bias": "cls.predictions.bias"},
)

GPT2 = Family(
    model_type="gpt2",
    base="transformer.",
    body=(
        Row("embeddings.tokens.weight", "wte.weight"),
        Row("embeddings.positions.weight", "wpe.weight"),
        Row("blocks.{i}.attn_norm.{p}", "h.{i}.ln_1.{p}"),
        Row("blocks.{i}.attn.qkv.{p}", "h.{i}.attn.c_attn.{p}", transpose=True),
        Row("blocks.{i}.attn.out.{p}", "h.{i}.attn.c_proj.{p}", transpose=True),
        Row("blocks.{i}.mlp_norm.{p}", "h.{i}.ln_2.{p}"),
        Row("blocks.{i}.mlp.fc_in.{p}", "h.{i}.mlp.c_fc.{p}", transpose=True),
        Row("blocks.{i}.mlp.fc_out.{p}", "h.{i}.mlp.c_proj.{p}", transpose=True),
        Row("final_norm.{p}", "ln_f.{p}"),
    ),
    heads={
        "clm": (Row("lm_head.weight", "lm_head.weight"),),
        "classify": (Row("classifier.weight", "score.weight"),),
    },
    classes={"body": "GPT2Model", "clm": "GPT2LMHeadModel", "classify": "GPT2ForSequenceClassification"},
)

LLAMA = Family(
    model_type="llama",
    base="model.",
    body=(
        Row("embeddings.tokens.weight", "embed_tokens.weight"),
        Row("blocks.{i}.attn_norm.weight", "layers.{i}.input_layernorm.weight"),
        Row("blocks.{i}.attn.qkv.{p}", tuple(f"layers.{{i}}.self_attn.{x}_proj.{{p}}" for x in "qkv")),
        Row("blocks.{i}.attn.out.{p}", "layers.{i}.self_attn.o_proj.{p}"),
        Row("blocks.{i}.mlp_norm.weight", "layers.{i}.post_attention_layernorm.weight"),
        Row("blocks.{i}.mlp.fc_in.{p}", ("layers.{i}.mlp.gate_proj.{p}", "layers.{i}.mlp.up_proj.{p}")),
        Row("blocks.{i}.mlp.fc_out.{p}", "layers.{i}.mlp.down_proj.{p}"),
        Row("final_norm.weight", "norm.weight"),
    ),
    heads={
        "clm": (Row("lm_head.weight", "lm_head.weight"),),
        "classify": (Row("classifier.weight", "score.weight"),),
    },
    classes={"body": "LlamaModel", "clm": "LlamaForCausalLM", "classify": "LlamaForSequenceClassification"},
)

FAMILIES = {f.model_type: f for f in (BERT, GPT2, LLAMA)}

# transformers class name -> (family, minilm head); None = a bare body, the caller names the head
ARCHITECTURES: dict[str, tuple[str, str | None]] = {
    name: (family.model_type, None if head == "body" else head)
    for family in FAMILIES.values() for head, name in family.classes.items()
}
ARCHITECTURES["BertForPreTraining"] = ("bert", "mlm")  # MLM + next-sentence head (NSP is unused)

# checkpoint tensors that are not weights (buffers some versions save): skipped, not reported
NOT_WEIGHTS = re.compile(r"(^|\.)position_ids$|\.attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


def _rows(family: Family, head: str) -> list[tuple[re.Pattern, Row]]:
    """The family's rows for one minilm head, with full names on both sides, compiled."""
    body = [Row("transformer." + r.minilm,
                tuple(family.base + n for n in r.hf) if isinstance(r.hf, tuple) else family.base + r.hf,
                r.transpose) for r in family.body]
    rows = body + list(family.heads.get(head, ()))
    compiled = []
    for row in rows:
        pattern = re.escape(row.minilm).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        compiled.append((re.compile(pattern + "$"), row))
    return compiled


def _hf_names(rows: list[tuple[re.Pattern, Row]], minilm_key: str) -> tuple[list[str], bool]:
    """The HF tensor name(s) for one minilm parameter, and whether they are Conv1D."""
    for pattern, row in rows:
        m = pattern.match(minilm_key)
        if m:
            names = row.hf if isinstance(row.hf, tuple) else (row.hf,)
            return [n.format(**m.groupdict()) for n in names], row.transpose
    raise RuntimeError(f"no Hugging Face name for minilm parameter {minilm_key!r} (a gap in the table)")


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """minilm state-dict keys that share storage with an earlier key (e.g. lm_head.weight -> tokens)."""
    first: dict[tuple[int, tuple], str] = {}
    aliases = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


# --------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------
def _as_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise MinilmError(f"expected a transformers config or a config.json dict, got {type(hf_config).__name__}")


def _num_labels(d: dict) -> int:
    if d.get("id2label"):
        return len(d["id2label"])
    return d.get("num_labels") or 2


def _unsupported(family: str, what: str) -> MinilmError:
    return MinilmError(f"cannot convert this {family} config: {what} has no minilm equivalent")


def _mlp_from_act(family: str, act: str) -> str:
    if act == "gelu":
        return "gelu"
    if act in ("gelu_new", "gelu_pytorch_tanh"):
        return "gelu_tanh"
    raise _unsupported(family, f"activation {act!r} (supported: gelu, gelu_new, gelu_pytorch_tanh)")


def _rope_theta(d: dict) -> float:
    """Plain RoPE's base θ, wherever this config version keeps it; scaled RoPE is refused."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise MinilmError(f"cannot convert this llama config: RoPE scaling type {rope_type!r} is not "
                          "supported (minilm implements plain RoPE, rope_type 'default')")
    if params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported("llama", "partial_rotary_factor != 1")
    return float(params.get("rope_theta", d.get("rope_theta") or 10000.0))


def config_from_hf(hf_config: Any) -> ModelConfig:
    """A transformers config (or a config.json dict) for bert / gpt2 / llama -> ModelConfig.

    Keys missing from a dict take the transformers class defaults (old config.json files
    omit values equal to them). Anything minilm cannot compute exactly raises MinilmError.
    """
    d = _as_dict(hf_config)
    try:
        return _model_config(d)
    except ValueError as err:       # ModelConfig's own checks: a width the heads do not divide, ...
        raise MinilmError(f"this {d.get('model_type')} config describes no valid model: {err}") from err


def _model_config(d: dict) -> ModelConfig:
    """config_from_hf for a config.json dict, one branch per family."""
    kind = d.get("model_type")
    pad = d.get("pad_token_id")
    common = dict(pad_token_id=0 if pad is None else int(pad), num_labels=_num_labels(d),
                  init_std=float(d.get("initializer_range", 0.02)), attention="sdpa")

    if kind == "bert":
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise _unsupported("bert", "is_decoder / add_cross_attention")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise _unsupported("bert", f"position_embedding_type={d['position_embedding_type']!r}")
        if not d.get("type_vocab_size", 2):
            raise _unsupported("bert", "type_vocab_size=0")
        return ModelConfig(
            vocab_size=d.get("vocab_size", 30522), max_seq_len=d.get("max_position_embeddings", 512),
            d_model=d.get("hidden_size", 768), n_layers=d.get("num_hidden_layers", 12),
            n_heads=d.get("num_attention_heads", 12), d_ff=d.get("intermediate_size", 3072),
            type_vocab_size=d.get("type_vocab_size", 2), causal=False, norm="layernorm",
            norm_eps=float(d.get("layer_norm_eps", 1e-12)), norm_position="post",
            mlp=_mlp_from_act("bert", d.get("hidden_act", "gelu")), position="learned", bias=True,
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
            dropout=float(d.get("hidden_dropout_prob", 0.1)),
            attn_dropout=float(d.get("attention_probs_dropout_prob", 0.1)),
            mlm_head_bias=True, pooling="cls", pooler=True, classifier_bias=True, **common)

    if kind == "gpt2":
        if not d.get("scale_attn_weights", True) or d.get("scale_attn_by_inverse_layer_idx"):
            raise _unsupported("gpt2", "scale_attn_weights=False / scale_attn_by_inverse_layer_idx=True")
        if d.get("add_cross_attention"):
            raise _unsupported("gpt2", "add_cross_attention")
        width = d.get("n_embd", 768)
        return ModelConfig(
            vocab_size=d.get("vocab_size", 50257), max_seq_len=d.get("n_positions", 1024),
            d_model=width, n_layers=d.get("n_layer", 12), n_heads=d.get("n_head", 12),
            d_ff=d.get("n_inner") or 4 * width, type_vocab_size=0, causal=True, norm="layernorm",
            norm_eps=float(d.get("layer_norm_epsilon", 1e-5)), norm_position="pre",
            mlp=_mlp_from_act("gpt2", d.get("activation_function", "gelu_new")), position="learned",
            bias=True, tie_embeddings=bool(d.get("tie_word_embeddings", True)),
            dropout=float(d.get("resid_pdrop", 0.1)), attn_dropout=float(d.get("attn_pdrop", 0.1)),
            pooling="last", pooler=False, classifier_bias=False, **common)

    if kind == "llama":
        width, heads = d.get("hidden_size", 4096), d.get("num_attention_heads", 32)
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise _unsupported("llama", f"hidden_act={d['hidden_act']!r} (SwiGLU needs silu)")
        if (d.get("head_dim") or width // heads) != width // heads:
            raise _unsupported("llama", f"head_dim={d['head_dim']} != hidden_size / num_attention_heads")
        attention_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise _unsupported("llama", f"attention_bias={attention_bias} with mlp_bias={mlp_bias} "
                                        "(minilm has one `bias` switch for both)")
        return ModelConfig(
            vocab_size=d.get("vocab_size", 32000), max_seq_len=d.get("max_position_embeddings", 2048),
            d_model=width, n_layers=d.get("num_hidden_layers", 32), n_heads=heads,
            n_kv_heads=d.get("num_key_value_heads") or heads, d_ff=d.get("intermediate_size", 11008),
            type_vocab_size=0, causal=True, norm="rmsnorm", norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            norm_position="pre", mlp="swiglu", position="rope", rope_theta=_rope_theta(d),
            bias=attention_bias, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            dropout=0.0, attn_dropout=float(d.get("attention_dropout") or 0.0),
            mlm_head_bias=False, pooling="last", pooler=False, classifier_bias=False, **common)

    if kind is None and "head" in d:    # minilm's own config.json (a run directory) has a "head", no model_type
        raise MinilmError("this is a minilm config (a train.py/finetune.py run?), not a Hugging Face one: "
                          "load a run with minilm.checkpoint.load_model_dir")
    raise MinilmError(f"model_type {kind!r} is not supported; minilm converts {sorted(FAMILIES)}")


def family_of(config: ModelConfig) -> str:
    """Which HF family expresses this minilm architecture exactly ("bert", "gpt2", "llama")."""
    c = config
    shape = (c.causal, c.norm, c.norm_position, c.position)
    if shape == (False, "layernorm", "post", "learned"):
        problems = {"mlp must be gelu or gelu_tanh": c.mlp == "swiglu", "bias must be True": not c.bias,
                    "type_vocab_size must be >= 1": c.type_vocab_size < 1,
                    "n_kv_heads must equal n_heads": c.n_kv_heads != c.n_heads}
        family = "bert"
    elif shape == (True, "layernorm", "pre", "learned"):
        problems = {"mlp must be gelu or gelu_tanh": c.mlp == "swiglu", "bias must be True": not c.bias,
                    "type_vocab_size must be 0": c.type_vocab_size != 0,
                    "n_kv_heads must equal n_heads": c.n_kv_heads != c.n_heads}
        family = "gpt2"
    elif shape == (True, "rmsnorm", "pre", "rope"):
        problems = {"mlp must be swiglu": c.mlp != "swiglu", "type_vocab_size must be 0": c.type_vocab_size != 0}
        family = "llama"
    else:
        raise MinilmError(
            f"no Hugging Face family expresses causal={c.causal}, norm={c.norm!r}, "
            f"norm_position={c.norm_position!r}, position={c.position!r}; supported: BERT (encoder, "
            "layernorm, post, learned), GPT-2 (causal, layernorm, pre, learned), Llama (causal, "
            "rmsnorm, pre, rope)")
    bad = [msg for msg, failed in problems.items() if failed]
    if bad:
        raise MinilmError(f"this config is {family}-shaped but cannot be exported as {family}: {'; '.join(bad)}")
    return family


def _check_head(family: str, head: str, config: ModelConfig) -> None:
    if head not in FAMILIES[family].classes or head == "body":
        options = sorted(h for h in FAMILIES[family].classes if h != "body")
        raise MinilmError(f"a {family} model has no {head!r} head in transformers; choose one of {options}")
    if head == "mlm" and not config.mlm_head_bias:
        raise MinilmError("BERT's MLM head always has an output bias; mlm_head_bias=False cannot be exported")
    if head == "classify":
        want = ("cls", True, True) if family == "bert" else ("last", False, False)
        got = (config.pooling, config.pooler, config.classifier_bias)
        if got != want:
            raise MinilmError(f"{family} sequence classification pools with (pooling, pooler, classifier_bias)"
                              f" = {want}; this config has {got}")


def config_to_hf(config: ModelConfig, head: str) -> Any:
    """ModelConfig + head ("mlm" | "clm" | "classify") -> the transformers config that builds
    the same network. Raises MinilmError when no HF class expresses it."""
    transformers = import_transformers()
    family = family_of(config)
    _check_head(family, head, config)
    c = config
    act = "gelu" if c.mlp == "gelu" else "gelu_new"
    labels = {"id2label": {i: f"LABEL_{i}" for i in range(c.num_labels)},
              "label2id": {f"LABEL_{i}": i for i in range(c.num_labels)}}
    # bos/eos: a tokenizer's, which a ModelConfig does not know (export_run sets a run's); GPT-2's
    # default 50256 would lie outside a small vocabulary
    common = dict(vocab_size=c.vocab_size, initializer_range=c.init_std, pad_token_id=c.pad_token_id,
                  bos_token_id=None, eos_token_id=None, tie_word_embeddings=c.tie_embeddings,
                  architectures=[FAMILIES[family].classes[head]], **labels)
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=c.d_model, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
            intermediate_size=c.d_ff, hidden_act=act, hidden_dropout_prob=c.dropout,
            attention_probs_dropout_prob=c.attn_dropout, max_position_embeddings=c.max_seq_len,
            type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_eps, **common)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
            n_inner=c.d_ff, activation_function=act, resid_pdrop=c.dropout, embd_pdrop=c.dropout,
            attn_pdrop=c.attn_dropout, layer_norm_epsilon=c.norm_eps, **common)
    return transformers.LlamaConfig(
        hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_size,
        hidden_act="silu", max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,        # transformers 5 moves it into rope_parameters itself; 4.x reads it as is
        attention_bias=c.bias, mlp_bias=c.bias, attention_dropout=c.attn_dropout, **common)


# --------------------------------------------------------------------------------------
# reading checkpoints
# --------------------------------------------------------------------------------------
def _read_directory(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """config.json and all weights of a local HF model directory (no transformers needed)."""
    if not path.is_dir():
        raise MinilmError(f"{path} is not a directory; from_hf reads a local Hugging Face model directory "
                          "(config.json + model.safetensors) or takes an in-memory transformers model")
    if not (path / "config.json").is_file():
        raise MinilmError(f"{path} has no config.json")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise MinilmError(f"{path}/config.json is not valid JSON ({err})") from err

    def load(file: Path) -> dict[str, Tensor]:
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file
                return load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:    # safetensors, pickle and zip each raise their own kind for a damaged file
            first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise MinilmError(f"{file} cannot be read as weights ({type(err).__name__}: {first_line})") from err

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return config, load(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():                                  # sharded checkpoint
            state: dict[str, Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load(path / shard))
            return config, state
    raise MinilmError(f"{path} has no model.safetensors or pytorch_model.bin (sharded or not)")


def _normalise(family: Family, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint keys -> the names of the family's model *with* a head: old LayerNorm
    gamma/beta renamed, a bare body's keys given the body prefix, tied aliases dropped,
    non-weight buffers dropped."""
    state = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)) if "LayerNorm" in k else k: v
             for k, v in state.items()}
    if not any(k.startswith(family.base) for k in state):    # a bare body: add the prefix
        head_roots = {r.hf.split(".")[0] for rows in family.heads.values() for r in rows
                      if not r.hf.startswith(family.base)}
        state = {k if k.split(".")[0] in head_roots else family.base + k: v for k, v in state.items()}
    for alias, target in family.aliases.items():
        if alias in state:
            value = state.pop(alias)
            state.setdefault(target, value)
    return {k: v for k, v in state.items() if not NOT_WEIGHTS.search(k)}


def _infer_head(config: dict, state: dict[str, Tensor], class_name: str | None) -> str | None:
    for name in [class_name] + list(config.get("architectures") or []):
        if name in ARCHITECTURES:
            return ARCHITECTURES[name][1]
    for prefix, head in (("cls.predictions.", "mlm"), ("lm_head.", "clm"), ("classifier.", "classify"),
                         ("score.", "classify")):
        if any(k.startswith(prefix) for k in state):
            return head
    return None


@dataclass
class LoadReport:
    """What a conversion could not map one-to-one (empty when the checkpoint matched exactly)."""
    missing: list[str] = field(default_factory=list)   # minilm parameters freshly initialised
    unused: list[str] = field(default_factory=list)    # checkpoint tensors that went nowhere

    def __bool__(self) -> bool:
        return bool(self.missing or self.unused)

    def __str__(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} minilm parameters not in the checkpoint, freshly "
                         f"initialised: {self.missing}")
        if self.unused:
            parts.append(f"{len(self.unused)} checkpoint tensors unused: {self.unused}")
        return "; ".join(parts) or "all weights matched"


def from_hf(hf_model_or_path: Any, head: str | None = None, *, dtype: torch.dtype = torch.float32,
            return_report: bool = False):
    """An HF BERT / GPT-2 / Llama model -> the equivalent minilm model, in eval mode.

    hf_model_or_path: an in-memory transformers model, or a local directory with config.json
      and model.safetensors (or pytorch_model.bin; sharded too). Reading a directory does not
      need transformers.
    head: "mlm" | "clm" | "classify"; default: the checkpoint's own (BertForMaskedLM -> "mlm",
      *LMHeadModel / *ForCausalLM -> "clm", *ForSequenceClassification -> "classify"). A bare
      body (BertModel, GPT2Model, LlamaModel) needs it; its head is then freshly initialised.
    Returns the model, or (model, LoadReport) with return_report=True. A non-empty report is
    also issued as a warning; a missing body tensor or a shape mismatch raises MinilmError.
    """
    if isinstance(hf_model_or_path, (str, Path)):
        hf_config, hf_state = _read_directory(Path(hf_model_or_path))
        class_name = None
    elif isinstance(hf_model_or_path, nn.Module) and hasattr(hf_model_or_path, "config"):
        hf_config, hf_state = _as_dict(hf_model_or_path.config), hf_model_or_path.state_dict()
        class_name = type(hf_model_or_path).__name__
    else:
        raise MinilmError(f"from_hf takes a transformers model or a directory path, "
                          f"got {type(hf_model_or_path).__name__}")

    config = config_from_hf(hf_config)
    family = FAMILIES[hf_config["model_type"]]
    hf_state = _normalise(family, hf_state)
    own_head = _infer_head(hf_config, hf_state, class_name)
    head = head or own_head
    if head is None:
        raise MinilmError(f"this checkpoint is a bare {family.classes['body']} without a head; "
                          f"pass head= one of {sorted(h for h in family.classes if h != 'body')}")
    if head not in HEAD_OF.values():
        raise MinilmError(f"head={head!r}; choose one of {sorted(HEAD_OF.values())}")
    _check_head(family.model_type, head, config)

    model = HEADS[head](config)
    rows = _rows(family, head)
    aliases = _tied_aliases(model)
    target = model.state_dict()
    loaded: dict[str, Tensor] = {}
    used: set[str] = set()
    report = LoadReport()
    for key, current in target.items():
        names, transpose = _hf_names(rows, key)
        if key in aliases:                       # tied: loaded through the key it shares
            used.update(n for n in names if n in hf_state)
            continue
        if not all(n in hf_state for n in names):
            if key.startswith("transformer."):
                raise MinilmError(f"checkpoint lacks {[n for n in names if n not in hf_state]} "
                                  f"for minilm's {key}; is it a complete {family.model_type} model?")
            report.missing.append(key)
            continue
        parts = [hf_state[n] for n in names]
        used.update(names)
        if transpose and parts[0].ndim == 2:
            parts = [p.t() for p in parts]
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        if value.shape != current.shape:
            raise MinilmError(f"shape mismatch for {key} <- {names}: checkpoint {tuple(value.shape)}, "
                              f"minilm {tuple(current.shape)}")
        loaded[key] = value
    result = model.load_state_dict(loaded, strict=False)
    expected_missing = set(report.missing) | set(aliases)
    if set(result.missing_keys) != expected_missing or result.unexpected_keys:
        raise RuntimeError(f"key accounting failed: {result}")  # a bug in this module, not the user's
    report.unused = sorted(set(hf_state) - used)
    if report:
        warnings.warn(f"from_hf -> {type(model).__name__}: {report}", stacklevel=2)
    model = model.to(dtype).eval()
    return (model, report) if return_report else model


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
HEAD_OF = {MaskedLM: "mlm", CausalLM: "clm", SequenceClassifier: "classify"}


def to_hf(model: nn.Module, directory: str | Path | None = None, *, overwrite: bool = False):
    """minilm MaskedLM / CausalLM / SequenceClassifier -> the matching transformers model
    (BertForMaskedLM, GPT2LMHeadModel, LlamaForSequenceClassification, …) with identical
    weights, in the same train/eval mode and dtype. With `directory`, also save_pretrained
    there (safetensors) so that transformers.AutoModelFor*.from_pretrained(directory) loads
    it; a non-empty directory is an error unless overwrite=True."""
    transformers = import_transformers()
    head = next((h for cls, h in HEAD_OF.items() if isinstance(model, cls)), None)
    if head is None:
        raise MinilmError(f"to_hf converts MaskedLM, CausalLM or SequenceClassifier, got {type(model).__name__}")
    if directory is not None:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise MinilmError(f"{directory} is a file; to_hf writes a model directory")
        if directory.is_dir() and any(directory.iterdir()) and not overwrite:
            raise MinilmError(f"{directory} exists and is not empty; pass overwrite=True to write into it")

    hf_config = config_to_hf(model.config, head)
    family = FAMILIES[hf_config.model_type]
    param = next(model.parameters())
    hf_model = getattr(transformers, family.classes[head])(hf_config).to(param.dtype)
    hf_state = hf_model.state_dict()

    rows = _rows(family, head)
    out: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        names, transpose = _hf_names(rows, key)
        sizes = [hf_state[n].shape[-1 if transpose else 0] for n in names]  # Conv1D: (in, out)
        parts = tensor.split(sizes) if len(names) > 1 else [tensor]
        for name, part in zip(names, parts):
            out[name] = (part.t() if transpose and part.ndim == 2 else part).contiguous()
    for alias, target in family.aliases.items():
        if alias in hf_state:
            out[alias] = out[target]
    result = hf_model.load_state_dict(out, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"key accounting failed: {result}")  # a bug in this module
    hf_model.train(model.training)

    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        hf_model.save_pretrained(directory)
    return hf_model


# --------------------------------------------------------------------------------------
# command line: python -m minilm.hf export RUN_DIR OUT_DIR
# --------------------------------------------------------------------------------------
def export_run(run_dir: str | Path, out_dir: str | Path, weights: Weights = "final") -> Path:
    """A train.py run (masked or causal LM) as a directory that transformers'
    AutoModelForMaskedLM / AutoModelForCausalLM loads. Its SentencePiece tokenizer, which
    transformers cannot read, is copied to minilm_tokenizer/. Classifiers: finetune.py export."""
    run_dir, out = Path(run_dir), Path(out_dir)
    model = load_model_dir(run_dir, WEIGHT_FILES[weights])
    if isinstance(model, SequenceClassifier):
        raise MinilmError(f"{run_dir} is a finetune.py run: export it with finetune.py export, which also "
                          "writes its labels")
    hf_model = to_hf(model)             # refuses shapes no HF family has
    tokenizer = run_dir / "tokenizer"
    if tokenizer.is_dir():      # its special ids, so that generate() stops at the run's </s>
        tok = load_tokenizer(tokenizer)
        for settings in (hf_model.config, getattr(hf_model, "generation_config", None)):
            if settings is not None:
                settings.bos_token_id, settings.eos_token_id, settings.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    new_run_dir(out, hint="pass OUT_DIR a new directory")
    hf_model.save_pretrained(out)
    if tokenizer.is_dir():
        shutil.copytree(tokenizer, out / "minilm_tokenizer")
    return out


def main(argv: list[str] | None = None) -> int:
    from minilm.cli import ArgumentParser, HelpFormatter     # the CLI's helpers: not needed by the library above

    p = ArgumentParser(prog="python -m minilm.hf", formatter_class=HelpFormatter,
                       description="Export a train.py run as a Hugging Face transformers model directory "
                                   "(finetune.py export does the same for classifiers).")
    commands = p.add_subparsers(dest="command", required=True)
    e = commands.add_parser("export", formatter_class=HelpFormatter, help="RUN_DIR -> OUT_DIR (config.json, "
                            "model.safetensors, minilm_tokenizer/)")
    e.add_argument("run_dir", help="a train.py run directory (--objective clm or mlm)")
    e.add_argument("out_dir", help="a new directory")
    e.add_argument("--weights", choices=get_args(Weights), default="final",
                   help="model.safetensors (final) or best.safetensors (best by validation loss)")
    args = p.parse_args(argv)
    out = export_run(args.run_dir, args.out_dir, args.weights)
    kind = "MaskedLM" if load_model_config(args.run_dir)[1] == "mlm" else "CausalLM"
    print(f"wrote {out}/: transformers.AutoModelFor{kind}.from_pretrained({str(out)!r}) loads it")
    return 0


if __name__ == "__main__":
    from minilm.cli import main_guard
    sys.exit(main_guard(main))
