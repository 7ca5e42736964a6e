"""The fragment prompt reader (hook ``imadarem_prompt_readers``): SMILES with attachment points as prompts.

``imadarem-run refine --prompt 'c1ccc(*)cc1'`` decorates a benzene ring, ``'A*.B*'`` links two fragments:
each sample gets its own SELFIES template (``fragments.templates``: which writing, how long each blank) and
its molecule is checked for the fragments (``fragments.keeps``, as GenMol checks). RDKit loads only when a
fragment prompt arrives (the ``chem`` extra), so this module costs nothing to the rest of the runtime.
"""

from __future__ import annotations

from functools import lru_cache

from imadarem.chem.syntax import looks_like_fragment_prompt
from imadarem.runtime.drawer import SampleDrawer
from imadarem.runtime.errors import ImadaremError, PromptError
from imadarem.runtime.hookspecs import hookimpl
from imadarem.runtime.prompt import parse_prompt, with_allowed
from imadarem.runtime.prompt_reader import PromptReader

__all__ = ["FragmentPrompts", "looks_like_fragment_prompt"]


class FragmentPrompts(PromptReader):
    """SMILES fragments with attachment points ('*', '[1*]'): linker (A*.B*) or decoration; or
    'superstructure:SMILES', a fragment the molecule must contain."""

    name = "fragments"
    summary = ("SMILES fragments with attachment points ('*'): decorate a scaffold, grow a motif, link two fragments; "
               "'superstructure:SMILES': a molecule that contains the fragment")

    def accepts(self, prompt, tokenizer) -> bool:
        return getattr(tokenizer, "name", None) == "selfies" and looks_like_fragment_prompt(prompt)

    def layout(self, prompt, tokenizer, special, max_len, rng):
        fragments = _fragments()
        task = _task(prompt)
        try:
            template = fragments.templates(task, rng, max_len=max_len, vocabulary=tokenizer.symbols)
        except ValueError as exc:
            raise PromptError(f"fragment prompt {prompt!r}: {exc}") from None
        layout = parse_prompt(template.text, tokenizer, special, max_len)
        ids = {pos: tuple(tokenizer.symbols_to_ids(sorted(symbols), prompt)) for pos, symbols in template.allowed.items()}
        return with_allowed(layout, ids)

    def keeps(self, prompt, text) -> bool | None:
        return _fragments().keeps(_task(prompt), text)


@lru_cache(maxsize=64)
def _task(prompt: str):
    try:
        return _fragments().parse_fragment_prompt(prompt)
    except ValueError as exc:
        raise PromptError(str(exc)) from None


def _fragments():
    try:
        from imadarem.chem import fragments
    except ImportError as exc:  # pragma: no cover - the chem extra is missing
        raise ImadaremError(f"fragment prompts need RDKit: pip install 'imadarem[chem]' ({exc})") from None
    if fragments.Chem is None:
        raise ImadaremError("fragment prompts need RDKit: pip install 'imadarem[chem]'")
    return fragments


class MoleculeGrid(SampleDrawer):
    """Molecules (a SELFIES model's SMILES) in a grid, a fragment prompt's fragments highlighted."""

    name = "molecule-grid"
    summary = "molecules in a grid (.svg, .png), a fragment prompt's fragments highlighted (RDKit)"

    def accepts(self, tokenizer) -> bool:
        return getattr(tokenizer, "name", None) == "selfies"

    def draw(self, texts, path, prompt=None) -> None:
        _fragments()  # RDKit, or the one-line hint
        from imadarem.chem.drawing import draw_grid

        task = _task(prompt) if looks_like_fragment_prompt(prompt) else None
        try:
            draw_grid(texts, path, task=task, legend=f"prompt: {prompt}" if prompt else "")
        except (ValueError, OSError) as exc:
            raise ImadaremError(f"--grid {path!r}: {exc}") from None


@hookimpl
def imadarem_prompt_readers():
    return [FragmentPrompts]


@hookimpl
def imadarem_sample_drawers():
    return [MoleculeGrid]
