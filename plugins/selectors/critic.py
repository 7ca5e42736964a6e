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
    check_noise,
    check_schedule,
    keep_top,
    masks_after_step,
    with_annealed_noise,
)


class CriticSelector(Selector):
    name = "critic"
    requires = frozenset({"critic"})
    summary = "re-mask what the token critic distrusts (annealed Gumbel noise)"

    def __init__(self, *, schedule: str = "cosine", noise: float = 1.0):
        self.schedule = check_schedule(schedule)
        self.noise = check_noise(noise)

    def select(self, state: StepState) -> Decision:
        masked = state.is_mask & state.editable
        committed = state.editable & ~state.is_mask
        n_remask = np.minimum(masks_after_step(state, self.schedule), committed.sum(-1))
        p = np.clip(state.critic.astype(np.float64), 1e-6, 1 - 1e-6)
        score = with_annealed_noise(np.log(p) - np.log1p(-p), self.noise, state)
        remask = keep_top(score, committed, n_remask)
        return Decision(update=masked, remask=remask)
