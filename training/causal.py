"""The causal (left-to-right) model: a small GPT with optional draft heads, one step with a KV cache.

The quality experiments (experiments/quality/) found that a left-to-right transformer with D draft
heads, decoded by draft-and-verify, matches the left-to-right model's quality at a third of its
sequential calls. ``CausalLM`` is that model: ``teacher_forcing`` is what the trainer runs
(``training/families/causal.py``), ``step`` (the new tokens, their positions and the KV cache of everything
before them) is what a causal model file holds (``runtime/formats/causal.py``), and ``DecodeStep`` is the
whole draft-and-verify call of a decode file.

Head k at a position predicts the token k + 1 places after it (k = 0 is the next token); draft heads are a
residual Linear + GELU on the final hidden state, sharing the tied output embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from imadarem.runtime import rules
from imadarem.runtime.bans import blank_bans
from imadarem.runtime.formats.causal import CausalConfig
from imadarem.runtime.formats.decode import cache_names, start_tokens, state_names
from torch import nn


class _Block(nn.Module):
    def __init__(self, h: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.drop = nn.Dropout(dropout)  # on each residual branch; identity in eval mode (every export)
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
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, h)))
        return x + self.drop(self.mlp(self.ln2(x))), k, v


class CausalLM(nn.Module):
    def __init__(self, config: CausalConfig, tokenizer=None, dropout: float = 0.0):
        """``dropout``: a training knob (the family's ``dropout``), not part of the model's shape: it acts only
        in train mode, so files exported from the model are the same with or without it."""
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        h = config.hidden_size
        self.tok = nn.Embedding(config.vocab_size, h)
        self.pos = nn.Embedding(config.max_seq_len + 1, h)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(h, config.num_heads, dropout) for _ in range(config.num_layers))
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
        logits, drafts = self.heads(self.ln(x))
        return logits, drafts, torch.stack(present)

    def teacher_forcing(self, tokens):
        """Training's forward: ``tokens`` [B, T] (BOS, then the sequence shifted right) in one causal pass;
        ``logits`` [B, T, V] and ``drafts`` [B, T, D, V] at every position (no cache)."""
        return self.heads(self.trunk(tokens))

    def trunk(self, tokens):
        """Teacher forcing's final hidden states [B, T, H] (one causal pass, no cache), before the heads."""
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device)[None].expand(b, t)
        x = self.emb_drop(self.tok(tokens) + self.pos(positions))
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()[None, None]
        empty = x.new_zeros(b, self.config.num_heads, 0, self.config.head_dim)
        for blk in self.blocks:
            x, _, _ = blk(x, empty, empty, causal)
        return self.ln(x)

    def heads(self, hid):
        """``logits`` [B, T, V] (the next token) and ``drafts`` [B, T, D, V] (draft head k: the token k + 2 places
        ahead) from the final hidden states."""
        logits = hid @ self.tok.weight.t()
        if self.draft:
            drafts = torch.stack([self.draft_logits(hid, k) for k in range(len(self.draft))], 2)
        else:
            drafts = logits.new_zeros(*hid.shape[:2], 0, logits.shape[-1])
        return logits, drafts

    def draft_logits(self, hid, k: int):
        """Draft head ``k``'s logits [B, T, V]: a residual MLP on the hidden state, through the tied output."""
        return (hid + F.gelu(self.draft[k](hid))) @ self.tok.weight.t()

    def without_drafts(self, keep: int = 0) -> CausalLM:
        """The same model with only its first ``keep`` draft heads (0: the plain left-to-right model of
        equal size and weights, the baseline draft-and-verify is measured against)."""
        import dataclasses

        if not 0 <= keep <= self.config.num_drafts:
            raise ValueError(f"keep must be in 0..{self.config.num_drafts}, got {keep}")
        model = CausalLM(dataclasses.replace(self.config, num_drafts=keep), self.tokenizer)
        model.load_state_dict({k: v for k, v in self.state_dict().items()
                               if not k.startswith("draft.") or int(k.split(".")[1]) < keep})
        return model.eval()

    def empty_cache(self, batch: int):
        """A one-entry cache that counts for nothing (exports keep P >= 1)."""
        c = self.config
        past = torch.zeros(c.num_layers, 2, batch, c.num_heads, 1, c.head_dim)
        return past, torch.zeros(batch, 1, dtype=torch.bool)


