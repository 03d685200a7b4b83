"""Local edit masks from a model's own attention (TurboEdit §3.5, prompt-to-prompt local
blend), torch only.

The pieces, in the order the Attention Mask Blend node uses them:

* tokens: ``flatten_tokens`` turns a tokenizer's output (chunks of ``(id, weight, ...)``)
  into a flat list whose index is the token's position in the conditioning;
  ``changed_tokens`` finds the positions that exist in only one of two prompts (a
  ``difflib`` alignment of the token ids, specials ignored); ``word_tokens`` the positions
  of named words; ``select_tokens`` does either and notes when nothing is selected;
  ``conditioning_weights`` makes the 0/1 weight vector over conditioning positions;
  ``describe_tokens`` writes the selected tokens as words.
* which latent and which layers: ``choose_step`` (a latent of the inverted trajectory),
  ``pick_blocks`` (joint-attention blocks to read), ``pick_resolution`` (cross-attention
  layers at the grid closest to 16x16).
* probabilities: ``attention_to_tokens`` sums, over heads and selected tokens, the
  softmax attention probabilities of queries to keys, in chunks of queries so that
  the logits held at once stay under ``max_elements`` (cross attention: all keys are
  text; joint attention: text keys are a slice of the keys, image queries a slice of
  the queries, the softmax runs over all keys); ``AttentionMaps`` collects them per
  prompt and grid during a model call and averages the layers.
* maps to masks: ``token_grid``, ``resize_maps``, ``normalise_by_max``,
  ``threshold_mask``, ``dilate_mask``, ``blur_mask``, ``fit_user_mask``,
  ``combine_masks``, ``upscale_mask``; ``check_mask_options`` validates them once and
  ``mask_from_maps`` chains them.

Masks are (B, h, w) float tensors in [0, 1]; maps are non-negative (B, h, w) tensors.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from .errors import InversionInputError

COMBINE_MODES = ("replace", "union", "intersect")
DEFAULT_THRESHOLD = 0.7  # editing benchmark (docs/editing.md): the UNet path localises from 0.7; Flux is best at 0.3-0.45
DEFAULT_MAX_ELEMENTS = 1 << 25  # float32 logits held at once: 128 MiB
TARGET_GRID = 16                # TurboEdit / prompt-to-prompt: cross-attention at ~16x16
MAX_BLOCKS = 4                  # joint-attention blocks read (second half of the stack)


# --------------------------------------------------------------------------- tokens

def token_key(token):
    """A hashable, comparable key for one token: its integer id, or (for an embedding
    tensor, e.g. a textual inversion) its shape and a checksum."""
    if isinstance(token, torch.Tensor):
        if token.numel() == 1:
            return int(token.item())
        flat = token.detach().float().flatten()
        return ("embedding", tuple(token.shape), round(float(flat.sum()), 4), round(float(flat.abs().sum()), 4))
    try:
        return int(token)
    except (TypeError, ValueError):
        return ("token", repr(token))


def flatten_tokens(chunks: Iterable) -> list:
    """Token keys of a tokenizer's output for one encoder: a list of chunks (ComfyUI:
    77-token chunks for CLIP, one chunk for T5), each a list of ``(id, weight)`` or
    ``(id, weight, word_id)`` tuples (bare ids are accepted too). Position i of the
    result is position i of the encoder's output sequence."""
    keys = []
    for chunk in chunks:
        for item in chunk:
            token = item[0] if isinstance(item, (tuple, list)) else item
            keys.append(token_key(token))
    return keys


def _content(keys: Sequence, special: set) -> tuple[list, list]:
    positions = [i for i, k in enumerate(keys) if k not in special]
    return positions, [keys[i] for i in positions]


def changed_tokens(source: Sequence, target: Sequence, special: Iterable = ()) -> tuple[list[int], list[int]]:
    """Positions of the tokens that exist only in ``source`` and only in ``target``.

    The two token sequences (special tokens such as start/end/padding left out) are
    aligned with ``difflib.SequenceMatcher``; tokens outside the matching blocks are
    the changed ones ("a cat" -> "a dog": cat / dog; "a cat" -> "a red cat": - / red).
    Returns (source positions, target positions), as positions in the full sequences.
    """
    special = set(special)
    src_pos, src = _content(source, special)
    tgt_pos, tgt = _content(target, special)
    matcher = difflib.SequenceMatcher(a=src, b=tgt, autojunk=False)
    src_keep, tgt_keep = set(), set()
    for block in matcher.get_matching_blocks():
        src_keep.update(range(block.a, block.a + block.size))
        tgt_keep.update(range(block.b, block.b + block.size))
    return ([p for i, p in enumerate(src_pos) if i not in src_keep],
            [p for i, p in enumerate(tgt_pos) if i not in tgt_keep])


