"""Imadarem's deployment side: numpy + onnxruntime only (never torch, onnx or RDKit).

``Generator`` runs one batch loop over a model file of any format (``runtime/formats/``: each format's
contract and decoding strategy); the registry finds selector, tokenizer and command plugins through the
``imadarem`` entry points. onnxruntime itself is imported only when a model is opened, so plugin listing
and ``--help`` stay instant. docs/ARCHITECTURE.md has the contract.
"""

from imadarem.runtime.errors import (
    CheckpointError,
    DataError,
    ImadaremError,
    ModelFileError,
    PluginError,
    PromptError,
    SelectorError,
    TokenizerError,
    UnknownPluginError,
)
from imadarem.runtime.hookspecs import hookimpl, hookspec
from imadarem.runtime.lazy import lazy_getattr
from imadarem.runtime.registry import (
    create_selector,
    get_selector_class,
    get_tokenizer_class,
    list_plugins,
    plugin_problems,
    tokenizer_from_json,
    tokenizer_to_json,
)
from imadarem.runtime.selector import Decision, Selector, StepState
from imadarem.runtime.tokenizer import SpecialIds, TokenizerAdapter, VocabularyTokenizer, resolve_special_ids

#: importing these loads the loop (and with it onnxruntime's Python side only on first use)
_LAZY = {"Generator": "generator", "Cancelled": "generator", "Sample": "results", "TrajectoryStep": "results",
         "LoopTimings": "results", "BatchResult": "results", "ModelFile": "formats", "open_model": "formats",
         "describe_model": "formats"}

__all__ = [
    "BatchResult", "Cancelled", "CheckpointError", "DataError", "Decision", "Generator", "ImadaremError",
    "LoopTimings", "ModelFile", "ModelFileError", "PluginError", "PromptError", "Sample", "Selector",
    "SelectorError", "SpecialIds", "StepState", "TokenizerAdapter", "TokenizerError", "TrajectoryStep",
    "UnknownPluginError", "VocabularyTokenizer", "create_selector", "describe_model", "get_selector_class",
    "get_tokenizer_class", "hookimpl", "hookspec", "list_plugins", "open_model", "plugin_problems",
    "resolve_special_ids", "tokenizer_from_json", "tokenizer_to_json",
]


__getattr__ = lazy_getattr(__name__, {name: f"imadarem.runtime.{module}" for name, module in _LAZY.items()})
