"""Text generation with a causal LM (KV cache, sampling) and fill-mask with a masked LM.

Autoregressive generation repeats one step: predict the distribution of the next token
from everything so far, pick a token from it, append it, go again.

    x_{t+1} ~ p(· | x_1 … x_t) = softmax(z_t / T),   z_t = lm_head(h_t)   (V logits)

The KV cache
------------
Without a cache, step t re-runs the whole Transformer over all t tokens, although the
keys and values of tokens 1 … t-1 are exactly what the previous step computed (causal
attention: an earlier token never looks at a later one). The cache keeps them, per layer,
in a preallocated (L, B, nkv, max_len, hs) buffer (`minilm.attention.KVCache`). Then:

    prefill:  one forward over the T0 prompt tokens, writing their keys/values
    decode:   one forward over the ONE newest token, attending to all cached keys

so a step costs O(S) attention work instead of re-encoding O(S) tokens through every
layer. Both programs compute the same function; tests/test_generate.py checks that
greedy decoding with and without the cache agrees token for token.

Only the last position's hidden state is ever needed to predict the next token, so we
call `model.transformer(...)` and apply the (d × V) LM head to h[:, -1] alone, instead of
`model(...)`, which would project all T positions.

Batches of prompts of different lengths
---------------------------------------
Prompts are LEFT-padded, so that every row's newest token sits in the last column and
one new column is appended per step:

    [PAD] [PAD]  The   cat         attention_mask  0 0 1 1
     A     big   red   dog                         1 1 1 1

The mask hides the pads from attention, and position ids count real tokens only,
position_ids = cumsum(mask) - 1 (clamped at 0 on the pads), so a padded row sees exactly
the positions it would see alone and generates the same text.

The context limit
-----------------
A model knows positions 0 … max_seq_len-1 only. Without the cache, a longer generation
keeps a sliding window of the last max_seq_len tokens, re-numbered from position 0, each
step. With the cache that is impossible — cached keys carry the absolute position they
were computed at (RoPE rotation, or the learned position added to the embedding), and a
sliding window shifts every position by one each step, so every cached key would have to
be recomputed. Therefore `generate(use_cache=True)` uses the cache while the sequence fits
the context and switches to the uncached sliding-window program from the step where it no
longer does (the same results as uncached throughout; only the steps past the context pay
for re-encoding).

Fill-mask
---------
A masked LM (BERT) predicts, at every [MASK] position i of "[CLS] text [SEP]",
p(x_i | all the other tokens) = softmax(head(h_i)); `fill_mask` reports the k most
likely tokens per [MASK].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from minilm.attention import KVCache
from minilm.errors import MinilmError
from minilm.model import CausalLM, MaskedLM


# --------------------------------------------------------------------------------------
# sampling: logits (B, V) -> next token ids (B,)
# --------------------------------------------------------------------------------------
def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide the logits by the temperature T > 0.

        p_i = exp(z_i / T) / Σ_j exp(z_j / T)

    T < 1 sharpens the distribution (T → 0 puts all mass on the argmax: greedy), T > 1
    flattens it (T → ∞ tends to uniform), T = 1 leaves the model's distribution as is.
    The row maximum is subtracted first (softmax does not change), so a tiny T gives very
    negative logits, never inf − inf = NaN.
    """
    return (logits - logits.amax(dim=-1, keepdim=True)) / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row, set the rest to -inf (probability 0).

    logits: (..., V). Tokens tied with the k-th largest logit are kept too, so a row may
    keep slightly more than k tokens; k >= V keeps everything.
    """
    if k >= logits.size(-1):
        return logits
    kth_largest = logits.topk(k, dim=-1).values[..., -1:]               # (..., 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely
    tokens whose total probability reaches p, set the rest to -inf.

    Sort the probabilities in decreasing order, π_1 ≥ π_2 ≥ … ≥ π_V. Token j is kept when
    the mass of the tokens ranked above it is still short of p:

        keep j  ⇔  Σ_{i<j} π_i < p

    which keeps tokens 1 … m for the smallest m with Σ_{i≤m} π_i ≥ p. The top token has
    nothing above it (sum 0 < p), so it is always kept. logits: (..., V); 0 < p ≤ 1.
    """
    if p >= 1.0:  # the whole distribution (and no rounding of the cumsum can drop a tail token)
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)          # (..., V) each
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs              # Σ_{i<j} π_i
    remove_sorted = mass_above >= p
    # back from sorted order to vocabulary order: remove[order[j]] = remove_sorted[j]
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise MinilmError for values that define no distribution."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise MinilmError(f"temperature={temperature}: use 0 (greedy) or a finite value > 0 such as 0.8")
    if top_k is not None and top_k < 1:
        raise MinilmError(f"top_k={top_k} keeps no token: use k >= 1, or no top-k filter")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise MinilmError(f"top_p={top_p} is outside (0, 1]: use a value such as 0.95, or 1.0 for no nucleus filter")


