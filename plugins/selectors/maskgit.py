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
    check_schedule,
    gumbel,
    keep_top,
    mask_schedule,
)


class MaskGITSelector(Selector):
    name = "maskgit"
    summary = "unmask the most confident proposals on a linear/cosine schedule"

    def __init__(self, *, schedule: str = "cosine", noise: float = 4.5, anneal_temperature: bool = True,
                 can_remask_prev: bool = False):
        self.schedule = check_schedule(schedule)
        if float(noise) < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise = float(noise)
        self.anneal_temperature = bool(anneal_temperature)
        self.can_remask_prev = bool(can_remask_prev)

    def step_temperature(self, t, num_steps, base):
        return base * (1.0 - t / num_steps) if self.anneal_temperature else base

    def select(self, state: StepState) -> Decision:
        editable = state.editable
        masked = state.is_mask & editable
        ratio = (state.t + 1) / state.num_steps
        n_editable = editable.sum(-1)
        still_masked = np.floor(n_editable * mask_schedule(self.schedule, ratio)).astype(np.int64)
        if self.can_remask_prev:
            candidates = editable
            conf = np.where(masked, state.proposal_prob, state.current_prob)
        else:
            candidates = masked
            conf = state.proposal_prob
            # never ask for more masks than there are now
            still_masked = np.minimum(still_masked, masked.sum(-1))
        score = np.log(np.maximum(conf, 1e-30))
        scale = self.noise * (1.0 - ratio)
        if scale > 0:
            score = score + scale * gumbel(state.rng, score.shape)
        keep = keep_top(score, candidates, candidates.sum(-1) - still_masked)
        return Decision(update=keep & masked, remask=candidates & ~keep)
