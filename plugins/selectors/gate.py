"""``gate``: a position takes its proposal iff the learned gate says so (the default selector).

The gate scores, per position, whether it should take a new token: on a mask, how likely the token sampled
there is right; on a committed token, how likely it is wrong. So one threshold both commits the masks the
model trusts and re-predicts the tokens it doubts (a ``mixture`` refine model; an Imadarem V model's gate
marks every mask). ``min_commit`` keeps the loop moving: a row commits at least that many masks per step,
its highest-scored ones, when none passes the threshold.
"""

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.selector import Decision, Selector, StepState, check_fraction, check_int, keep_top


class GateSelector(Selector):
    """Update a position iff the model's gate exceeds ``threshold`` (0.5); at least ``min_commit`` masks a step."""

    name = "gate"
    requires = frozenset({"gate"})
    summary = "update iff the learned gate > threshold: commit trusted masks, re-predict doubted tokens"

    def __init__(self, *, threshold: float = 0.5, min_commit: int = 1):
        self.threshold = check_fraction("threshold", threshold)
        self.min_commit = check_int("min_commit", min_commit, 0)

    def select(self, state: StepState) -> Decision:
        update = rules.gate_update(state.gate, self.threshold) & state.editable
        if self.min_commit:
            masked = state.is_mask & state.editable
            missing = np.clip(self.min_commit - (update & masked).sum(-1), 0, None)
            if missing.any():
                update |= keep_top(state.gate, masked & ~update, missing)
        # a row whose masks are all filled and whose gate doubts no token is settled: it stops
        settled = ~(state.is_mask & state.editable).any(-1) & ~update.any(-1)
        return Decision(update=update, stop=settled)
