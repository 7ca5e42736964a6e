"""``critic``: token-critic guided re-masking (Lezama et al.; x-transformers' NonAutoregressiveWrapper).

The critic scores the tokens in the step's input (probability that each is wrong). At step t every mask
takes its proposal, and the committed tokens the critic most distrusts (score plus Gumbel noise annealed
by (1 - t/K)) go back to mask, so that a fraction gamma((t+1)/K) of editable positions is masked
after the step. The new masks are re-predicted at the next step by a model that no longer sees them.
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


class CriticSelector(Selector):
    name = "critic"
    requires = frozenset({"critic"})
    summary = "re-mask what the token critic distrusts (annealed Gumbel noise)"

    def __init__(self, *, schedule: str = "cosine", noise: float = 1.0):
        self.schedule = check_schedule(schedule)
        if float(noise) < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise = float(noise)

    def select(self, state: StepState) -> Decision:
        editable = state.editable
        masked = state.is_mask & editable
        committed = editable & ~state.is_mask
        ratio = (state.t + 1) / state.num_steps
        target = np.floor(editable.sum(-1) * mask_schedule(self.schedule, ratio)).astype(np.int64)
        n_remask = np.minimum(target, committed.sum(-1))
        p = np.clip(state.critic.astype(np.float64), 1e-6, 1 - 1e-6)
        score = np.log(p) - np.log1p(-p)
        scale = self.noise * (1.0 - ratio)
        if scale > 0:
            score = score + scale * gumbel(state.rng, score.shape)
        remask = keep_top(score, committed, n_remask)
        return Decision(update=masked, remask=remask)
