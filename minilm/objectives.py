"""Training objectives that are not the model: MLM masking, token losses, bits per character.

The model maps token ids to logits; this module turns batches into what the model
must predict and turns the model's predictions into numbers:

    masked LM  : input_ids ──mask_tokens──► (masked_input_ids, labels)   BERT, dynamic
    causal LM  : the shift y[t] = x[t+1]: done by the data (minilm.data.CLMBatches),
                 or shift_for_clm for whole padded sequences
    ELECTRA    : masked positions ──replace_with_samples──► the generator's tokens in place
    both       : logits, labels ──summed_nll──► (total nats, number of targets)
                 total nats ──bits_per_char / perplexity──► the numbers we report
    training   : h, W, labels ──linear_cross_entropy──► CE(h Wᵀ, labels), a chunk of rows
                 at a time, so the (N, V) logits never exist whole (LinearCrossEntropy)

Positions that carry no target have the label IGNORE_INDEX (-100), the value
`torch.nn.functional.cross_entropy` skips by default.

The masking and loss functions are pure functions of their arguments (plus an optional
torch `Generator` for the randomness), so they are easy to test and to reproduce; only
`matmul_t`, the LM head's matmul, also looks at autocast and grad mode to pick its kernel.
"""

from __future__ import annotations

import functools
import math
import platform
from collections.abc import Iterable

import torch
import torch.nn.functional as F

# Label of a position that is not predicted (not masked, padding, the last partial
# window's tail, ...). -100 is cross_entropy's default ignore_index.
IGNORE_INDEX = -100

# BERT's masking recipe (Devlin et al., 2019, section 3.1 and appendix C.2).
MASK_PROB = 0.15          # share of maskable positions chosen as prediction targets
MASK_TOKEN_SHARE = 0.8    # of the chosen: replaced by [MASK]
RANDOM_TOKEN_SHARE = 0.1  # of the chosen: replaced by a random (non-special) token
# ... and the remaining 10% keep their original token.

