"""The alternatives ``imadarem bench`` runs beside the exported step, built at the same size.

- x-transformers' ``NonAutoregressiveWrapper.generate`` (MaskGIT-style iterative demasking) over an
  ``Encoder`` with our hidden size, depth, heads and MLP width;
- x-transformers' ``AutoregressiveWrapper.generate(cache_kv=True)`` over a ``Decoder`` of the same
  size: the left-to-right baseline, one token per step with a key/value cache.

Their weights are random: only their speed is compared, and the work per step does not depend on
the weights (neither stops early: the NAR wrapper always runs its K steps, the AR one always decodes
the full length). x-transformers comes with the ``bench`` extra.
"""

from __future__ import annotations

import time

import torch
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.results import LoopTimings


def _xt():
    try:
        import x_transformers
    except ImportError:
        raise ImadaremError("the x-transformers baselines need the 'bench' extra: pip install 'imadarem[bench]'") from None
    return x_transformers


def _layer_kwargs(config) -> dict:
    return {"dim": config.hidden_size, "depth": config.num_layers, "heads": config.num_heads,
            "attn_dim_head": config.hidden_size // config.num_heads, "ff_mult": config.mlp_ratio}


class _StepClock:
    """Times each forward call of a network through hooks (x-transformers loops are one call)."""

    def __init__(self, net: torch.nn.Module, device: torch.device, timings: LoopTimings | None):
        self.timings, self.device = timings, device
        self._start = 0.0
        self._handles = [net.register_forward_pre_hook(self._pre), net.register_forward_hook(self._post)]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _pre(self, module, args) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, out) -> None:
        self._sync()
        if self.timings is not None:
            dt = time.perf_counter() - self._start
            self.timings.run_seconds.append(dt)
            self.timings.step_seconds.append(dt)
            self.timings.active_rows.append(int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else -1)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


class NonAutoregressiveBaseline:
    """x-transformers MaskGIT-style generation at our model's size and step count."""

    name = "xt-nar"

    def __init__(self, config, mask_id: int, steps: int, device: torch.device):
        xt = _xt()
        net = xt.TransformerWrapper(num_tokens=config.vocab_size, max_seq_len=config.max_seq_len,
                                    attn_layers=xt.Encoder(**_layer_kwargs(config)))
        self.wrapper = xt.NonAutoregressiveWrapper(net, mask_id=mask_id, steps=steps).to(device).eval()
        self.net, self.device, self.steps = net, device, steps

    def parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    @torch.no_grad()
    def generate(self, batch: int, timings: LoopTimings | None = None) -> torch.Tensor:
        clock = _StepClock(self.net, self.device, timings)
        started = time.perf_counter()
        try:
            out = self.wrapper.generate(batch_size=batch)
        finally:
            clock.close()
        if timings is not None:
            timings.total_seconds += time.perf_counter() - started
        return out


class AutoregressiveBaseline:
    """x-transformers left-to-right decoding with a KV cache, full length, at our model's size."""

    name = "xt-ar-kv"

    def __init__(self, config, start_id: int, device: torch.device):
        xt = _xt()
        net = xt.TransformerWrapper(num_tokens=config.vocab_size, max_seq_len=config.max_seq_len,
                                    attn_layers=xt.Decoder(**_layer_kwargs(config)))
        self.wrapper = xt.AutoregressiveWrapper(net).to(device).eval()
        self.net, self.device, self.length, self.start_id = net, device, config.max_seq_len, start_id

    def parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    @torch.no_grad()
    def generate(self, batch: int, timings: LoopTimings | None = None) -> torch.Tensor:
        prompt = torch.full((batch, 1), self.start_id, dtype=torch.long, device=self.device)
        clock = _StepClock(self.net, self.device, timings)
        started = time.perf_counter()
        try:
            out = self.wrapper.generate(prompt, self.length - 1, cache_kv=True)
        finally:
            clock.close()
        if timings is not None:
            timings.total_seconds += time.perf_counter() - started
        return out
