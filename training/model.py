"""Imadarem V: one small bidirectional transformer shared across refinement steps.

Inputs are summed: token embedding + sinusoidal positions scaled by a learned per-position decay + a
time embedding of the step + a projection of the self-conditioning state (the previous step's soft
predictions, as expected token embeddings). Heads: logits (tied to the token embedding), the refinement
gate (sigmoid, bias +2.0) and an optional token critic. ``forward`` is exactly the exported step:
(tokens, step, cond) -> logits, gate, cond_next (, critic).

Attention is written with ``scaled_dot_product_attention`` and a key-padding mask rather than
``nn.TransformerEncoder``, whose inference fast path exports as a fused op onnxruntime lacks.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from imadarem.runtime import rules
from imadarem.runtime.errors import TokenizerError
from imadarem.runtime.tokenizer import (
    SpecialIds,
    TokenizerAdapter,
    VocabularyTokenizer,
    check_special_ids,
    resolve_special_ids,
)
from imadarem.training.config import ImplicitRefinementConfig
from torch import nn


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] float positions -> [N, dim] sin/cos features (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    args = positions.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TokenEmbedding(nn.Embedding):
    """Token ids -> vectors; its weight doubles as the output projection and the self-conditioning basis."""


class AdaptivePositionalEmbedding(nn.Module):
    """Fixed sinusoidal positions times a learned per-position decay.

    The decay starts at 1/sqrt(dim): unit-amplitude sinusoids (norm sqrt(dim/2)) would otherwise drown
    the token embeddings, and the model could barely tell tokens apart early in training.
    """

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal(torch.arange(max_len), dim), persistent=False)
        self.decay = nn.Parameter(torch.full((max_len,), dim ** -0.5))

    def forward(self, length: int) -> torch.Tensor:
        return self.pe[:length] * self.decay[:length, None]

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """The embeddings of explicit positions (the two streams of block training share positions)."""
        # a gather from ``decay`` itself, not from ``decay[:, None]``: the exported initializer then holds decay's
        # own values, which the export can name back (onnx_export._restore_parameter_names)
        return self.pe[positions] * self.decay[positions][..., None]


def block_attention(tokens: torch.Tensor, block: int, special: SpecialIds) -> torch.Tensor:
    """[B, L, L] which keys each query may see in a ``block`` model: :func:`imadarem.runtime.rules.block_attention`
    (BD3-LM's block-causal attention, and a template's clean suffix seen from everywhere)."""
    return rules.block_attention(tokens, block, special.mask, special.pad)


def two_stream_attention(length: int, block: int, device=None) -> torch.Tensor:
    """[2L, 2L] BD3-LM's training mask over x_t ++ x_0: a noisy block sees itself and the clean blocks
    before it; the clean stream is block-causal and never sees the noisy one."""
    blk = torch.div(torch.arange(length, device=device), block, rounding_mode="floor")
    same, before, upto = (blk[:, None] == blk[None]), (blk[:, None] > blk[None]), (blk[:, None] >= blk[None])
    top = torch.cat([same, before], 1)
    bottom = torch.cat([torch.zeros_like(upto), upto], 1)
    return torch.cat([top, bottom], 0)


def two_stream_forward(model_forward, xt: torch.Tensor, clean: torch.Tensor, hidden_size: int, block: int,
                       autocast=None, verify: bool = False) -> dict[str, torch.Tensor]:
    """``model_forward`` (a ``forward_train``) over x_t ++ x_0 [b, 2L] under :func:`two_stream_attention`, both
    streams at the same positions, step 0 and no self-conditioning: one example of every block of every row.
    ``verify``: also the verifier's logits over the noisy stream, teacher-forced on the clean tokens."""
    b, L = clean.shape
    pos = torch.arange(L, device=clean.device)
    with autocast() if autocast else contextlib.nullcontext():
        return model_forward(torch.cat([xt, clean], 1), torch.zeros(b, dtype=torch.long, device=clean.device),
                             torch.zeros(b, 2 * L, hidden_size, device=clean.device),
                             two_stream_attention(L, block, clean.device)[None], torch.cat([pos, pos]),
                             clean if verify else None)