def word_tokens(tokens: Sequence, words: Sequence[Sequence], special: Iterable = ()) -> tuple[list[int], list[int]]:
    """Positions in ``tokens`` of every occurrence of each word (a word given as its own
    token keys, e.g. the word tokenised alone, specials left out).
    Returns (positions, indices of the words that were found)."""
    special = set(special)
    found_positions, found_words = set(), []
    keys = list(tokens)
    for w, word in enumerate(words):
        word = [k for k in word if k not in special]
        if not word:
            continue
        n = len(word)
        hit = False
        for start in range(len(keys) - n + 1):
            if keys[start:start + n] == word:
                found_positions.update(range(start, start + n))
                hit = True
        if hit:
            found_words.append(w)
    return sorted(found_positions), found_words


def parse_words(text: str) -> list[str]:
    """Comma-separated words (or phrases) -> stripped, non-empty strings."""
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def select_tokens(source: Sequence, target: Sequence, special: Iterable = (),
                  words: Sequence[Sequence] | None = None,
                  word_names: Sequence[str] | None = None) -> tuple[list[int], list[int], list[str]]:
    """The positions whose attention makes the mask: the named ``words`` (token keys per
    word) in either prompt when given, else the tokens changed between the prompts.

    Returns (source positions, target positions, warnings). An empty selection is
    not an error: a warning says so and the mask will be empty."""
    special = set(special)
    notes = []
    if words:
        src, found_src = word_tokens(source, words, special)
        tgt, found_tgt = word_tokens(target, words, special)
        names = list(word_names) if word_names is not None else [str(i) for i in range(len(words))]
        missing = [names[i] for i in range(len(words)) if i not in found_src and i not in found_tgt]
        if missing:
            notes.append(f"words: {', '.join(repr(m) for m in missing)} not found in either prompt")
        if not src and not tgt:
            notes.append("words: none of the words occur in the prompts; the attention mask is empty")
    else:
        src, tgt = changed_tokens(source, target, special)
        if not src and not tgt:
            notes.append("target_prompt: tokenises the same as source_prompt (identical prompts, no changed "
                         "tokens); the attention mask is empty. Change the prompt or name words to use.")
    return src, tgt, notes


def position_weights(positions: Iterable[int], length: int) -> torch.Tensor:
    """0/1 float weights over ``length`` conditioning positions (positions beyond it are
    dropped; the caller reports them)."""
    weights = torch.zeros(length)
    idx = [p for p in positions if 0 <= p < length]
    if idx:
        weights[idx] = 1.0
    return weights


def conditioning_weights(positions: Sequence[int], length: int, name: str) -> tuple[torch.Tensor | None, list[str]]:
    """0/1 weights over a conditioning of ``length`` tokens for the selected ``positions``
    (None when none lies within it), and a warning naming the positions beyond it."""
    dropped = [p for p in positions if p >= length]
    notes = []
    if dropped:
        notes.append(f"{name}: {len(dropped)} selected token(s) lie beyond its conditioning ({length} tokens) "
                     "and are ignored; tokenise with the CLIP that encoded the conditioning")
    if len(dropped) == len(positions):
        return None, notes
    return position_weights(positions, length), notes


def describe_tokens(pieces: Sequence[str], positions: Sequence[int], limit: int = 6, width: int = 40) -> str:
    """The selected tokens as words: runs of consecutive positions joined (BPE "</w>"
    and SentencePiece "\u2581" mark word boundaries), quoted; at most ``limit`` runs of
    at most ``width`` characters each, then a count of the rest; "none" for none."""
    runs: list[list[int]] = []
    for p in sorted(positions):
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    if not runs:
        return "none"
    words = []
    for run in runs[:limit]:
        text = "".join(pieces[p] if 0 <= p < len(pieces) else "?" for p in run)
        text = " ".join(text.replace("</w>", " ").replace("\u2581", " ").split())
        words.append(repr(text if len(text) <= width else text[: width - 1] + "\u2026"))
    rest = len(runs) - limit
    return ", ".join(words) + (f" and {rest} more" if rest > 0 else "")


