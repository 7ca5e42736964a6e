"""``confidence``: Fast-dLLM's parallel commit rule, the non-revising baseline of the learned gate.

Each step a position that is still masked takes its sampled proposal when the model gives that proposal
probability above ``threshold``; at least one mask a step is committed, the leftmost (block decoding found
left-to-right fallbacks better than most-confident-first on molecules: experiments/quality) or, with
``fallback="confident"``, the most probable. Committed tokens are never revisited, which is what the gate
adds (it also re-predicts tokens it doubts).
"""

import numpy as np
from imadarem.runtime.selector import Decision, Selector, StepState, check_fraction, keep_top

FALLBACKS = ("left", "confident")


class ConfidenceSelector(Selector):
    """Commit masks whose proposal has probability > ``threshold`` (0.9); at least one a step."""

    name = "confidence"
    summary = "commit masks whose sampled token has probability > threshold, at least one a step (Fast-dLLM)"

    def __init__(self, *, threshold: float = 0.9, fallback: str = "left"):
        self.threshold = check_fraction("threshold", threshold)
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        self.fallback = fallback

    def select(self, state: StepState) -> Decision:
        masked = state.is_mask & state.editable
        update = masked & (state.proposal_prob > self.threshold)
        missing = masked.any(-1) & ~update.any(-1)
        if missing.any():
            if self.fallback == "left":
                first = masked & (np.cumsum(masked, axis=-1) == 1)
                update |= first & missing[:, None]
            else:
                update |= keep_top(state.proposal_prob, masked, missing.astype(np.int64))
        return Decision(update=update)
