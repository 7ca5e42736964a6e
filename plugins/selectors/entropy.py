"""``entropy``: the gate-off rule of Imadarem V. Re-predict tokens the model is unsure about.

Uncertainty is the entropy (nats) of the exported model's prediction; the exported weights are the
EMA teacher's, which is the "measured with an EMA teacher" of the Imadarem V description.
"""

from imadarem.runtime import rules
from imadarem.runtime.selector import Decision, Selector, StepState, check_number


class EntropySelector(Selector):
    """Fill every mask; re-predict a committed token iff its entropy > ``threshold``."""

    name = "entropy"
    summary = "re-predict where entropy > min_refine_uncertainty (gate off)"

    def __init__(self, *, threshold: float | None = None):
        self.threshold = None if threshold is None else check_number("threshold", threshold, 0.0)

    def begin(self, *, batch_size, length, num_steps, config):
        if self.threshold is None:
            self.threshold = float(config.get("min_refine_uncertainty", 0.1))

    def select(self, state: StepState) -> Decision:
        return Decision(update=rules.entropy_update(state.is_mask, state.entropy, self.threshold) & state.editable)