@dataclass(frozen=True)
class StatesLayout:
    """Where the *states rows* of the block objective put each token (training/block_objective.py): after the clean
    stream x_0 [L], for every block b and every k < its length, a copy of block b in the left-to-right state r_k
    (its first k tokens clean, the rest masked), each copy at the block's own positions, seeing itself and the clean
    blocks before b. That is what a decoder's call sees in that state (:func:`block_attention`: the block sees its
    own tokens and the earlier blocks, never a later one), so each copy's logits are the state's, and one row
    trains every block's k-th left-to-right conditional for every k at once, beside the drafts after it.

    ``positions`` [N]: each slot's position; ``start`` [N]: its copy's first masked position (b * block + k);
    ``clean`` [N]: whether the slot holds the data's token (j < k); ``allowed`` [N + L, N + L]: the attention."""

    positions: torch.Tensor
    start: torch.Tensor
    clean: torch.Tensor
    allowed: torch.Tensor


@functools.lru_cache(maxsize=8)
def states_layout(length: int, block: int, device: str = "cpu") -> StatesLayout:
    pos, start = [], []
    for b0 in range(0, length, block):
        size = min(block, length - b0)
        for k in range(size):  # the copy of block b0 in state r_k: its start b0 + k names it
            pos += range(b0, b0 + size)
            start += [b0 + k] * size
    positions, start_t = torch.tensor(pos, device=device), torch.tensor(start, device=device)
    n = len(pos)
    blk = torch.div(torch.arange(length, device=device), block, rounding_mode="floor")
    slot_blk = torch.div(positions, block, rounding_mode="floor")
    noisy = torch.cat([start_t[:, None] == start_t[None], slot_blk[:, None] > blk[None]], 1)
    clean_rows = torch.cat([torch.zeros(length, n, dtype=torch.bool, device=device), blk[:, None] >= blk[None]], 1)
    return StatesLayout(positions, start_t, positions < start_t, torch.cat([noisy, clean_rows], 0))


def states_forward(model_forward, clean: torch.Tensor, mask_id: int, hidden_size: int, block: int,
                   autocast=None) -> tuple[dict[str, torch.Tensor], StatesLayout]:
    """``model_forward`` (a ``forward_train``) over the states rows of ``clean`` [b, L] (:class:`StatesLayout`), step 0
    and no self-conditioning; the outputs cover the copies' slots only [b, N, ...]."""
    b, L = clean.shape
    lay = states_layout(L, block, str(clean.device))
    at_slots = clean[:, lay.positions]
    copies = torch.where(lay.clean[None], at_slots, torch.full_like(at_slots, mask_id))
    n = copies.shape[1]
    with autocast() if autocast else contextlib.nullcontext():
        out = model_forward(torch.cat([copies, clean], 1), torch.zeros(b, dtype=torch.long, device=clean.device),
                            torch.zeros(b, n + L, hidden_size, device=clean.device), lay.allowed[None],
                            torch.cat([lay.positions, torch.arange(L, device=clean.device)]))
    return {k: v[:, :n] for k, v in out.items()}, lay


def verify_attention(length: int, block: int, sees: str = "block", device=None) -> torch.Tensor:
    """[L, L] the verifier's mask: a position sees the positions of its own block up to itself (the drafts of its
    block reach it only from the positions before it, as left to right needs) and, with ``sees`` "prefix", every
    position of the earlier blocks (committed in decoding). With "block" the earlier blocks reach it only through
    the trunk's states at its own block, which are the same in training and decoding."""
    pos = torch.arange(length, device=device)
    blk = torch.div(pos, block, rounding_mode="floor")
    see = (blk[:, None] == blk[None]) & (pos[:, None] >= pos[None])
    return see | (blk[:, None] > blk[None]) if sees == "prefix" else see


