"""The causal (left-to-right) model family: a small GPT with optional draft heads, one step with a KV cache.

The quality experiments (training/recipes/quality/) found that a left-to-right transformer with D draft
heads, decoded by draft-and-verify (speculative sampling), matches the left-to-right model's quality at a
third of its sequential calls. This module is that model as Imadarem exports it: the same parameter names
as the research scripts' ``Net`` / ``DraftNet`` (so their checkpoints load as they are), and a ``step`` that
takes the new tokens, their positions and the KV cache of everything before them, which is what the
runtime (``runtime/causal.py``) calls once per decoding step.

Head k at a position predicts the token k + 1 places after it (k = 0 is the next token); draft heads are a
residual Linear + GELU on the final hidden state, sharing the tied output embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CausalConfig:
    vocab_size: int
    max_seq_len: int = 56  # tokens after BOS; position embeddings cover BOS + max_seq_len
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_drafts: int = 0
    sampling_temperature: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "causal", **asdict(self)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class _Block(nn.Module):
    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))

    def forward(self, x, past_k, past_v, mask):
        """x [B, T, h]; past_k/v [B, heads, P, d]; mask [B, 1, T, P + T] (True: attend)."""
        b, t, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, -1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp(self.ln2(x)), k, v


class CausalLM(nn.Module):
    def __init__(self, config: CausalConfig, tokenizer=None):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        h = config.hidden_size
        self.tok = nn.Embedding(config.vocab_size, h)
        self.pos = nn.Embedding(config.max_seq_len + 1, h)
        self.blocks = nn.ModuleList(_Block(h, config.num_heads) for _ in range(config.num_layers))
        self.ln = nn.LayerNorm(h)
        self.draft = nn.ModuleList(nn.Linear(h, h) for _ in range(config.num_drafts))
        self.apply(self._init)
        for lin in self.draft:  # draft heads start as copies of the next-token head (Medusa's init)
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @staticmethod
    def _init(module):
        """GPT-2's: weights N(0, 0.02), biases 0 (as the research scripts, so fresh models match theirs)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def special(self):
        from imadarem.runtime.tokenizer import resolve_special_ids

        return resolve_special_ids(self.tokenizer)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def step(self, tokens, positions, past, past_valid):
        """One decoding call: ``tokens``/``positions`` [B, T] new tokens, ``past`` [layers, 2, B, heads, P, d]
        the cache, ``past_valid`` [B, P] which cache entries count. Returns ``logits`` [B, T, V] (the next
        token after each new one), ``drafts`` [B, T, D, V] (the tokens 2..D+1 places after it) and
        ``present`` [layers, 2, B, heads, P + T, d]."""
        x = self.tok(tokens) + self.pos(positions)
        b, t = tokens.shape
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        mask = torch.cat([past_valid[:, None, None, :].expand(b, 1, t, past_valid.shape[1]),
                          causal[None, None].expand(b, 1, t, t)], -1)
        present = []
        for i, blk in enumerate(self.blocks):
            x, k, v = blk(x, past[i, 0], past[i, 1], mask)
            present.append(torch.stack([k, v]))
        hid = self.ln(x)
        logits = hid @ self.tok.weight.t()
        if self.draft:
            drafts = torch.stack([(hid + F.gelu(lin(hid))) @ self.tok.weight.t() for lin in self.draft], 2)
        else:
            drafts = logits.new_zeros(b, t, 0, logits.shape[-1])
        return logits, drafts, torch.stack(present)

    def empty_cache(self, batch: int):
        """A one-entry cache that counts for nothing (exports keep P >= 1)."""
        c = self.config
        past = torch.zeros(c.num_layers, 2, batch, c.num_heads, 1, c.head_dim)
        return past, torch.zeros(batch, 1, dtype=torch.bool)


def load_research_checkpoint(weights: str | Path, vocab: str | Path, max_seq_len: int = 56, hidden_size: int = 256,
                             num_layers: int = 6, num_heads: int = 8) -> CausalLM:
    """A ``Net`` / ``DraftNet`` state dict saved by the research scripts (``--save``), with the vocabulary
    JSON (the token list) it was trained on, as a CausalLM with a SELFIES tokenizer."""
    from imadarem.plugins.tokenizers.selfies import SelfiesTokenizer
    from imadarem.runtime.errors import CheckpointError

    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        tokens = json.loads(Path(vocab).read_text())
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {weights} with {vocab}: {exc}") from None
    state = {k: v.float() for k, v in state.items() if not k.startswith("gate.")}
    drafts = len({k.split(".")[1] for k in state if k.startswith("draft.")})
    tokenizer = SelfiesTokenizer(tokens[4:])
    if tokenizer.tokens != tokens:
        raise CheckpointError(f"{vocab}: expected [PAD], [MASK], [EOS], [UNK] then the symbols")
    config = CausalConfig(vocab_size=len(tokens), max_seq_len=max_seq_len, hidden_size=hidden_size,
                          num_layers=num_layers, num_heads=num_heads, num_drafts=drafts)
    model = CausalLM(config, tokenizer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: not a research Net/DraftNet of this shape "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