class DecodeStep(nn.Module):
    """One call of the fused decoder (docs/ARCHITECTURE.md, "Decode files"): the whole draft-and-verify
    step of ``runtime/causal_step.py`` for the gate selector, with the state on the device.

    State per row: ``fed`` [B, D+1] (the newest exact token and D drafts at model positions
    ``start`` .. ``start`` + D), ``ids`` [B, L] (committed tokens, PAD beyond), ``done`` [B], ``calls`` [B]
    and a fixed-size KV cache per layer, [B, heads, C, head_dim] with C = L + 1 + D slots (slot = model
    position). One call writes the fed tokens' keys and values into their slots, attends each to
    the slots up to its own, samples the exact token after every fed one with the sample's counter noise
    (``rules.counter_gumbel``, ``rules.coupled_sample``), keeps the drafts that equal their exact tokens,
    commits them and the exact token after them, and draws the next D drafts from the draft heads at the
    last kept position with the noise of the positions they guess. Stale slots (rejected drafts) are
    always rewritten before any query reaches them. Every shape but the batch is fixed, so onnxruntime
    can capture the call in a CUDA graph; ``drafts=0`` is the plain left-to-right decoder of the same
    model (the baseline), with the same noise: both give the same molecules.

    ``inplace`` writes the caches in place (the PyTorch loop); the export writes new ones (ONNX has no
    in-place update as an op); the runtime binds one buffer as both a cache's input and its output, so
    onnxruntime's ScatterND writes only the new slots.
    """

    def __init__(self, model: CausalLM, drafts: int | None = None, inplace: bool = False, attention: str = "matmul"):
        super().__init__()
        c = model.config
        self.model, self.inplace, self.attention = model, inplace, attention
        self._start: dict[str, list] | None = None  # start_outputs, computed once
        self.drafts = c.num_drafts if drafts is None else drafts
        if not 0 <= self.drafts <= c.num_drafts:
            raise ValueError(f"drafts must be in 0..{c.num_drafts}, got {drafts}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        if attention == "gqa" and (self.drafts or inplace):
            raise ValueError("attention 'gqa' (onnxruntime's GroupQueryAttention on a CPU) takes one new token a row: "
                             "drafts=0, and only in the export")
        self.length, self.slots = c.max_seq_len, c.max_seq_len + 1 + self.drafts
        sp = model.special
        self.eos, self.pad, self.mask = sp.eos, sp.pad, sp.mask
        if self.drafts:  # the draft heads as one matrix product: [h, D*h] (fewer kernels per call on a GPU)
            heads = model.draft[: self.drafts]
            self.draft_weight = nn.Parameter(torch.cat([lin.weight.t() for lin in heads], 1).detach(),
                                             requires_grad=False)
            self.draft_bias_h = nn.Parameter(torch.cat([lin.bias for lin in heads]).detach(), requires_grad=False)
        # the runtime loop's bans for a blank layout (the same for every position), and no EOS in drafts
        bias, draft_bias = blank_bans(model.tokenizer, sp, c.vocab_size, c.max_seq_len)
        self.register_buffer("bias", torch.from_numpy(bias), persistent=False)
        self.register_buffer("draft_bias", torch.from_numpy(draft_bias), persistent=False)
        D, T = self.drafts, self.drafts + 1
        # constant indices (gathers with constant indices: fewer kernels than data-dependent ones):
        # the noise positions start .. start + 2D; fed shifted by one (fed t + 1 is the draft output t
        # guesses); a last column that is never a right guess
        self.register_buffer("noise_offsets", torch.arange(2 * D + 1), persistent=False)
        self.register_buffer("shift", (torch.arange(T) + 1) % T, persistent=False)
        self.register_buffer("last_wrong", (torch.arange(T) < D).float(), persistent=False)


    def initial_state(self, batch: int, device=None, dtype=torch.float32, done=None) -> dict[str, torch.Tensor]:
        """The state before the first call: BOS at position 0, nothing committed (rows given ``done``
        stay untouched: padding of a fixed batch)."""
        c = self.model.config
        T = self.drafts + 1
        fed = torch.full((batch, T), self.pad, dtype=torch.long, device=device)
        fed[:, 0] = self.mask  # BOS
        state = {"fed": fed, "start": torch.zeros(batch, dtype=torch.long, device=device),
                 "ids": torch.full((batch, c.max_seq_len), self.pad, dtype=torch.long, device=device),
                 "done": torch.zeros(batch, dtype=torch.bool, device=device) if done is None else done.to(device),
                 "calls": torch.zeros(batch, dtype=torch.long, device=device)}
        for name in cache_names(c.num_layers):
            state[name] = torch.zeros(batch, c.num_heads, self.slots, c.head_dim, dtype=dtype, device=device)
        return state

    def start_outputs(self) -> dict[str, list]:
        if self._start is None:
            self._start = self._compute_start()
        return self._start

    @torch.no_grad()
    def _compute_start(self) -> dict[str, list]:
        """What the first call would compute from BOS, which is the same for every molecule: the logits of
        the first token, the draft heads' logits, and BOS's keys and values per layer. A decode file keeps
        them (metadata ``imadarem.decode_start``), so every molecule starts after BOS, one call fewer
        (the prompt cache of a decoder whose prompt is always BOS)."""
        import copy

        m = copy.deepcopy(self.model).float().cpu()  # float32 whatever the model's precision: the file's constants
        c = m.config
        past, valid = m.empty_cache(1)
        bos = torch.full((1, 1), self.mask, dtype=torch.long)
        logits, drafts, present = m.step(bos, torch.zeros(1, 1, dtype=torch.long), past, valid)
        kv = present[:, :, 0, :, -1, :].reshape(c.num_layers, 2, c.hidden_size)  # [layers, k/v, hidden]
        return {"logits": logits[0, 0].tolist(), "drafts": drafts[0, 0, : self.drafts].tolist(), "kv": kv.tolist()}

    def started_state(self, keys: torch.Tensor, temperature: float, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """The state after BOS (``start_outputs``): the first token and the first drafts drawn with each
        sample's noise, BOS's keys and values in cache slot 0, calls 0."""
        start = {k: torch.tensor(v, dtype=torch.float32) for k, v in self.start_outputs().items()}
        start["drafts"] = start["drafts"].reshape(self.drafts, -1 if self.drafts else start["logits"].shape[0])
        first, drafts, done = start_tokens(start["logits"], start["drafts"], keys.cpu(), temperature,
                                           self.bias.cpu(), self.draft_bias.cpu(), self.eos)
        device, c = keys.device, self.model.config
        state = self.initial_state(keys.shape[0], device, dtype, done.to(device))
        state["fed"] = torch.cat([first[:, None], drafts], 1).to(device)
        state["start"] += 1
        state["ids"][:, 0] = first.to(device)
        for i in range(c.num_layers):
            state[f"cache_k{i}"][:, :, 0] = start["kv"][i, 0].view(c.num_heads, c.head_dim).to(device, dtype)
            state[f"cache_v{i}"][:, :, 0] = start["kv"][i, 1].view(c.num_heads, c.head_dim).to(device, dtype)
        return state

    def forward(self, fed, start, ids, done, calls, *rest):
        m, c = self.model, self.model.config
        caches, (keys, temperature) = rest[: 2 * c.num_layers], rest[2 * c.num_layers:]
        b, T, D, L, V = fed.shape[0], self.drafts + 1, self.drafts, self.length, c.vocab_size
        steps = torch.arange(T, device=fed.device)
        pos = start[:, None] + steps[None, :]  # model positions of the fed tokens = their cache slots
        x = m.tok(fed) + m.pos(pos.clamp(max=L))
        slot = pos.clamp(max=self.slots - 1)
        allowed = torch.arange(self.slots, device=fed.device)[None, None, :] <= pos[:, :, None]
        attn_bias = _additive_mask(allowed, x.dtype)  # [B, 1, T, C]
        # the cells a call writes, (row, head, slot), each a head_dim vector: ScatterND in the export (ScatterElements,
        # one index per float, took a quarter of a CPU call at batch 64; docs/bench-notes.md)
        # expanded here, not broadcast by index_put: the export's own broadcast defeated onnxruntime's symbolic
        # shape inference, and with it the SkipLayerNormalization fusion of fp16 draft-and-verify files
        cells = (b, c.num_heads, T)
        slots = (torch.arange(b, device=fed.device)[:, None, None].expand(cells),
                 torch.arange(c.num_heads, device=fed.device)[None, :, None].expand(cells),
                 slot[:, None, :].expand(cells))
        new_caches = []
        for i, blk in enumerate(m.blocks):
            q, k, v = blk.qkv(blk.ln1(x)).split(c.hidden_size, -1)
            kc, vc = caches[2 * i], caches[2 * i + 1]
            if self.attention == "gqa":
                att, kc, vc = torch.ops.imadarem.cached_attention(q, k, v, kc, vc, slot[:, 0])
                x = x + blk.proj(att)
                x = x + blk.mlp(blk.ln2(x))
                new_caches += [kc, vc]
                continue
            q, k, v = (z.view(b, T, c.num_heads, c.head_dim).transpose(1, 2) for z in (q, k, v))
            if self.inplace:
                kc, vc = kc.index_put_(slots, k), vc.index_put_(slots, v)
            else:
                kc, vc = kc.index_put(slots, k), vc.index_put(slots, v)
            if self.inplace:  # the PyTorch loop: its fused attention kernels
                att = F.scaled_dot_product_attention(q, kc, vc, attn_mask=attn_bias)
            else:  # the export: MatMul, Softmax, MatMul (onnxruntime's fused attention, com.microsoft
                # MultiHeadAttention, ran 1.6x slower at batch 4096 on an H200: BENCH-NOTES.md)
                att = torch.softmax(q @ kc.transpose(-1, -2) * c.head_dim ** -0.5 + attn_bias, -1) @ vc
            x = x + blk.proj(att.transpose(1, 2).reshape(b, T, c.hidden_size))
            x = x + blk.mlp(blk.ln2(x))
            new_caches += [kc, vc]
        hid = m.ln(x)
        logits = (hid @ m.tok.weight.t()).float()  # [B, T, V]

        # the exact token after each fed one (ids index start + t), and the noise of the positions the
        # next drafts guess (start + 1 .. start + 2D), in one draw
        noise = rules.counter_gumbel(keys, (start[:, None] + self.noise_offsets).clamp(max=L - 1), V)
        tempered = rules.tempered_noise(noise, temperature)
        exact = rules.coupled_argmax(logits + self.bias, tempered[:, :T])  # [B, T]
        if D:
            # fed token t (t >= 1) is the draft for ids index start + t - 1, guessed right iff it equals the
            # exact token output t - 1 sampled there; kept = the first wrong one (a right guess beyond the
            # sequence's end commits nothing: the writes below stop at L and the row ends)
            right = (fed.index_select(1, self.shift) == exact).float() * self.last_wrong
            kept = right.argmin(1)  # [B] drafts kept, 0..D
            bonus = exact.gather(1, kept[:, None]).view(b)
        else:
            kept = torch.zeros_like(start)
            bonus = exact.view(b)
        # commit exact[:, 0..kept] at ids index start .. start + kept (a gather, no reduction: onnxruntime's
        # int64 reductions over a middle axis took a quarter of a call at batch 4096)
        rel = torch.arange(L, device=fed.device)[None, :] - start[:, None]  # [B, L]
        write = (rel >= 0) & (rel <= kept[:, None]) & ~done[:, None]
        ids_next = torch.where(write, exact.gather(1, rel.clamp(0, T - 1)), ids)
        committed = start + kept + 1
        ended = committed >= L
        if self.eos is not None:
            ended = ended | (bonus == self.eos)
        done_next = done | ended
        if D:
            # the draft heads at the last kept output only (running them at every output and picking
            # after measured the same at batch 1 on an H200, 0.351 against 0.362 ms a call on two machines,
            # and costs 4x the heads' work at large batch): head m guesses ids index start + kept + 1 + m,
            # with that position's noise
            hid_kept = hid.gather(1, kept[:, None, None].expand(b, 1, c.hidden_size))  # [B, 1, h]
            lifted = F.gelu(hid_kept @ self.draft_weight + self.draft_bias_h).view(b, D, c.hidden_size)
            draft_logits = ((hid_kept + lifted) @ m.tok.weight.t()).float()  # [B, D, V]
            at = (kept[:, None] + self.noise_offsets[None, 1: D + 1])[:, :, None].expand(b, D, V)
            guesses = rules.coupled_argmax(draft_logits + self.draft_bias, tempered.gather(1, at))
            fed_new = torch.cat([bonus[:, None], guesses], 1)
        else:
            fed_new = bonus[:, None]
        fed_next = torch.where(done[:, None], fed, fed_new)
        start_next = torch.where(done, start, committed)
        calls_next = calls + (~done).long()
        active = (~done_next).float().sum(0, keepdim=True).long()  # float: onnxruntime's int64 sums are slow
        return (fed_next, start_next, ids_next, done_next, calls_next, *new_caches, active)


#: the additive attention mask's value where attention is not allowed (finite: fused kernels take it as
#: it is; exp of it underflows to exactly 0 in float16 and float32)
MASKED = -1e4

#: how a decode file's graph attends: "matmul" (MatMul, Softmax, MatMul over every cache slot; any provider) or
#: "gqa" (onnxruntime's com.microsoft GroupQueryAttention, which writes the new keys and values into the cache and
#: attends to the filled slots only; one new token a row, CPU: docs/bench-notes.md)
ATTENTIONS = ("matmul", "gqa")


@torch.library.custom_op("imadarem::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One new token a row: write its key and value ([B, 1, hidden]) into cache slot ``slot`` [B] of the caches
    [B, heads, slots, head_dim], attend with its query to slots 0..slot; returns the attention output [B, 1,
    hidden] and the two caches. What ``export_decode`` writes as GroupQueryAttention (this is its reference)."""
    b, heads, slots, hd = k_cache.shape
    rows, at = torch.arange(b, device=q.device), slot.long()
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache[rows, :, at] = k.view(b, heads, hd).to(k_cache.dtype)
    v_cache[rows, :, at] = v.view(b, heads, hd).to(v_cache.dtype)
    scores = q.view(b, heads, 1, hd) @ k_cache.transpose(-1, -2) * hd ** -0.5  # [B, heads, 1, slots]
    allowed = torch.arange(slots, device=q.device)[None, :] <= at[:, None]
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    att = torch.softmax(scores.float(), -1).to(v_cache.dtype) @ v_cache
    return att.reshape(b, 1, heads * hd), k_cache, v_cache


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, slot):
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, C] bool -> [B, 1, T, C] additive bias (0 where allowed, MASKED elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, MASKED)[:, None]


def decode_with(step: DecodeStep, keys: torch.Tensor, temperature: float, max_calls: int | None = None,
                state: dict[str, torch.Tensor] | None = None, on_call=None) -> dict[str, torch.Tensor]:
    """Run ``step`` until every row is done (the PyTorch loop, and the reference the exported graph is
    checked against); ``on_call(active_rows)`` after each call (timings)."""
    c = step.model.config
    device = keys.device
    dtype = step.model.tok.weight.dtype
    state = state or step.started_state(keys, temperature, dtype)
    names = state_names(c.num_layers)
    temp = torch.tensor([temperature], dtype=torch.float32, device=device)
    for _ in range(max_calls or c.max_seq_len + 1):
        out = step(*(state[n] for n in names), keys, temp)
        state = dict(zip(names, out[:-1]))
        active = int(out[-1].item())
        if on_call is not None:
            on_call(active)
        if active == 0:
            break
    return state