def two_stream_verify_attention(length: int, block: int, device=None) -> torch.Tensor:
    """[2L, 2L] :func:`verify_attention` "prefix" over x_t ++ x_0: a noisy position sees the noisy positions of its
    block up to itself and the clean positions of the earlier blocks, which is what it sees in decoding, where the
    earlier blocks are committed; a clean position sees the clean stream as one stream would."""
    one = verify_attention(length, block, "prefix", device)
    blk = torch.div(torch.arange(length, device=device), block, rounding_mode="floor")
    own = one & (blk[:, None] == blk[None])
    top = torch.cat([own, one & ~own], 1)
    bottom = torch.cat([torch.zeros_like(one), one], 1)
    return torch.cat([top, bottom], 0)


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive bias the blocks take: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


class TimeEmbedding(nn.Module):
    """Refinement step index -> vector: sinusoidal features through a one-layer MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU())

    def forward(self, step: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(step, self.dim))


class Block(nn.Module):
    """Pre-LayerNorm bidirectional self-attention + MLP."""

    def __init__(self, cfg: ImplicitRefinementConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.ln1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h)
        self.mlp = nn.Sequential(nn.Linear(h, cfg.mlp_ratio * h), nn.GELU(), nn.Linear(cfg.mlp_ratio * h, h))
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)
        q, k, v = (t.reshape(b, n, self.num_heads, h // self.num_heads).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:  # an additive bias, under autocast
            attn_mask = attn_mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, n, h)
        x = x + F.dropout(self.proj(y), p, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), p, self.training)


class GateMLP(nn.Module):
    """The gate as a small MLP over the last hidden state and the position's confidence (log-probability of
    its most likely token, and entropy): the commit and revision questions of the acceptance gate depend on
    how peaked the conditional is, which a linear map of the hidden state cannot compute."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.inp = nn.Linear(hidden + 2, width)
        self.out = nn.Linear(width, 1)

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top1 = logp.max(-1).values
        entropy = -(logp.exp() * logp).sum(-1)
        features = torch.cat([hidden, top1[..., None].to(hidden.dtype), entropy[..., None].to(hidden.dtype)], -1)
        return self.out(F.gelu(self.inp(features))).squeeze(-1)


