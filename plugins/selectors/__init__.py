"""Built-in selectors (entry point ``imadarem = selectors``): one small module each."""

from imadarem.plugins.selectors.confidence import ConfidenceSelector
from imadarem.plugins.selectors.critic import CriticSelector
from imadarem.plugins.selectors.entropy import EntropySelector
from imadarem.plugins.selectors.gate import GateSelector
from imadarem.plugins.selectors.l2r import LeftToRightSelector
from imadarem.plugins.selectors.maskgit import MaskGITSelector
from imadarem.plugins.selectors.overwrite import OverwriteSelector
from imadarem.plugins.selectors.uniform import UniformSelector
from imadarem.runtime.hookspecs import hookimpl

BUILTIN_SELECTORS = [
    GateSelector,
    EntropySelector,
    MaskGITSelector,
    OverwriteSelector,
    CriticSelector,
    UniformSelector,
    LeftToRightSelector,
    ConfidenceSelector,
]


@hookimpl
def imadarem_selectors():
    return list(BUILTIN_SELECTORS)
