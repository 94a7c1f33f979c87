"""Multi-head self-attention: the formula written out, and the same formula fused.

    Attention(Q, K, V) = softmax(Q Kᵀ / √hs  masked) · V

Each of nh heads projects the input x (B, T, d) to its own queries, keys and values of
size hs = d / nh, attends, and the heads' outputs are concatenated and projected back to
d. Grouped-query attention (Llama 2/3) gives several query heads one shared key/value
head, which shrinks the KV cache by nh / nkv.

Two programs compute this one function (tests prove they agree to 1e-5):
  * `manual_attention`: five lines you can read — scores, mask, softmax, dropout, mix.
  * `sdpa_attention`: torch.nn.functional.scaled_dot_product_attention, which on CUDA
    dispatches to FlashAttention / memory-efficient kernels that never materialise the
    (T, S) score matrix (and on CPU, without dropout, to a fused flash kernel too, in
    float32 when half-precision training at short sequences would be slow in bf16).

Masks are boolean `keep` tensors, True where query t may look at key s, broadcast to
(B, nh, T, S). A masked score is set to the most negative finite float, never -inf, and
masked probabilities are then zeroed: a query that may see nothing (a fully padded row)
gets an output of 0 — not NaN = 0/0 — and no gradient, which is exactly what PyTorch's
SDPA does with a boolean mask, so both paths agree there too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from minilm.config import Attention, ModelConfig


# --------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------
def causal_keep(T: int, S: int, device: torch.device | None = None) -> Tensor:
    """(T, S) bool: query t (absolute position S - T + t) sees keys 0 … S - T + t.

    With no cache S == T and this is the lower triangle; with a KV cache of S - T earlier
    tokens the triangle is aligned to the bottom-right corner.
    """
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def build_keep_mask(attention_mask: Tensor | None, T: int, S: int, causal: bool,
                    device: torch.device | None = None) -> Tensor | None:
    """Combine causality and key padding into one boolean mask, or None when nothing is masked.

    attention_mask: (B, S) with 1 for real tokens and 0 for padding (keys).
    returns: (B, 1, T, S), (1, 1, T, S) or None.
    """
    keep = None
    if causal:
        keep = causal_keep(T, S, device)[None, None]                     # (1, 1, T, S)
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :].bool()                      # (B, 1, 1, S)
        keep = keys if keep is None else keep & keys
    return keep


# --------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------
def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the survivors by 1 / (1 - p).

    The same function as F.dropout (inverted dropout: the expected value is unchanged).
    On CPU, F.dropout draws its mask with bernoulli_, which generates a random double
    (two 32-bit random numbers) per element, one element at a time; a uniform float
    needs one, so drawing the mask as `rand >= p` costs about half, and the random
    numbers are a large share of a CPU training step. Elsewhere (CUDA: one fused kernel)
    F.dropout is used as it is.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    # float32 uniforms whatever x's dtype: a bf16 uniform is too coarse to hit p exactly
    scale = torch.rand_like(x, dtype=torch.float32).ge_(p).mul_(1.0 / (1.0 - p))  # 1/(1-p) kept, 0 dropped
    return x * scale.to(x.dtype)


def keep_for_rows(keep: Tensor | None, is_causal: bool, rows: Tensor, T: int, S: int) -> Tensor | None:
    """The mask of only some query rows: rows (B, M) positions -> (B, 1, M, S), or None.

    A key-padding mask (…, 1, S) is the same for every query and stays as it is; a mask
    with a query axis (causal) keeps the rows of the selected queries.
    """
    if is_causal:
        keep = causal_keep(T, S, rows.device)[None, None]                  # (1, 1, T, S)
    if keep is None or keep.size(2) == 1:
        return keep
    keep = keep.expand(rows.size(0), 1, T, S)
    return keep.gather(2, rows[:, None, :, None].expand(-1, 1, -1, S))      # (B, 1, M, S)


# --------------------------------------------------------------------------------------
# the two attention programs
# --------------------------------------------------------------------------------------
def manual_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None,
                     is_causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """softmax(Q Kᵀ / √hs + mask) · V, step by step.

    q: (B, nh, T, hs); k, v: (B, nkv, S, hs) with nh a multiple of nkv.
    keep: bool, broadcastable to (B, nh, T, S). is_causal: apply the causal mask here.
    returns: (B, nh, T, hs)
    """
    n_rep = q.size(1) // k.size(1)
    if n_rep > 1:  # grouped-query: query head h uses key/value head h // n_rep
        k = repeat(k, "b g s hs -> b (g r) s hs", r=n_rep)
        v = repeat(v, "b g s hs -> b (g r) s hs", r=n_rep)
    if is_causal:
        keep = causal_keep(q.size(2), k.size(2), q.device)
    # scaling q (T·hs numbers) instead of the scores (T·S numbers) is the same product, cheaper
    scores = (q / math.sqrt(q.size(-1))) @ k.transpose(-2, -1)           # (B, nh, T, S)
    if keep is not None:
        hidden = ~keep
        # in place: the matmul's backward needs q and k, not its output, so no copy is needed
        scores = scores.masked_fill_(hidden, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)                                       # rows sum to 1
    # A row with no visible key: all weights 0 (else uniform garbage). A causal row always
    # sees its own key, and then its hidden weights are already exactly 0 (exp underflows).
    if keep is not None and not is_causal:
        probs = probs.masked_fill(hidden, 0.0)
    probs = dropout(probs, dropout_p)
    return probs @ v                                                     # (B, nh, T, hs)


# Up to this many keys, half-precision CPU training runs SDPA in float32 (see sdpa_attention).
# Measured (`python -m minilm.bench --workloads attention --dtype bf16`, head sizes 32 and 64):
# 1.1-6x faster up to 256 keys; at 512 between equal and 13% slower, at 1024-2048 up to 20% slower.
CPU_HALF_SDPA_MAX_LEN = 256


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None = None,
                   is_causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """The same function through PyTorch's fused kernel. Shapes as `manual_attention`.

    With `is_causal` and no mask, no (T, S) tensor is built at all — the kernel applies
    causality itself. GQA is handled inside the kernel (no repeated K/V in memory).

    Two CPU cases where the kernel is not the fast choice:
      * PyTorch has no fused CPU kernel with attention dropout: SDPA then runs its
        reference composite, the manual program plus passes that guard against fully
        masked rows. The manual program computes the same thing faster, so it is used.
      * The CPU flash kernel's backward is slow for bfloat16/float16 inputs at short
        sequences: forward + backward of 64 × 8 heads × 128 × 32 takes 92 ms in bf16
        and 36 ms with the same inputs in float32 (147 vs 24 ms at T = 16; torch 2.13,
        2 cores). So when a gradient is needed and S ≤ CPU_HALF_SDPA_MAX_LEN, the
        kernel runs in float32 and its output is cast back.
    """
    if dropout_p > 0.0 and q.device.type == "cpu":
        return manual_attention(q, k, v, keep, is_causal, dropout_p)
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad
            and k.size(2) <= CPU_HALF_SDPA_MAX_LEN):
        with torch.autocast("cpu", enabled=False):   # autocast would send the kernel back to bf16
            return sdpa_attention(q.float(), k.float(), v.float(), keep, is_causal).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p,
                                          is_causal=is_causal, enable_gqa=q.size(1) != k.size(1))


ATTENTION = {"manual": manual_attention, "sdpa": sdpa_attention}


# --------------------------------------------------------------------------------------
# rotary position embedding (RoPE, Su et al. 2021), the Llama / GPT-NeoX convention
# --------------------------------------------------------------------------------------
def rope_tables(max_len: int, head_size: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables, (max_len, hs) each.

    Channel pair (i, i + hs/2) rotates by angle pos · θ^(-2i/hs): low channels spin fast,
    high ones slowly, so q·k depends on the relative offset of the two positions only.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hs/2)
    angles = torch.cat([angles, angles], dim=-1)                                # (max_len, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, h, T, hs) by the angles of its positions; cos, sin: (B or 1, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated_half * sin).to(x.dtype)


# --------------------------------------------------------------------------------------
# KV cache for generation
# --------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated.

    k, v: (L, B, nkv, max_len, hs). `length` tokens are filled; a forward over T new
    tokens writes positions length … length+T-1 in every layer, then `advance(T)`.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new k, v (B, nkv, T, hs); return all of them so far (…, S, hs)."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


# --------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """x (B, T, d) -> fused QKV projection -> per-head attention -> output projection."""

    def __init__(self, config: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_size = config.n_heads, config.n_kv_heads, config.head_size
        self.layer_index = layer_index
        self.attn_dropout = config.attn_dropout
        # one matmul for Q, K and V (nh + 2·nkv heads of size hs): fewer, larger kernels
        self.qkv = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_size,
                             bias=config.bias)
        self.out = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: Tensor, keep: Tensor | None, is_causal: bool,
                rope: tuple[Tensor, Tensor] | None = None, cache: KVCache | None = None,
                attention: Attention = "sdpa", rows: Tensor | None = None) -> Tensor:
        """x (B, T, d) -> (B, T, d); with `rows` (B, M), only the queries at those positions
        are computed (keys and values still come from all T) -> (B, M, d). `keep` must then
        already be the mask of those M query rows."""
        q_size, kv_size = self.n_heads * self.head_size, self.n_kv_heads * self.head_size
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = rearrange(q, "b t (h hs) -> b h t hs", h=self.n_heads)        # (B, nh, T, hs)
        k = rearrange(k, "b t (h hs) -> b h t hs", h=self.n_kv_heads)     # (B, nkv, T, hs)
        v = rearrange(v, "b t (h hs) -> b h t hs", h=self.n_kv_heads)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if rows is not None:                                              # (B, nh, M, hs)
            q = q.gather(2, rows[:, None, :, None].expand(-1, q.size(1), -1, q.size(3)))
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)                   # (B, nkv, S, hs)
        dropout_p = self.attn_dropout if self.training else 0.0
        y = ATTENTION[attention](q, k, v, keep, is_causal, dropout_p)     # (B, nh, T or M, hs)
        return self.out(rearrange(y, "b h t hs -> b t (h hs)"))
