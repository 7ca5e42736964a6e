"""Errors a user can cause and fix.

Everything raised for bad input derives from :class:`ImadaremError`; the CLI prints its message as one
line and exits with status 2. Anything else reaching the top is a bug in Imadarem and keeps its traceback.
"""


class ImadaremError(Exception):
    """Bad input, a broken plugin or a bad model file: a one-line, user-facing message."""


class PluginError(ImadaremError):
    """A plugin failed to load, returned the wrong thing, or clashed with another plugin's name."""


class UnknownPluginError(PluginError, LookupError):
    """A selector or tokenizer name that no installed plugin provides."""


class TokenizerError(ImadaremError):
    """A tokenizer adapter whose special ids, vocabulary or spec break the contract."""


class ModelFileError(ImadaremError):
    """A model file that is missing, not ONNX, lacks Imadarem metadata, or contradicts its graph."""


class SelectorError(ImadaremError):
    """Bad selector options, or a selector used with a model that lacks an output it needs."""


class PromptError(ImadaremError):
    """A prompt with unknown tokens, bad mask markers, or longer than the model allows."""


class CheckpointError(ImadaremError):
    """A training checkpoint that is missing, incomplete or corrupt."""


class DataError(ImadaremError):
    """Training or evaluation data that cannot be read."""
