"""``l2r``: the autoregressive-order baseline. Commit the leftmost ``per_step`` masks each step.

With fewer steps than positions, the loop resolves what is left at the last step; use ``--steps`` equal
to the length for a true left-to-right decode.
"""

import numpy as np
from imadarem.runtime.selector import Decision, Selector, StepState, check_int


class LeftToRightSelector(Selector):
    name = "l2r"
    summary = "commit the leftmost mask(s) each step (autoregressive-order baseline)"

    def __init__(self, *, per_step: int = 1):
        self.per_step = check_int("per_step", per_step)

    def select(self, state: StepState) -> Decision:
        masked = state.is_mask & state.editable
        rank = np.cumsum(masked, axis=-1)
        return Decision(update=masked & (rank <= self.per_step))
