"""Imadarem's deployment side: numpy + onnxruntime only (never torch or onnx).

``Generator`` runs the refinement loop over a model file; the registry finds selector and tokenizer
plugins through the ``imadarem`` entry points. onnxruntime itself is imported only when a Generator is
built, so plugin listing and ``--help`` stay instant.
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
from imadarem.runtime.registry import (
    create_selector,
    get_selector_class,
    get_tokenizer_class,
    list_plugins,
    plugin_problems,
)
from imadarem.runtime.selector import Decision, Selector, StepState
from imadarem.runtime.tokenizer import (
    SpecialIds,
    TokenizerAdapter,
    VocabularyTokenizer,
    resolve_special_ids,
    tokenizer_from_json,
    tokenizer_to_json,
)

__all__ = [
    "CheckpointError", "DataError", "Decision", "GenerationResult", "Generator", "ImadaremError",
    "ModelFileError", "PluginError", "PromptError", "Selector", "SelectorError", "SpecialIds", "StepState",
    "TokenizerAdapter", "TokenizerError", "UnknownPluginError", "VocabularyTokenizer", "create_selector",
    "get_selector_class", "get_tokenizer_class", "hookimpl", "hookspec", "list_plugins", "plugin_problems",
    "resolve_special_ids", "tokenizer_from_json", "tokenizer_to_json",
]


def __getattr__(name):
    if name in ("Generator", "GenerationResult"):
        from imadarem.runtime import generator

        return getattr(generator, name)
    raise AttributeError(f"module 'imadarem.runtime' has no attribute {name!r}")