class ImplicitRefinementModel(nn.Module):
    def __init__(self, config: ImplicitRefinementConfig, tokenizer: TokenizerAdapter | None = None):
        """``tokenizer`` None: ids only, with VocabularyTokenizer's special ids ([PAD]=0, [MASK]=1,
        [EOS]=2); a model must have a tokenizer to be saved by the trainer or exported."""
        super().__init__()
        if tokenizer is None:
            special = {"mask": VocabularyTokenizer.SPECIALS.index("[MASK]"),
                       "pad": VocabularyTokenizer.SPECIALS.index("[PAD]"),
                       "eos": VocabularyTokenizer.SPECIALS.index("[EOS]")}
            check_special_ids(special, config.vocab_size, "ImplicitRefinementModel")
            self.special = SpecialIds(**special)
        else:
            if tokenizer.vocab_size != config.vocab_size:
                raise TokenizerError(f"tokenizer has {tokenizer.vocab_size} tokens but config.vocab_size is "
                                     f"{config.vocab_size}")
            self.special = resolve_special_ids(tokenizer)  # the contract check: range and collisions
        self.config = config
        self.tokenizer = tokenizer
        h = config.hidden_size
        self.tok_emb = TokenEmbedding(config.vocab_size, h)
        self.emb_scale = math.sqrt(h)  # Vaswani et al.: token embeddings (shared with the output) times sqrt(h)
        self.pos_emb = AdaptivePositionalEmbedding(config.max_seq_len, h)
        self.time_emb = TimeEmbedding(h)
        self.self_cond = nn.Linear(h, h)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(h)
        g = config.gate_head_hidden
        self.gate_head = nn.Linear(h, 1) if g == 0 else GateMLP(h, g)
        self.critic_head = nn.Linear(h, 1) if config.use_critic else None
        if config.verify_layers:
            # position j reads the trunk's last residual state there plus the token placed at j - 1 (the data's in
            # training, the draft or the committed token in decoding) and predicts x_j through the trunk's own final
            # norm and output: the residual keeps the non-causal state, which the ablation of Campbell et al. found
            # to matter
            self.verify_prev = nn.Linear(h, h)
            self.verify_blocks = nn.ModuleList(Block(config) for _ in range(config.verify_layers))
        self.apply(self._init)
        if config.verify_layers:  # every branch into the residual starts at zero: the verifier starts as the trunk's
            for layer in (self.verify_prev, *(m for b in self.verify_blocks for m in (b.proj, b.mlp[2]))):
                nn.init.zeros_(layer.weight)  # marginals, so a trained trunk loses nothing on the first step
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.self_cond.weight)  # self-conditioning starts as a no-op
        nn.init.zeros_(self.self_cond.bias)
        nn.init.constant_(self.gate_head_output().bias, config.gate_bias_init)  # sigmoid(2) = 0.88: refine at first

    def gate_head_output(self) -> nn.Linear:
        return self.gate_head if isinstance(self.gate_head, nn.Linear) else self.gate_head.out

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # -- the step -------------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, step: torch.Tensor, cond: torch.Tensor,
               allowed: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``allowed`` [B or 1, n, n] and ``positions`` [n] or [B, n]: training's two streams, or a host's packed
        states (formats/block_verify.py); left out, the model's own attention (bidirectional, or
        :func:`block_attention` for a ``block`` model) over positions 0 .. n - 1."""
        return self.ln_f(self.residual(tokens, step, cond, allowed, positions))

    def residual(self, tokens: torch.Tensor, step: torch.Tensor, cond: torch.Tensor,
                 allowed: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's last residual stream (before the final LayerNorm): what the heads and the verifier read."""
        _, n = tokens.shape
        step = step.clamp(0, self.config.max_refinement_steps - 1)
        if self.config.objective in ("mixture", "block"):  # time-independent (as MDLM): the masks say how far along
            step = torch.zeros_like(step)
        pe = self.pos_emb(n) if positions is None else self.pos_emb.at(positions)
        if pe.dim() == 2:  # one set of positions for every row
            pe = pe[None]
        x = self.tok_emb(tokens) * self.emb_scale + pe + self.time_emb(step)[:, None, :] + self.self_cond(cond)
        x = F.dropout(x, self.config.dropout, self.training)
        if allowed is None and self.config.objective == "block":
            allowed = block_attention(tokens, self.config.block_size, self.special)
        keep = tokens != self.special.pad  # padding derived in the graph; a query always sees itself
        eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
        see = keep[:, None, None, :] if allowed is None else keep[:, None, None, :] & allowed[:, None]
        attn_mask = see | eye[None, None]
        # one additive bias for all layers: a boolean mask makes the exported attention of every layer
        # turn it into a bias again and guard its softmax against NaN rows (which the eye rules out)
        attn_bias = additive_bias(attn_mask, x.dtype)
        for block in self.blocks:
            x = block(x, attn_bias)
        return x

    def verify_logits(self, residual: torch.Tensor, placed: torch.Tensor, two_streams: bool = False) -> torch.Tensor:
        """[B, n, V] the verifier's logits: at position j, x_j given the trunk's state (``residual`` [B, n, h]) and
        the tokens ``placed`` [B, n] at the positions before j that it sees (:func:`verify_attention`). Decoding
        places the drafts at the masks; training the data's tokens (teacher forcing). ``two_streams``: ``residual``
        is x_t ++ x_0 [B, 2n, h] (training), ``placed`` the clean tokens, and the logits are the noisy stream's."""
        b, n = placed.shape
        prev = torch.cat([torch.zeros_like(placed[:, :1]), placed[:, :-1]], 1)
        has_prev = (torch.arange(n, device=placed.device) > 0).to(residual.dtype)  # position 0 reads no token
        sees, bs = self.config.verify_sees, self.config.block_size
        if two_streams and sees == "prefix":
            prev, has_prev = torch.cat([prev, prev], 1), torch.cat([has_prev, has_prev])
            see = two_stream_verify_attention(n, bs, placed.device)
        else:
            residual = residual[:, :n]
            see = verify_attention(n, bs, sees, placed.device)
        x = residual + self.verify_prev(self.tok_emb(prev) * self.emb_scale) * has_prev[None, :, None]
        bias = additive_bias(see, x.dtype)[None, None]
        for block in self.verify_blocks:
            x = block(x, bias)
        return self.ln_f(x[:, :n]) @ self.tok_emb.weight.t()

    def heads(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = hidden @ self.tok_emb.weight.t()
        soft = torch.softmax(logits.float(), dim=-1)
        if isinstance(self.gate_head, GateMLP):
            # the acceptance gate judges the trained conditionals; its gradient must not change them
            detach = self.config.gate_target == "acceptance"
            gate = self.gate_head(hidden.detach() if detach else hidden, logits.detach() if detach else logits)
        else:
            gate = self.gate_head(hidden).squeeze(-1)
        out = {
            "logits": logits,
            "gate_logits": gate,
            "cond_next": soft @ self.tok_emb.weight.float(),
        }
        if self.critic_head is not None:
            out["critic_logits"] = self.critic_head(hidden).squeeze(-1)
        return out

    def forward_train(self, tokens, step, cond, allowed=None, positions=None, placed=None) -> dict[str, torch.Tensor]:
        """``placed`` [B, n]: also the verifier's logits, over the first n positions (n = half the tokens' length:
        training's two streams, the logits of the noisy one)."""
        x = self.residual(tokens, step, cond, allowed, positions)
        out = self.heads(self.ln_f(x))
        if placed is not None:
            out["verify_logits"] = self.verify_logits(x, placed, two_streams=tokens.shape[1] == 2 * placed.shape[1])
        return out

    def forward(self, tokens: torch.Tensor, step: torch.Tensor, cond: torch.Tensor,
                draft_noise: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                attend: torch.Tensor | None = None):
        """The exported step: (tokens, step, cond) -> logits, gate, cond_next (, critic). A model with a verifier
        takes ``draft_noise`` [B, n, V] too (the draft bans plus each position's tempered Gumbel noise) and also
        returns ``drafts`` (argmax(logits + draft_noise): a sample of each position's marginal) and
        ``verify_logits``, the verifier's conditionals with the drafts placed at the masks: draft and check in
        one call (Campbell et al.'s single pass). A block model's file may take ``positions`` [B, n] and
        ``attend`` [B, n, n] (bool) instead of computing them: then one row can hold several decoding states that
        share their committed prefix (formats/block_verify.py), each state's copy at its own positions."""
        if (positions is None) != (attend is None):
            raise ValueError("positions and attend go together")
        x = self.residual(tokens, step, cond, attend, positions)
        out = self.heads(self.ln_f(x))
        result = (out["logits"].float(), torch.sigmoid(out["gate_logits"].float()), out["cond_next"].float())
        if self.critic_head is not None:
            result = result + (torch.sigmoid(out["critic_logits"].float()),)
        if draft_noise is not None:
            drafts = (out["logits"].float() + draft_noise).argmax(-1)
            placed = torch.where(tokens == self.special.mask, drafts, tokens)
            result = result + (drafts, self.verify_logits(x, placed).float())
        return result

    def zero_cond(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, self.config.hidden_size, device=tokens.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
