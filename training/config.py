"""ImplicitRefinementConfig: the sizes and knobs of an Imadarem V model (stored in checkpoints and model files)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from imadarem.runtime.errors import ImadaremError


@dataclass
class ImplicitRefinementConfig:
    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    dropout: float = 0.1
    max_seq_len: int = 64
    max_refinement_steps: int = 6  # K
    stop_threshold: float = 0.02
    diversity_weight: float = 0.05  # weight of relu(0.5 - entropy) on masked positions
    sampling_temperature: float = 1.2
    min_refine_uncertainty: float = 0.1
    use_refine_gate: bool = True
    ema_decay: float = 0.999
    corruption_schedule: str = "linear"  # mask_rate(t) = 1 - t/K, or "cosine": cos(pi/2 * t/K)
    use_critic: bool = False
    mlp_ratio: int = 4
    gate_bias_init: float = 2.0
    # how corrupted positions are filled during training (the rest stay [MASK])
    sample_replace_rate: float = 0.3  # the EMA teacher's own samples: realistic wrong tokens for the gate
    random_replace_rate: float = 0.1
    self_condition_rate: float = 0.5
    gate_loss_weight: float = 1.0
    gate_sparsity_weight: float = 0.01
    gate_smoothness_weight: float = 0.01
    critic_loss_weight: float = 1.0
    # "imadarem-v": masks at rate(t) and a gate that marks wrong tokens (the previous bundled model);
    # "mixture": the masks the samplers show (semi-autoregressive blocks, uniform, one span with its suffix) and
    # a gate that scores, per position, the token that is or will be there (experiments/refine/PLAN.md);
    # "block": block diffusion (BD3-LM's vectorised training on x_t ++ x_0), decoded block by block, with the
    # mixture's gate; a blank's clean suffix stays visible (training/block_objective.py)
    objective: str = "imadarem-v"
    block_size: int = 4  # mixture: the semi-autoregressive block; block: the decoding block
    semi_ar_weight: float = 0.6  # mixture: share of rows masked as a clean prefix, a block, a masked suffix
    span_weight: float = 0.2  # mixture, block: share masked as one span with a clean suffix (mixture: the rest uniform)
    block_suffix_share: float = 0.5  # block: share of blocks masked as a suffix of the block (the rest at a random rate)
    # block: share of rows trained on every left-to-right state of every block at once (training/block_objective.py,
    # "states rows"): the conditionals draft-and-verify samples from, four of them a block instead of about one
    block_states_share: float = 0.0
    # block: what the gate learns. "match": at a mask, will the token sampled there equal the data's; at a token,
    # is it not the data's. "acceptance" (training/acceptance_gate.py): at a mask, the chance that committing its
    # sample now, beside the block's other commits, agrees with committing it after them (1 - total variation
    # between the two conditionals); at a committed token, the chance the left-to-right conditional rejects it
    # (speculative sampling's 1 - min(1, p/q)). The acceptance gate reads detached features: it never moves the trunk
    gate_target: str = "match"
    gate_head_hidden: int = 0  # 0: a linear gate on the last hidden state; > 0: an MLP of that width on it + confidence
    freeze_trunk: bool = False  # train the heads only (the verifier; the gate if gate_loss_weight > 0) (--init-from)
    # block: causal verifier layers on top of the trunk (self-speculative masked diffusion, Campbell et al. 2025):
    # one call drafts every open position of the block from the trunk's marginals and the verifier gives each
    # position's left-to-right conditional given the drafts before it, so a call verifies its drafts in one row.
    # 0: none (drafts are verified by running one state a draft: runtime/formats/block_verify.py)
    verify_layers: int = 0
    verify_loss_weight: float = 1.0
    # what a verifier position attends to besides the earlier positions of its block: "block" nothing else (the
    # trunk's states carry the context), "prefix" every position of the earlier blocks too (training/model.py)
    verify_sees: str = "block"

    def __post_init__(self):
        checks = [
            (self.vocab_size >= 4, "vocab_size must be >= 4"),
            (self.hidden_size > 0 and self.hidden_size % self.num_heads == 0,
             "hidden_size must be a positive multiple of num_heads"),
            (self.num_layers >= 1, "num_layers must be >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.max_seq_len >= 2, "max_seq_len must be >= 2"),
            (self.max_refinement_steps >= 1, "max_refinement_steps must be >= 1"),
            (0.0 <= self.stop_threshold <= 1.0, "stop_threshold must be in [0, 1]"),
            (self.sampling_temperature >= 0, "sampling_temperature must be >= 0"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.corruption_schedule in ("linear", "cosine"), "corruption_schedule must be 'linear' or 'cosine'"),
            (self.objective in ("imadarem-v", "mixture", "block"), "objective must be 'imadarem-v', 'mixture' or 'block'"),
            (self.gate_target in ("match", "acceptance"), "gate_target must be 'match' or 'acceptance'"),
            (self.gate_target == "match" or self.objective == "block", "gate_target 'acceptance' needs objective 'block'"),
            (self.gate_head_hidden >= 0, "gate_head_hidden must be >= 0"),
            (self.verify_layers >= 0, "verify_layers must be >= 0"),
            (self.verify_layers == 0 or self.objective == "block", "verify_layers needs objective 'block'"),
            (self.verify_loss_weight >= 0, "verify_loss_weight must be >= 0"),
            (self.verify_sees in ("block", "prefix"), "verify_sees must be 'block' or 'prefix'"),
            (0.0 <= self.block_suffix_share <= 1.0, "block_suffix_share must be in [0, 1]"),
            (0.0 <= self.block_states_share and self.block_states_share + self.span_weight <= 1.0,
             "block_states_share + span_weight must be in [0, 1]"),
            (self.block_states_share == 0 or self.objective == "block", "block_states_share needs objective 'block'"),
            (self.block_size >= 1, "block_size must be >= 1"),
            (0.0 <= self.semi_ar_weight and 0.0 <= self.span_weight and self.semi_ar_weight + self.span_weight <= 1.0,
             "semi_ar_weight + span_weight must be in [0, 1]"),
            (0.0 <= self.sample_replace_rate + self.random_replace_rate <= 1.0,
             "sample_replace_rate + random_replace_rate must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ImadaremError(f"bad model config: {message}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImplicitRefinementConfig:
        from imadarem.training.checks import config_values

        return cls(**config_values(cls, data, "refine"))