def fit_weights(weights: torch.Tensor, length: int) -> torch.Tensor:
    """Weights over conditioning positions for a key sequence of ``length`` tokens.
    ComfyUI batches conditionings of different lengths by repeating the shorter one
    (CONDCrossAttn.concat), so a weight vector is tiled to a multiple; otherwise it is
    cut or zero-padded."""
    n = weights.shape[-1]
    if n == length:
        return weights
    if n and length > n and length % n == 0:
        return weights.repeat(length // n)
    if length < n:
        return weights[:length]
    return F.pad(weights, (0, length - n))


# --------------------------------------------------------------------------- probabilities

def attention_to_tokens(q: torch.Tensor, k: torch.Tensor, token_weights: torch.Tensor,
                        queries: tuple[int, int] | None = None, tokens: tuple[int, int] | None = None,
                        mask: torch.Tensor | None = None, scale: float | None = None,
                        max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """sum_h sum_t w[b, t] softmax_j(q_bhi . k_bhj * scale)[t], for the queries i in
    ``queries`` and the text keys t in ``tokens``.

    q: (B, H, Lq, D), k: (B, H, Lk, D) (heads split); token_weights: (B, T) or (T,) over
    the key positions ``tokens`` = (start, stop) (default: all keys); ``queries`` =
    (start, stop) of the query positions wanted (default: all). ``mask``: the
    attention's mask, additive float or boolean (True = attend), broadcastable to
    (B, H, Lq, Lk). The softmax runs over all Lk keys; the logits of at most
    ``max_elements`` (query, key, head, batch) entries are held at once (queries in
    chunks), so memory stays bounded whatever the sequence lengths.
    Returns (B, n_queries) float32.
    """
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"attention_to_tokens: q and k must be (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}")
    batch, heads, lq, dim = q.shape
    lk = k.shape[2]
    q0, q1 = queries if queries is not None else (0, lq)
    t0, t1 = tokens if tokens is not None else (0, lk)
    scale = dim ** -0.5 if scale is None else scale
    weights = token_weights.to(device=q.device, dtype=torch.float32)
    if weights.ndim == 1:
        weights = weights.unsqueeze(0).expand(batch, -1)
    if weights.shape != (batch, t1 - t0):
        raise ValueError(f"attention_to_tokens: token_weights shape {tuple(weights.shape)}, "
                         f"expected ({batch}, {t1 - t0})")
    out = torch.zeros(batch, q1 - q0, dtype=torch.float32, device=q.device)
    if q1 <= q0 or not torch.count_nonzero(weights):
        return out
    kf = k.float()
    chunk = max(1, int(max_elements) // max(1, batch * heads * lk))
    for start in range(q0, q1, chunk):
        stop = min(q1, start + chunk)
        logits = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        if mask is not None:
            if mask.ndim == 3:  # (B, Lq, Lk): one mask for all heads (as ComfyUI's attention)
                mask = mask.unsqueeze(1)
            m = mask[..., start:stop, :] if mask.shape[-2] == lq else mask
            if m.dtype == torch.bool:
                logits = logits.masked_fill(~m, float("-inf"))
            else:
                logits = logits + m.to(logits.dtype)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        probs = torch.exp(logits[..., t0:t1] - lse)          # (B, H, c, T)
        del logits, lse
        out[:, start - q0:stop - q0] = torch.einsum("bhct,bt->bc", torch.nan_to_num(probs), weights)
    return out


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


class AttentionMaps:
    """Sums of attention maps per prompt (``kind``: any key, e.g. source / target) and
    grid, filled by attention patches during one model evaluation of a ``batch`` of
    latents whose batch holds chunks of prompts (``kinds``, one per chunk)."""

    def __init__(self, weights: dict, batch: int):
        self.weights = weights          # kind -> (T,) 0/1 over conditioning positions
        self.batch = batch
        self.maps: dict[tuple, torch.Tensor] = {}   # (kind, h, w) -> (batch, h*w)
        self.counts: dict[tuple, int] = {}

    def row_weights(self, kinds: Sequence, total_batch: int, length: int, device) -> torch.Tensor | None:
        """(total_batch, length) token weights for a call whose batch holds one chunk per
        kind, or None when no chunk has selected tokens."""
        per = total_batch // len(kinds)
        rows = []
        for kind in kinds:
            w = self.weights.get(kind)
            w = torch.zeros(length) if w is None else fit_weights(w, length)
            rows.append(w.unsqueeze(0).expand(per, -1))
        weights = torch.cat(rows).to(device)
        return weights if torch.count_nonzero(weights) else None

    def add(self, probs: torch.Tensor, kinds: Sequence, grid: tuple[int, int]) -> None:
        """Adds one layer's (total_batch, h*w) probabilities. A chunk whose batch is not the
        latent's (a conditioning broadcast differently) adds its batch mean to every latent."""
        for kind, part in zip(kinds, probs.float().cpu().chunk(len(kinds))):
            if kind not in self.weights:
                continue
            if part.shape[0] != self.batch:
                part = part.mean(0, keepdim=True).expand(self.batch, -1)
            key = (kind, *grid)
            self.maps[key] = self.maps.get(key, 0) + part
            self.counts[key] = self.counts.get(key, 0) + 1

    def grids(self) -> set:
        return {(h, w) for _, h, w in self.maps}

    def prompt_maps(self, grid: tuple[int, int] | None = None) -> tuple[list[torch.Tensor], tuple[int, int] | None]:
        """One (batch, h, w) map per prompt, averaged over the layers at ``grid`` (default:
        the recorded grid closest to ``TARGET_GRID``), and the grid; ([], None) when nothing
        was recorded."""
        if not self.maps:
            return [], None
        grid = grid or pick_resolution(self.grids(), TARGET_GRID)
        out = []
        for kind in sorted(self.weights):
            key = (kind, *grid)
            if key in self.maps:
                out.append((self.maps[key] / self.counts[key]).view(self.batch, *grid))
        return out, grid


# --------------------------------------------------------------------------- which latent, which layers

def choose_step(steps: int, step: int) -> int:
    """The trajectory latent to read attention at: ``step`` in [0 (the clean latent),
    ``steps`` (the inverted noise)], or -1 for the middle (rounded towards noise)."""
    if step == -1:
        return max(1, (steps + 1) // 2) if steps >= 1 else 0
    if not 0 <= step <= steps:
        raise InversionInputError(f"step: must be -1 (middle) or lie in [0, {steps}] (this inversion has "
                                  f"{steps} steps), got {step}")
    return step


def pick_blocks(depth: int, count: int = MAX_BLOCKS) -> list[int]:
    """Up to ``count`` of ``depth`` joint-attention blocks, evenly spread over the second
    half of the stack (where text-image attention is most localised)."""
    if depth <= count:
        return list(range(depth))
    lo = depth // 2
    if count == 1:
        return [lo]
    return sorted({round(lo + i * (depth - 1 - lo) / (count - 1)) for i in range(count)})


# --------------------------------------------------------------------------- maps and masks

def patch_grid(height: int, width: int, factor: int) -> tuple[int, int]:
    """The (h, w) token grid of a (height, width) latent in factor x factor cells, padded
    (UNet levels downsample by 2 with padding; DiT patches pad to the patch size)."""
    return math.ceil(height / factor), math.ceil(width / factor)


def token_grid(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of ``n_tokens`` image positions for a (height, width) latent: the
    :func:`patch_grid` of the power-of-two factor that fits."""
    for f in (1, 2, 4, 8, 16, 32, 64, 128):
        h, w = patch_grid(height, width, f)
        if h * w == n_tokens:
            return h, w
    raise ValueError(f"{n_tokens} image positions do not tile a {height}x{width} latent")


def resolution_score(h: int, w: int, target: int = 16) -> float:
    """How far a (h, w) attention grid is from ``target`` x ``target`` (log scale)."""
    return abs(math.log2(max(h, w) / target))


def pick_resolution(resolutions: Iterable[tuple[int, int]], target: int = 16) -> tuple[int, int]:
    """The grid closest to ``target`` x ``target`` (ties: the finer one)."""
    resolutions = list(resolutions)
    if not resolutions:
        raise ValueError("no attention was recorded")
    return min(resolutions, key=lambda r: (resolution_score(*r, target=target), -r[0] * r[1]))


def resize_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(B, h, w) -> (B, *size); bilinear (no corner alignment) or nearest."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    x = maps.unsqueeze(1).float()
    if mode == "nearest":
        x = F.interpolate(x, size=tuple(size), mode="nearest")
    else:
        x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)
    return x.squeeze(1)


def crop_grid(maps: torch.Tensor, factor: int, size: tuple[int, int]) -> torch.Tensor:
    """A map on a padded token grid (each token = factor x factor latent cells) as a map
    on the (h, w) latent: nearest upsampling by ``factor``, then the padding cut off."""
    if factor > 1:
        maps = maps.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return maps[..., : size[0], : size[1]]


def normalise_by_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its own maximum (all-zero maps stay zero)."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(0).view(-1, *([1] * (maps.ndim - 1)))
    return torch.where(peak > 0, maps.clamp_min(0) / torch.where(peak > 0, peak, torch.ones_like(peak)),
                       torch.zeros_like(maps))


def threshold_mask(raw: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 where raw >= threshold (and raw > 0), else 0."""
    return ((raw >= threshold) & (raw > 0)).float()


def dilate_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow by ``radius`` cells (max over a (2r+1)^2 square)."""
    radius = int(radius)
    if radius <= 0:
        return mask
    return F.max_pool2d(mask.unsqueeze(1), kernel_size=2 * radius + 1, stride=1, padding=radius).squeeze(1)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def blur_mask(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` cells (edges replicated)."""
    if sigma <= 0:
        return mask
    kernel = gaussian_kernel(float(sigma)).to(mask.device)
    r = kernel.numel() // 2
    x = mask.unsqueeze(1).float()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1).clamp(0, 1)


def fit_user_mask(mask: torch.Tensor, batch: int, size: tuple[int, int], name: str = "mask") -> torch.Tensor:
    """A ComfyUI MASK ((H, W), (1, H, W) or (B, H, W), any resolution) as (batch, *size):
    resized bilinearly when its size differs; a batch of 1 is repeated; any other batch
    than 1 or ``batch`` is an error."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise InversionInputError(f"{name}: expected a MASK of shape (B, H, W), got {tuple(mask.shape)}")
    if mask.shape[0] not in (1, batch):
        raise InversionInputError(
            f"{name}: batch of {mask.shape[0]} masks for a latent batch of {batch}; give 1 or {batch}")
    mask = resize_maps(mask.float(), size).clamp(0, 1)
    return mask.expand(batch, -1, -1).contiguous() if mask.shape[0] == 1 else mask


def check_mask_mode(mode: str) -> None:
    if mode not in COMBINE_MODES:
        raise InversionInputError(f"mask_mode: unknown {mode!r}; expected one of {list(COMBINE_MODES)}")


def combine_masks(attention: torch.Tensor, user: torch.Tensor | None, mode: str) -> torch.Tensor:
    """replace: the user mask; union: the maximum; intersect: the minimum."""
    check_mask_mode(mode)
    if user is None:
        return attention
    if mode == "replace":
        return user
    if mode == "union":
        return torch.maximum(attention, user)
    return torch.minimum(attention, user)


def upscale_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Latent-resolution mask -> image resolution, nearest (each latent cell becomes a
    factor x factor block, so resizing back to the latent bilinearly is exact)."""
    if factor == 1:
        return mask
    return mask.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def combine_prompt_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Maps of the source-only and target-only tokens (each normalised by its max) ->
    their elementwise maximum (prompt-to-prompt's union of the two prompts' masks)."""
    maps = [normalise_by_max(m) for m in maps]
    out = maps[0]
    for m in maps[1:]:
        out = torch.maximum(out, m)
    return out


def check_mask_options(batch: int, size: tuple[int, int], threshold: float = DEFAULT_THRESHOLD,
                       blur: float = 0.0, dilate: int = 0, user_mask: torch.Tensor | None = None,
                       mode: str = "replace") -> torch.Tensor | None:
    """Validates the mask options (before a model runs); returns the user mask fitted
    to (batch, *size), or None."""
    if not 0.0 <= threshold <= 1.0:
        raise InversionInputError(f"threshold: must lie in [0, 1], got {threshold}")
    if blur < 0 or dilate < 0:
        raise InversionInputError(f"blur and dilate: must be >= 0, got {blur}, {dilate}")
    check_mask_mode(mode)
    return fit_user_mask(user_mask, batch, size) if user_mask is not None else None


def mask_from_maps(maps: Sequence[torch.Tensor], batch: int, size: tuple[int, int],
                   threshold: float = DEFAULT_THRESHOLD, blur: float = 0.0, dilate: int = 0,
                   user_mask: torch.Tensor | None = None, mode: str = "replace") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention maps (each (B, h, w), any grid) -> (mask, raw), both (batch, *size).

    raw: the maps resized to ``size``, each normalised by its max, combined by maximum.
    mask: raw thresholded, dilated by ``dilate`` cells, blurred by ``blur`` cells, then
    combined with ``user_mask`` (any resolution, batch 1 or ``batch``) by ``mode``.
    No maps (nothing selected) gives an all-zero raw map (and, unless the user mask
    replaces or joins it, an empty mask)."""
    user = check_mask_options(batch, size, threshold, blur, dilate, user_mask, mode)
    if maps:
        resized = [resize_maps(m.float().cpu(), size) for m in maps]
        raw = combine_prompt_maps(resized)
        if raw.shape[0] == 1 and batch > 1:
            raw = raw.expand(batch, -1, -1)
    else:
        raw = torch.zeros(batch, *size)
    mask = blur_mask(dilate_mask(threshold_mask(raw, threshold), dilate), blur)
    return combine_masks(mask, user, mode).contiguous(), raw.contiguous()
