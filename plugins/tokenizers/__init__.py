"""Built-in tokenizer adapters (entry point ``imadarem = tokenizers``)."""

from imadarem.plugins.tokenizers.char import CharTokenizer
from imadarem.plugins.tokenizers.hf import HFTokenizer
from imadarem.plugins.tokenizers.selfies import SelfiesTokenizer
from imadarem.runtime.hookspecs import hookimpl

__all__ = ["CharTokenizer", "HFTokenizer", "SelfiesTokenizer"]


@hookimpl
def imadarem_tokenizers():
    return [CharTokenizer, SelfiesTokenizer, HFTokenizer]
