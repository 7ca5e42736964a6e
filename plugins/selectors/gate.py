"""``gate``: the Imadarem V default. A position takes its proposal iff the learned refine gate says so."""

from imadarem.runtime import rules
from imadarem.runtime.selector import Decision, Selector, StepState, check_fraction


class GateSelector(Selector):
    """Update a position iff the model's refinement gate exceeds ``threshold`` (0.5)."""

    name = "gate"
    requires = frozenset({"gate"})
    summary = "update iff the learned refine gate > threshold (Imadarem V default)"

    def __init__(self, *, threshold: float = 0.5):
        self.threshold = check_fraction("threshold", threshold)

    def select(self, state: StepState) -> Decision:
        return Decision(update=rules.gate_update(state.gate, self.threshold) & state.editable)
