"""``overwrite``: the dynamic overwrite gate.

Per committed token, three uncertainty signals are z-scored within the sequence: entropy, the top-1/top-2
margin (negated: a small margin is uncertain) and the change in confidence since the previous step.
u = sigmoid(weighted sum), combined by noisy-OR with the learned gate (when ``use_gate``). A positional
maturity prior r = sigmoid(alpha * (tau(i) - t)), tau(i) = T/L * (i + delta), keeps late positions open
longer; p = 1 - (1 - u)(1 - r). Candidates are the top ``budget`` fraction by p (or p > ``threshold``).
An overwrite is accepted only if the model now prefers the proposal to the token in place by at least
``min_gain`` (no regression). Masks are always filled. A sequence stops when no edit is accepted.
"""

import numpy as np
from imadarem.runtime.selector import (
    Decision,
    Selector,
    StepState,
    check_bool,
    check_fraction,
    check_number,
    keep_top,
)


def _zscore(x: np.ndarray, where: np.ndarray) -> np.ndarray:
    n = np.maximum(where.sum(-1, keepdims=True), 1)
    mean = np.where(where, x, 0.0).sum(-1, keepdims=True) / n
    var = np.where(where, (x - mean) ** 2, 0.0).sum(-1, keepdims=True) / n
    return np.where(where, (x - mean) / np.sqrt(var + 1e-6), 0.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class OverwriteSelector(Selector):
    name = "overwrite"
    summary = "z-scored uncertainty + maturity prior, noisy-OR gate, no-regression test"

    def __init__(self, *, mode: str = "topk", budget: float = 0.25, threshold: float = 0.5,
                 alpha: float = 2.0, delta: float = 1.0, w_entropy: float = 1.0, w_margin: float = 1.0,
                 w_change: float = 1.0, use_gate: bool = True, min_gain: float = 0.0):
        if mode not in ("topk", "threshold"):
            raise ValueError(f"mode must be 'topk' or 'threshold', got {mode!r}")
        self.mode = mode
        self.budget = check_fraction("budget", budget)
        self.threshold = check_fraction("threshold", threshold)
        self.alpha, self.delta = check_number("alpha", alpha), check_number("delta", delta)
        self.weights = (check_number("w_entropy", w_entropy), check_number("w_margin", w_margin),
                        check_number("w_change", w_change))
        self.use_gate = check_bool("use_gate", use_gate)
        self.min_gain = check_number("min_gain", min_gain)
        self._prev_conf: np.ndarray | None = None

    def begin(self, *, batch_size, length, num_steps, config):
        self._prev_conf = np.zeros((batch_size, length), dtype=np.float32)

    def select(self, state: StepState) -> Decision:
        editable = state.editable
        masked = state.is_mask & editable
        committed = editable & ~state.is_mask
        conf = state.confidence
        change = np.abs(conf - self._prev_conf[state.rows])
        self._prev_conf[state.rows] = conf

        w_h, w_m, w_c = self.weights
        score = w_h * _zscore(state.entropy, committed) - w_m * _zscore(state.margin, committed)
        if state.t > 0:
            score = score + w_c * _zscore(change, committed)
        u = _sigmoid(score)
        if self.use_gate and state.gate is not None:
            u = 1.0 - (1.0 - u) * (1.0 - state.gate)
        length = np.maximum((state.tokens != state.pad_id).sum(-1, keepdims=True), 1)
        pos = np.arange(state.tokens.shape[1])[None, :]
        tau = state.num_steps / length * (pos + self.delta)
        r = _sigmoid(self.alpha * (tau - state.t))
        p = 1.0 - (1.0 - u) * (1.0 - r)

        if self.mode == "topk":
            k = np.ceil(self.budget * committed.sum(-1)).astype(np.int64)
            candidates = keep_top(p, committed, k)
        else:
            candidates = committed & (p > self.threshold)
        accepted = (candidates & (state.proposals != state.tokens)
                    & (state.proposal_prob >= state.current_prob + self.min_gain))
        stop = None
        if state.t > 0:
            stop = ~(accepted.any(-1) | masked.any(-1))
        return Decision(update=masked | accepted, stop=stop)