def sample_next_token(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, greedy: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row from next-token logits (B, V); returns ids (B,).

    greedy (or temperature 0): argmax_i z_i. Otherwise, in this order: divide by the
    temperature, keep the top-k logits, keep the top-p nucleus of what is left, then
    draw from softmax of the survivors with `generator` (seeded → reproducible).
    Neither filter ever removes the most likely token, so top_k=1 is greedy.
    """
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits.float(), temperature)  # fp32: softmax of bf16 logits is coarse
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)                                       # -inf -> probability 0
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------
@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() inside the block (no dropout), the previous train/eval mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count real tokens only: (B, S) mask -> (B, S) positions.

        position_ids = cumsum(mask) - 1, clamped at 0

    mask 0 0 1 1 1 -> positions 0 0 0 1 2: a left-padded row gets the positions it would
    have alone (the pads get 0, a valid index; attention ignores them anyway).
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def next_token_logits(model: CausalLM, input_ids: Tensor, attention_mask: Tensor,
                      position_ids: Tensor, cache: KVCache | None) -> Tensor:
    """Logits (B, V) for the token after the last column of input_ids (B, T).

    attention_mask covers every key: (B, cache.length + T) with a cache, (B, T) without.
    The LM head runs on the last position only: the others' predictions are not needed.
    """
    h = model.transformer(input_ids, attention_mask, position_ids=position_ids, cache=cache)  # (B, T, d)
    return model.lm_head(h[:, -1])                                                          # (B, V)


def _check_prompt(input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int, vocab_size: int) -> None:
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(f"input_ids must be (B, T0) with T0 >= 1, got shape {tuple(input_ids.shape)}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:       # the embedding lookup would fail with a bare IndexError
        raise ValueError(f"input_ids must be token ids in [0, {vocab_size}), got {low} … {high}: "
                         "were they made by this model's tokenizer?")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is negative")
    if attention_mask is None:
        return
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and input_ids "
                         f"{tuple(input_ids.shape)} differ in shape")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask must be LEFT-padded for generation (every row's last "
                         "token real): new tokens are appended after the last column")


@torch.no_grad()
def generate(model: CausalLM, input_ids: Tensor, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             eos_id: int | None = None, attention_mask: Tensor | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
    """Continue each prompt by up to max_new_tokens tokens; returns (B, T0 + n), n ≤ max_new_tokens.

    input_ids:      (B, T0) prompt ids, LEFT-padded when the prompts differ in length
    attention_mask: (B, T0) 1 = real token, 0 = pad; None = all real
    temperature, top_k, top_p, greedy, generator: see `sample_next_token`
                    (temperature 0 means greedy)
    eos_id:         a row that emits it is finished: it keeps its eos, and the columns
                    generated after it hold config.pad_token_id; the loop stops early
                    once every row is finished (n < max_new_tokens)
    use_cache:      prefill + one token per step with a KVCache while the sequence fits
                    config.max_seq_len; past it, the uncached program, which slides a window
                    of the last max_seq_len tokens (see the module docstring).

    Runs in eval mode without gradients, and restores the model's training mode after.
    """
    _check_prompt(input_ids, attention_mask, max_new_tokens, model.config.vocab_size)
    check_sampling_options(temperature, top_k, top_p)
    config = model.config
    batch_size, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    tokens, mask = input_ids, attention_mask.long()
    finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
    cache = None
    if use_cache and prompt_len <= config.max_seq_len:
        # the model is fed at most prompt_len + max_new_tokens - 1 tokens (the last sampled one
        # never), and the cache serves only while they fit the context
        cache = KVCache(config, batch_size, min(prompt_len + max_new_tokens - 1, config.max_seq_len),
                        device=input_ids.device, dtype=model.lm_head.weight.dtype)

    with evaluation_mode(model):
        for _ in range(max_new_tokens):
            if cache is not None and tokens.size(1) > config.max_seq_len:
                cache = None        # a cache cannot slide (see "The context limit"): re-encode from here
            if cache is not None:
                # Feed what the cache has not seen yet: the whole prompt on the first
                # step (prefill), then only the token appended by the previous step.
                new_ids = tokens[:, cache.length:]
                positions = positions_from_mask(mask)[:, cache.length:]
                logits = next_token_logits(model, new_ids, mask, positions, cache)
            else:
                # Re-encode everything, at most the last max_seq_len tokens (a sliding
                # window whose positions restart at 0, as in training).
                window_ids = tokens[:, -config.max_seq_len:]
                window_mask = mask[:, -config.max_seq_len:]
                logits = next_token_logits(model, window_ids, window_mask,
                                           positions_from_mask(window_mask), None)

            next_token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                           greedy=greedy, generator=generator)       # (B,)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished, config.pad_token_id)
                finished = finished | (next_token == eos_id)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
    return tokens


# --------------------------------------------------------------------------------------
# fill-mask
# --------------------------------------------------------------------------------------
@torch.no_grad()
def fill_mask(model: MaskedLM, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """The top_k candidates for every [MASK] in text, most likely first.

    The text is encoded as "[CLS] text [SEP]"; each literal "[MASK]" in it becomes the
    tokenizer's mask_id. For each mask position i (in order of appearance) returns
    [(token, p), …] with p = softmax(head(h_i)) of that token over the ordinary tokens
    (special tokens such as [PAD] or [SEP] are never MLM targets, so they are left out),
    sorted by decreasing p. A token is shown as `token_text` writes it (decoded; a leading
    space means it starts a word). `fill_in` writes the text with chosen candidates.

    tokenizer: a `tokenizer.Tokenizer` (callable BERT-style, with mask_id and decode).
    """
    if top_k < 1:
        raise MinilmError(f"top_k={top_k}: ask for at least 1 candidate per [MASK]")
    device = model.decoder.weight.device
    batch = tokenizer(text, return_tensors="pt")
    # In training a [MASK] replaced one whole token, and a word's token carries its own
    # leading space ("▁great"). So in "a [MASK] film" the space before [MASK] belongs to
    # the hidden word: drop its piece, or the model would be asked what follows a lone space.
    space = tokenizer.encode(" ")
    ids = batch["input_ids"][0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    if len(space) == 1:
        keep[:-1] = ~((ids[:-1] == space[0]) & (ids[1:] == tokenizer.mask_id))
    input_ids = ids[keep][None].to(device)                               # (1, T)
    token_type_ids = batch["token_type_ids"][0][keep][None].to(device)   # (1, T)
    is_mask = input_ids[0] == tokenizer.mask_id                          # (T,)
    if not bool(is_mask.any()):
        raise MinilmError(f"no [MASK] in {text!r}: write [MASK] where a token should be predicted, "
                          "e.g. \"The [MASK] sat on the mat.\"")
    if input_ids.size(1) > model.config.max_seq_len:
        raise MinilmError(f"the text is {input_ids.size(1)} tokens with [CLS] and [SEP]; the model "
                          f"reads at most {model.config.max_seq_len}: shorten it")

    with evaluation_mode(model):
        h = model.transformer(input_ids, token_type_ids=token_type_ids)  # (1, T, d)
        logits = model.head(h[0, is_mask]).float()                       # (n_masks, V): masks only
    special = sorted(i for i in tokenizer.special_ids if i < logits.size(-1))
    logits[:, special] = float("-inf")
    probs = logits.softmax(dim=-1)
    top = probs.topk(min(top_k, probs.size(-1) - len(special)), dim=-1)  # sorted, largest first; no specials

    results = []
    for values, ids in zip(top.values.tolist(), top.indices.tolist()):
        results.append([(token_text(tokenizer, i), p) for i, p in zip(ids, values)])
    return results


def fill_in(text: str, fills: list[str]) -> str:
    """text with its k-th "[MASK]" replaced by fills[k], by position. As fill_mask reads the
    text, the space before a mask is dropped: a fill that starts a word brings its own
    leading space, one that does not (punctuation, the rest of a word) attaches directly.
    fill_in("[MASK] cat sat on the [MASK]", [" The", "."]) = "The cat sat on the."."""
    parts = text.split("[MASK]")
    out = parts[0]
    for fill, after in zip(fills, parts[1:]):
        out = out.removesuffix(" ")
        if not out:                 # at the start of the text a word needs no space before it
            fill = fill.removeprefix(" ")
        out += fill + after
    return out


def token_text(tokenizer, token_id: int) -> str:
    """One token as text: decoded (" cat", "[SEP]"), or its piece ("<0xE4>") when it is a
    single byte of a multi-byte character, which cannot be decoded on its own (→ "�")."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return tokenizer.id_to_piece(token_id) if "\ufffd" in text else text
