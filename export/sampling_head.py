"""The optional sampling head: what the loop does with ``logits`` each step, done inside the graph.

Without it, the loop brings the [batch, length, vocab] logits to the host every step and samples and
measures uncertainty there in numpy; on a GPU that host work is most of the wall time. With it, the
graph also takes

| in `uniform` | float32 [batch, length] | one uniform draw per position, in [0, 1) |
| in `temperature` | float32 [batch] | sampling temperature (<= 1e-6: argmax) |
| in `logit_bias` | float32 [length, vocab] | added to the logits: -inf bans (MASK, PAD, UNK, template EOS rules) |

and returns, besides the step's own outputs, what every built-in selector reads, all [batch, length]:
`proposals` (int64, sampled by inverse CDF: one uniform per position instead of one per logit),
`proposal_prob`, `entropy`, `top1`, `top2` and `current_prob` (temperature-1 probabilities of the
banned distribution, as the host computes them). The graph also bans EOS before a row's first
committed EOS, as the host loop does. ``logits`` stays an output, so a selector that reads the full
distribution still gets it (the loop fetches it from the GPU only then).

The head is exported once in float32 and grafted onto the finished step graph (fp32, fp16 or int8), so
its cumulative sums and logs never run in float16 and quantisation never touches it.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from imadarem.runtime import rules
from imadarem.runtime.formats.refine import SAMPLING_INPUTS, SAMPLING_OUTPUTS

#: the step-graph values the head reads (inputs and outputs of the step, by name)
_SHARED = ("logits", "tokens")
GREEDY_TEMPERATURE = rules.GREEDY_TEMPERATURE


def _head_module(vocab_size: int, mask_id: int, eos_id: int | None):
    import torch

    class SamplingHead(torch.nn.Module):
        def forward(self, logits, tokens, uniform, temperature, logit_bias):
            scores = logits.float() + logit_bias
            if eos_id is not None:  # no EOS before a committed one (the length is final once it is)
                before = rules.eos_banned(rules.first_eos(tokens, eos_id), tokens.shape[1])
                eos_col = torch.arange(vocab_size, device=tokens.device) == eos_id
                scores = scores.masked_fill(before[..., None] & eos_col, float("-inf"))
            probs = torch.softmax(scores, -1)
            entropy = rules.entropy(scores)
            top = probs.topk(2, -1).values
            temp = temperature.clamp(min=GREEDY_TEMPERATURE)
            cdf = torch.softmax(scores / temp[:, None, None], -1).cumsum(-1)
            target = uniform[..., None] * cdf[..., -1:]
            drawn = (cdf < target).sum(-1).clamp(max=vocab_size - 1)
            proposals = torch.where(temperature[:, None] <= GREEDY_TEMPERATURE, scores.argmax(-1), drawn)
            proposal_prob = probs.gather(-1, proposals[..., None])[..., 0]
            is_mask = tokens == mask_id
            current = probs.gather(-1, torch.where(is_mask, 0, tokens)[..., None])[..., 0]
            current_prob = torch.where(is_mask, torch.zeros_like(current), current)
            return proposals, proposal_prob, entropy, top[..., 0], top[..., 1], current_prob

    return SamplingHead().eval()


def export_head(vocab_size: int, mask_id: int, eos_id: int | None, max_seq_len: int, opset: int):
    """The head alone as an ONNX ModelProto (dynamic batch and length)."""
    import onnx
    import torch

    batch, length = 2, min(8, max_seq_len)
    args = (torch.zeros(batch, length, vocab_size), torch.full((batch, length), mask_id, dtype=torch.long),
            torch.full((batch, length), 0.5), torch.ones(batch), torch.zeros(length, vocab_size))
    B = torch.export.Dim("batch", min=1, max=1 << 20)
    L = torch.export.Dim("length", min=1, max=max_seq_len)
    dynamic = {"logits": {0: B, 1: L}, "tokens": {0: B, 1: L}, "uniform": {0: B, 1: L}, "temperature": {0: B},
               "logit_bias": {0: L}}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "head.onnx"
        program = torch.onnx.export(_head_module(vocab_size, mask_id, eos_id), args, dynamo=True,
                                    input_names=list(_SHARED + SAMPLING_INPUTS),
                                    output_names=list(SAMPLING_OUTPUTS), dynamic_shapes=dynamic,
                                    opset_version=opset, optimize=True, verbose=False)
        program.save(str(raw), external_data=False)
        return onnx.load(str(raw))


def graft_sampling_head(step, head, prefix: str = "sampling/"):
    """Add ``head``'s nodes to the ``step`` graph (in place): its ``logits`` and ``tokens`` inputs are
    the step's own values, its other inputs and its outputs become the step graph's."""
    from onnx import helper

    g, h = step.graph, head.graph
    if any(i.name in SAMPLING_INPUTS for i in g.input):
        raise ValueError("the step graph already has a sampling head")
    if list(head.functions):
        raise ValueError("the sampling head has local functions; export it with optimize=True")
    keep = set(_SHARED) | set(SAMPLING_INPUTS) | set(SAMPLING_OUTPUTS)

    def rename(name: str) -> str:
        return name if (not name or name in keep) else prefix + name

    for init in h.initializer:
        init.name = rename(init.name)
        g.initializer.append(init)
    for node in h.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        node.name = prefix + (node.name or node.op_type)
        g.node.append(node)
    g.input.extend(i for i in h.input if i.name in SAMPLING_INPUTS)
    g.output.extend(o for o in h.output if o.name in SAMPLING_OUTPUTS)
    # domains only the head uses (both graphs are exported at the same default-domain opset)
    have = {op.domain for op in step.opset_import}
    for op in head.opset_import:
        if op.domain not in have:
            step.opset_import.append(helper.make_opsetid(op.domain, op.version))
    return step
