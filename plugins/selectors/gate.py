"""``gate``: a position takes its proposal iff the learned gate says so (the default selector).

The gate scores, per position, whether it should take a new token: on a mask, how likely the token sampled
there is right; on a committed token, how likely it is wrong. So one threshold both commits the masks the
model trusts and re-predicts the tokens it doubts (a ``mixture`` refine model; an Imadarem V model's gate
marks every mask). ``min_commit`` keeps the loop moving: a row commits at least that many masks per step,
its highest-scored ones, when none passes the threshold.

A block model with an *acceptance* gate (model config ``gate_target: "acceptance"``,
training/acceptance_gate.py) is read as that gate was trained: on a mask, the chance that committing it now
agrees with committing it after the masks before it; on a token committed in the current block, the chance
the left-to-right conditional rejects it. So a step commits masks in order, the first ``min_commit`` always
and then each next one while its gate passes ``threshold`` (the prefix a speculative verifier accepts), and
a row whose gate rejects one of its block's commits (gate > ``revise_threshold``) takes that token and the
commits after it back to mask instead (ReMDM's remasking, steered by the gate; at most ``revisions`` times a
sample, so the loop always ends). ``joint`` compares the product of the gates along the prefix, the chance that
the prefix agrees as a whole, with the threshold instead of each gate alone.
"""

import numpy as np
from imadarem.runtime import rules
from imadarem.runtime.selector import (
    Decision,
    Selector,
    StepState,
    check_bool,
    check_fraction,
    check_int,
    keep_top,
)


class GateSelector(Selector):
    """Update a position iff the model's gate exceeds ``threshold`` (0.5); at least ``min_commit`` masks a step."""

    name = "gate"
    requires = frozenset({"gate"})
    summary = "update iff the learned gate > threshold: commit trusted masks, re-predict doubted tokens"

    def __init__(self, *, threshold: float = 0.5, min_commit: int = 1, revise_threshold: float = 0.5,
                 revisions: int = 1, joint: bool = False):
        self.threshold = check_fraction("threshold", threshold)
        self.min_commit = check_int("min_commit", min_commit, 0)
        self.revise_threshold = check_fraction("revise_threshold", revise_threshold)
        self.revisions = check_int("revisions", revisions, 0)
        self.joint = check_bool("joint", joint)
        self.acceptance = False
        self.revisions_left = np.zeros(0, dtype=np.int64)

    def begin(self, *, batch_size: int, length: int, num_steps: int, config) -> None:
        self.acceptance = config.get("gate_target") == "acceptance"
        self.revisions_left = np.full(batch_size, self.revisions, dtype=np.int64)

    def select(self, state: StepState) -> Decision:
        if self.acceptance:
            return self._accept_prefix(state)
        update = rules.gate_update(state.gate, self.threshold) & state.editable
        if self.min_commit:
            masked = state.is_mask & state.editable
            missing = np.clip(self.min_commit - (update & masked).sum(-1), 0, None)
            if missing.any():
                update |= keep_top(state.gate, masked & ~update, missing)
        # a row whose masks are all filled and whose gate doubts no token is settled: it stops
        settled = ~(state.is_mask & state.editable).any(-1) & ~update.any(-1)
        return Decision(update=update, stop=settled)

    def _accept_prefix(self, state: StepState) -> Decision:
        masked = state.is_mask & state.editable
        committed = ~state.is_mask & state.editable & (state.tokens != state.pad_id)
        rejected = committed & (state.gate > self.revise_threshold)
        revising = rejected.any(-1) & (self.revisions_left[state.rows] > 0)
        # a rejected token and the block's commits after it go back to mask (they were drawn beside it)
        remask = committed & (np.cumsum(rejected, axis=-1) > 0) & revising[:, None]
        self.revisions_left[state.rows[revising]] -= 1
        rank = np.cumsum(masked, axis=-1)  # 1 for a row's first mask
        forced = rank <= self.min_commit
        if self.joint:  # the prefix's chance of agreeing as a whole: the product of its gates after the forced ones
            gate = np.where(masked & ~forced, state.gate, 1.0)
            passes = (np.cumprod(gate, axis=-1) > self.threshold) | forced
        else:
            passes = (state.gate > self.threshold) | forced
        update = masked & (np.cumprod(np.where(masked, passes, True), axis=-1) > 0) & ~revising[:, None]
        settled = ~masked.any(-1) & ~remask.any(-1)
        return Decision(update=update, remask=remask, stop=settled)
