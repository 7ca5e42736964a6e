"""The fragment-prompt syntax that needs no RDKit: telling a fragment prompt from a template or a prefix.

Both the prompt reader (``plugin.py``, loaded with the runtime's plugins, so without RDKit) and the parser
(``fragments.py``, RDKit) read it from here.
"""

from __future__ import annotations

#: what a prompt starts with to ask for a superstructure (a plain SMILES prompt continues a prefix)
SUPERSTRUCTURE = "superstructure:"


def looks_like_fragment_prompt(prompt: str) -> bool:
    """Whether ``prompt`` reads as a fragment prompt: an attachment point ``*``, or the ``superstructure:``
    mark, and no mask marker."""
    return (isinstance(prompt, str) and ("*" in prompt or prompt.lstrip().startswith(SUPERSTRUCTURE))
            and "<mask" not in prompt)
