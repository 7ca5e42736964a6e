"""``uniform``: the fixed-schedule baseline. Masks are revealed in random order, none re-predicted.

Each mask takes its proposal at step t with probability (gamma(t/K) - gamma((t+1)/K)) / gamma(t/K),
which is 1/(K - t) for the linear schedule: the ancestral sampler of absorbing-state diffusion.
"""

import numpy as np
from imadarem.runtime.selector import Decision, Selector, StepState, check_schedule, mask_schedule


class UniformSelector(Selector):
    name = "uniform"
    summary = "reveal a random schedule fraction of masks each step (baseline)"

    def __init__(self, *, schedule: str = "linear"):
        self.schedule = check_schedule(schedule)

    def select(self, state: StepState) -> Decision:
        before = mask_schedule(self.schedule, state.t / state.num_steps)
        after = mask_schedule(self.schedule, (state.t + 1) / state.num_steps)
        rate = 1.0 if before <= 0 else float(np.clip((before - after) / before, 0.0, 1.0))
        reveal = state.rng.random(state.tokens.shape) < rate
        return Decision(update=reveal & state.is_mask & state.editable)
