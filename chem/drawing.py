"""Molecules in a grid, with a prompt's fragments highlighted (``imadarem-run --grid``, ``imadarem eval fragments
--grid``): chemists look before they read.

RDKit's ``Draw.MolsToGridImage``; SVG always works, PNG needs RDKit's Cairo backend (the PyPI wheels have
it). A molecule that does not parse is drawn as an empty cell with its text as the legend.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from imadarem.runtime.files import replace_atomically

#: grid layout: molecules per row and each cell's size in pixels
PER_ROW, CELL = 4, (300, 260)


def draw_grid(texts: Sequence[str | None], path: str | Path, task=None, legend: str = "",
              per_row: int = PER_ROW) -> Path:
    """Draw ``texts`` (SMILES) into ``path`` (.svg or .png), atoms and bonds of ``task``'s fragments
    (``fragments.FragmentTask``) highlighted. ``legend`` goes under the first cell."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import Draw

    path = Path(path)
    if path.suffix.lower() not in (".svg", ".png"):
        raise ValueError(f"--grid {str(path)!r}: the picture's name must end in .svg or .png")
    mols, legends, atoms, bonds = [], [], [], []
    query = task.query() if task is not None else None
    with rdBase.BlockLogs():
        for i, text in enumerate(texts):
            mol = Chem.MolFromSmiles(text) if text else None
            label = text or "(empty)"
            if mol is None:
                mol, label = Chem.Mol(), f"invalid: {label}"
            match = mol.GetSubstructMatch(query) if query is not None and mol.GetNumAtoms() else ()
            atoms.append(list(match))
            bonds.append([b.GetIdx() for b in mol.GetBonds()
                          if b.GetBeginAtomIdx() in match and b.GetEndAtomIdx() in match])
            mols.append(mol)
            legends.append((legend + "\n" if legend and i == 0 else "") + _short(label))
    svg = path.suffix.lower() == ".svg"
    if not mols:
        raise ValueError("no molecules to draw")
    image = Draw.MolsToGridImage(mols, molsPerRow=per_row, subImgSize=CELL, legends=legends,
                                 highlightAtomLists=atoms, highlightBondLists=bonds, useSVG=svg)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        if svg:
            tmp.write((image if isinstance(image, str) else image.data).encode())
        elif getattr(image, "data", None) is not None:
            tmp.write(image.data)
        else:
            image.save(tmp, format="PNG")
    replace_atomically(tmp.name, path)  # a half-drawn picture never replaces a finished one
    return path


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
