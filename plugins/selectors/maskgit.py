"""``maskgit``: confidence-ordered unmasking (MaskGIT / MAR / Mask-Predict).

At step t every mask gets a proposal; the most confident ones are kept and the rest go back to mask so
that a fraction gamma((t+1)/K) of the editable positions is still masked after the step (linear or
cosine gamma). Confidence is log p(proposal) plus Gumbel noise scaled by ``noise`` * (1 - t/K), and the
sampling temperature is annealed linearly toward 0. With ``can_remask_prev`` committed tokens compete
too (Mask-Predict): their confidence is the probability the model now gives them.
"""

import numpy as np
from imadarem.runtime.selector import (
    Decision,
    Selector,
    StepState,
    check_bool,
    check_noise,
    check_schedule,
    keep_top,
    masks_after_step,
    with_annealed_noise,
)


class MaskGITSelector(Selector):
    name = "maskgit"
    summary = "unmask the most confident proposals on a linear/cosine schedule"

    def __init__(self, *, schedule: str = "cosine", noise: float = 4.5, anneal_temperature: bool = True,
                 can_remask_prev: bool = False):
        self.schedule = check_schedule(schedule)
        self.noise = check_noise(noise)
        self.anneal_temperature = check_bool("anneal_temperature", anneal_temperature)
        self.can_remask_prev = check_bool("can_remask_prev", can_remask_prev)

    def step_temperature(self, t, num_steps, base):
        return base * (1.0 - t / num_steps) if self.anneal_temperature else base

    def select(self, state: StepState) -> Decision:
        masked = state.is_mask & state.editable
        still_masked = masks_after_step(state, self.schedule)
        if self.can_remask_prev:
            candidates = state.editable
            conf = np.where(masked, state.proposal_prob, state.current_prob)
        else:
            candidates = masked
            conf = state.proposal_prob
            # never ask for more masks than there are now
            still_masked = np.minimum(still_masked, masked.sum(-1))
        score = with_annealed_noise(np.log(np.maximum(conf, 1e-30)), self.noise, state)
        keep = keep_top(score, candidates, candidates.sum(-1) - still_masked)
        return Decision(update=keep & masked, remask=candidates & ~keep)