# ELECTRA's weight of the replaced-token-detection loss against the generator's MLM loss
# (Clark et al., 2020, section 3.1: λ = 50; the binary loss is much smaller per token).
RTD_WEIGHT = 50.0


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: Iterable[int],
    attention_mask: torch.Tensor | None = None,
    mask_prob: float = MASK_PROB,
    word_starts: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT dynamic masking: choose targets, corrupt the input, return (inputs, labels).

    The rule, applied independently to every position of `input_ids` (shape (B, T)):

    1. A position is *maskable* when its token is not special (not in `special_ids`,
       which must include [PAD], [CLS], [SEP], [MASK], ...) and, if `attention_mask`
       is given, the mask is 1 there. Special tokens and padding are never chosen.
    2. Each maskable position is *chosen* with probability `mask_prob` (0.15), an
       independent Bernoulli draw, so about 15% of the maskable positions are chosen.
       Whole-word masking (`word_starts` given): the draw is made once per word and
       every piece of a chosen word is chosen, so "▁un" "believ" "able" is never
       half-masked and the model cannot fill in a word from its own other pieces.
       A word is a word-start token and the non-start tokens after it (a document's
       first word, which no space precedes, joins the [CLS] or [SEP] before it, which
       itself is never chosen).
    3. A chosen position's input becomes
         [MASK]                      with probability 0.8,
         a uniformly random token    with probability 0.1 (drawn from the non-special ids),
         its original token          with probability 0.1.
       The unchanged 10% stop the model from learning "only [MASK] positions matter".
    4. labels[b, t] = the original token at chosen positions, IGNORE_INDEX elsewhere.

    "Dynamic" means the training loop calls this on every step, so the same sequence
    gets a different mask each time it is seen (RoBERTa), not one mask fixed at
    preprocessing time.

    Args:
        input_ids: (B, T) integer tensor of token ids; not modified.
        vocab_size: V; random replacements are drawn from [0, V) minus `special_ids`.
        mask_id: the id of [MASK].
        special_ids: ids that are never chosen and never drawn as random replacements.
        attention_mask: optional (B, T), 1 for real tokens and 0 for padding.
        mask_prob: probability of choosing a maskable position (a word, with word_starts).
        word_starts: optional bool (V,), True for the ids that begin a word (a SentencePiece
            piece starting with "▁", and the special tokens): whole-word masking.
        generator: optional torch.Generator (on input_ids' device) for reproducibility.

    Returns:
        (masked_input_ids, labels), both (B, T) int64 on input_ids' device.
    """
    device = input_ids.device
    input_ids = input_ids.long()
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=device)

    maskable = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        maskable &= attention_mask.bool()

    # Step 2: choose targets. One uniform draw per position (or per word) decides "chosen".
    if word_starts is None:
        chosen = torch.rand(input_ids.shape, generator=generator, device=device) < mask_prob
    else:
        chosen = choose_whole_words(input_ids, word_starts.to(device), mask_prob, generator)
    chosen &= maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    # Step 3: a second, independent uniform draw splits the chosen positions 80/10/10.
    action = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask_token = chosen & (action < MASK_TOKEN_SHARE)
    to_random_token = chosen & (action >= MASK_TOKEN_SHARE) & (action < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)

    # Random replacements come from the ordinary vocabulary only: a random [CLS] or
    # [PAD] in the middle of a sentence would teach the model nothing useful.
    ordinary = torch.ones(vocab_size, dtype=torch.bool, device=device)
    ordinary[special[special < vocab_size]] = False
    ordinary_ids = torch.nonzero(ordinary).squeeze(1)
    pick = torch.randint(len(ordinary_ids), input_ids.shape, generator=generator, device=device)
    random_tokens = ordinary_ids[pick]

    masked = input_ids.clone()
    masked[to_mask_token] = mask_id
    masked[to_random_token] = random_tokens[to_random_token]
    return masked, labels


def choose_whole_words(input_ids: torch.Tensor, word_starts: torch.Tensor, mask_prob: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """(B, T) bool: each word chosen with probability mask_prob, all its pieces with it.

    Numbering the words of the whole batch in reading order, word[b, t] is the number of
    word starts at or before (b, t), so every piece gets the number of the word it
    continues; the first position of each row starts a word, so no word spans two rows.
    """
    starts = word_starts[input_ids]                              # (B, T) bool
    starts[:, 0] = True
    word = starts.flatten().cumsum(0).view_as(input_ids) - 1     # (B, T) word number
    draw = torch.rand(int(word[-1, -1]) + 1, generator=generator, device=input_ids.device)
    return draw[word] < mask_prob


def replace_with_samples(input_ids: torch.Tensor, labels: torch.Tensor, generator_logits: torch.Tensor,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ELECTRA's corruption (Clark et al., 2020): the masked positions get tokens sampled
    from a small generator; the discriminator then tells replaced tokens from original ones.

        x_t        = labels_t if position t was chosen by mask_tokens, else input_ids_t
        x'_t       ~ softmax(generator_logits_t)   at chosen positions     (no gradient)
        x'_t       = x_t                            elsewhere
        replaced_t = [x'_t != x_t]     a sample that happens to be the original counts as original

    Args:
        input_ids: (B, T) the masked input (as returned by mask_tokens).
        labels: (B, T) original ids at the chosen positions, IGNORE_INDEX elsewhere.
        generator_logits: (N_chosen, V), one row per chosen position in row-major order
            (what MaskedLM returns when given labels).
        generator: optional torch.Generator for the sampling (e.g. a fixed one for evaluation).

    Returns:
        (corrupted_ids (B, T) int64, replaced (B, T) bool).
    """
    chosen = labels != IGNORE_INDEX
    original = torch.where(chosen, labels, input_ids)
    probs = generator_logits.detach().float().softmax(dim=-1)                  # (N, V)
    samples = torch.multinomial(probs, 1, generator=generator).squeeze(1)     # (N,)
    corrupted = original.clone()
    corrupted[chosen] = samples
    return corrupted, corrupted != original


def shift_for_clm(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM labels aligned with the inputs: labels[:, t] = input_ids[:, t+1].

    The model at position t has seen input_ids[:, :t+1] and must predict the next
    token, so the target of position t is input_ids[:, t+1]. The last position has
    no next token, and a position whose next token is padding (attention_mask 0)
    has nothing to predict; both get IGNORE_INDEX.

    (minilm.data.CLMBatches already returns (x, y) shifted this way; this function is
    for batches that arrive as whole sequences, e.g. padded prompts or fine-tuning.)

    Args:
        input_ids: (B, T) token ids.
        attention_mask: optional (B, T), 1 for real tokens, 0 for padding.

    Returns:
        labels, (B, T) int64.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        next_is_padding = torch.zeros_like(labels, dtype=torch.bool)
        next_is_padding[:, :-1] = attention_mask[:, 1:] == 0
        labels[next_is_padding] = IGNORE_INDEX
    return labels


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Total negative log-likelihood over the target positions, and how many there are.

    total = sum over positions with labels != IGNORE_INDEX of  -log softmax(logits)[label]

    Summing (rather than averaging) lets an evaluation add up nats over many batches
    of different sizes and divide once at the end, so every target counts equally.

    Args:
        logits: (..., V) float tensor (e.g. (B, T, V)).
        labels: (...) integer tensor of target ids or IGNORE_INDEX (e.g. (B, T)).

    Returns:
        (total_nats as a 0-dim float32 tensor, number of target positions as an int).
    """
    vocab = logits.shape[-1]
    total = F.cross_entropy(
        logits.reshape(-1, vocab).float(),
        labels.reshape(-1).long(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = int((labels != IGNORE_INDEX).sum())
    return total, count


def matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ bᵀ for a (m, k), b (n, k) — the product a linear layer computes (x Wᵀ) — through
    oneDNN on an x86 CPU in float32.

    Why not plain `a @ b.t()`: PyTorch multiplies float32 matrices on the CPU with MKL,
    and MKL runs its AVX2 code on AMD processors; oneDNN, which ships inside PyTorch too,
    picks its kernel by the instruction sets the CPU has and uses AVX-512. On an AMD EPYC
    (Zen 5) that made the LM head's products 2-2.5x faster (512x256 @ 256x8192 on one
    core: 24 ms MKL, 10 ms oneDNN). It is the same float32 arithmetic summed in another
    order, so results agree to float rounding. The entry point is
    `torch.ops.mkldnn._linear_pointwise(x, w) = x @ wᵀ`, the CPU linear torch.compile
    uses. It reads b fastest when b is contiguous (n, k) and copies it otherwise, so the
    callers pass their operands in that layout. It has no autograd: it is for code that
    makes its own gradients (LinearCrossEntropy). Everything else — CUDA, bf16 or
    autocast, a tensor that wants a gradient, a build without oneDNN, code being traced by
    torch.compile (which picks its own kernels, and whose lowering of this op expects
    frozen weights) — gets `a @ b.t()`.
    """
    if (a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and a.dim() == b.dim() == 2
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
            and _onednn_linear_available()):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.t()


@functools.cache
def _onednn_linear_available() -> bool:
    """The private op exists, runs, and gives a @ bᵀ on a small probe. A torch release that
    changes or drops it makes this False, and matmul_t falls back to the plain product."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    # fixed values, not torch.randn: the probe must not draw from the global RNG (resume)
    a = torch.arange(24, dtype=torch.float32).reshape(3, 8).sin()
    b = torch.arange(40, dtype=torch.float32).reshape(5, 8).cos()
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            out = torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
            return out.shape == (3, 5) and bool(torch.allclose(out, a @ b.t(), atol=1e-5))
    except (AttributeError, RuntimeError, TypeError):
        return False


class LinearCrossEntropy(torch.autograd.Function):
    """mean −log softmax(h Wᵀ)[label], a few rows at a time, without keeping the logits.

    A causal LM's head h (N, d) @ Wᵀ (d, V) makes N·V logits, the largest tensor of
    a training step (2,048 tokens x a 50k vocabulary = 400 MB in float32), and plain
    autograd keeps it, and its log-softmax, for the backward pass. Here the forward
    pass walks over chunks of rows and finishes each chunk's gradient on the spot:

        z = h_c Wᵀ                                   (c, V)  logits of the chunk
        loss_c = Σ_rows s · (logsumexp(z) − z[label])      s = 1 / number of targets, 0 if ignored
        ∂loss/∂z = s · (softmax(z) − onehot(label))  (c, V)
        ∂loss/∂h_c = ∂z · W        ∂loss/∂Wᵀ += (s h_c)ᵀ · (softmax(z) − onehot(label))

    so only one chunk of logits exists at any time. backward() then just scales the
    stored gradients by the incoming one. Rows labelled IGNORE_INDEX count for
    nothing. Same result as F.cross_entropy(h @ W.T, labels), in the same matmuls.

    The three matmuls are most of the cost; they go through `matmul_t` (oneDNN on a
    CPU), each with its second operand contiguous: W, Wᵀ (one copy per call) and the
    chunk's softmax itself, which is why the weight's gradient is accumulated
    transposed, (d, V). The row factor s is applied to the narrow (c, d) side of each
    product rather than to the (c, V) block, one pass over memory fewer.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_rows: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        keep = labels != IGNORE_INDEX                                          # (N,)
        count = keep.sum().clamp(min=1)
        targets = labels.clamp(min=0)
        row_scale = (keep / count)[:, None]                                    # (N, 1) s
        total = h.new_zeros((), dtype=torch.float32)
        grad_h = grad_w_t = None
        if want_grad:
            weight_t = weight.t().contiguous()                                 # (d, V)
            grad_h = torch.empty_like(h)                                       # (N, d)
            grad_w_t = weight.new_zeros(weight_t.shape)                        # (d, V)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = matmul_t(h[rows], weight).float()                         # (c, V)
            picked = logits.gather(1, targets[rows, None])                     # (c, 1) z[label]
            # logsumexp(z) = max + log Σ exp(z − max), in place: the exps become the softmax
            top = logits.amax(-1, keepdim=True)                                # (c, 1)
            exps = logits.sub_(top).exp_()                                     # (c, V)
            sums = exps.sum(-1, keepdim=True)                                  # (c, 1)
            total += ((top + sums.log() - picked) * row_scale[rows]).sum()
            if want_grad:
                grad_z = exps.div_(sums)                                       # softmax(z)
                grad_z[torch.arange(len(grad_z)), targets[rows]] -= 1.0        # − onehot(label)
                grad_z = grad_z.to(weight.dtype)      # float32 stays; bf16 weights get bf16 (autocast casts)
                s = row_scale[rows].to(h.dtype)                                # (c, 1)
                grad_h[rows] = matmul_t(grad_z, weight_t) * s                  # s (softmax − onehot) W
                grad_w_t += matmul_t((h[rows] * s).t(), grad_z.t())            # (s h_c)ᵀ (softmax − onehot)
        ctx.save_for_backward(grad_h, None if grad_w_t is None else grad_w_t.t().contiguous())   # ∂loss/∂W
        return total

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None


@torch.compiler.disable
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_rows: int = 512) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, labels) for h (..., d), weight (V, d), labels (...),
    computed chunk by chunk (LinearCrossEntropy): the (..., V) logits never exist whole.

    torch.compile leaves it alone (one graph break, after the last block): its loop of
    matmuls gains nothing from fusion, and eager it keeps the oneDNN products of matmul_t."""
    return LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), chunk_rows)


def bits_per_char(total_nats: float, n_chars: int) -> float:
    """Bits per character:  bpc = total_nats / n_chars / ln 2.

    total_nats is the summed negative log-likelihood (natural log) of *every* token of
    a text, and n_chars the number of characters of that same text.

    Why characters: the loss per token depends on the tokenizer — a tokenizer with
    longer tokens has fewer, harder tokens, so "nats per token" of two runs with
    different tokenizers (or a character-level model) cannot be compared. The total
    nats for a text is the model's code length for the whole text whatever the
    tokenization, and the character count of the text does not depend on the
    tokenizer; their ratio compares any two models on the same text. Dividing by
    ln 2 converts nats to bits.
    """
    if n_chars <= 0:
        raise ValueError(f"n_chars must be positive, got {n_chars}")
    return float(total_nats) / n_chars / math.log(2)


def perplexity(mean_nats: float) -> float:
    """Perplexity = exp(mean negative log-likelihood per token, in nats).

    The "effective number of equally likely choices" per token. Like nats per token
    it depends on the tokenizer; use bits_per_char to compare across tokenizers.
    """
    try:
        return math.exp(mean_nats)
    except OverflowError:  # mean_nats > ~709, e.g. a diverged run
        return math.inf
