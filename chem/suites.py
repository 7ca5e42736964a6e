"""Fragment-task suites: GenMol's 10 drugs, and prompts cut from MOSES test molecules by the same rules.

A suite is a list of :class:`FragmentCase`: one prompt for one of GenMol's four tasks, with the molecule it was
cut from (GenMol's ``distance`` compares the samples with it). GenMol's suite (``data/genmol_fragments.csv``,
from NVIDIA-Digital-Bio/genmol, Apache-2.0; see ``data/NOTICE``) cut ten drugs this way, and
:func:`cut_case` applies the same rules to any molecule:

- **linker design**: two BRICS bonds whose cut leaves three pieces; the two end pieces, each with its
  attachment point (labelled with its BRICS environment, ``[11*]``), are the prompt, the middle piece the
  linker to generate;
- **motif extension**: one of those end pieces, alone (GenMol's is the linker prompt's first fragment);
- **scaffold decoration**: the Bemis-Murcko scaffold with an attachment point ``[n*]`` wherever a side
  chain was;
- **superstructure generation**: the Bemis-Murcko scaffold, without attachment points.

``moses_suite`` draws molecules from MOSES's test split with a fixed seed and keeps the first ones each task can
be cut from (and whose molecule holds its prompt by GenMol's check); the suite the product evaluates is written once to ``data/moses_fragments.csv`` (so every run
scores the same prompts, whatever the RDKit version) by ``python -m imadarem.chem.suites``.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from importlib import resources

import numpy as np
from imadarem.chem import fragments

try:
    from rdkit import Chem, rdBase
    from rdkit.Chem import BRICS
    from rdkit.Chem.Scaffolds import MurckoScaffold
except ImportError:  # importable without RDKit; cutting says what to install
    Chem = rdBase = BRICS = MurckoScaffold = None

#: GenMol's four tasks, in its order and with its names (data/fragments.csv's columns)
TASKS = ("linker_design", "motif_extension", "scaffold_decoration", "superstructure_generation")
SUITES = ("genmol", "moses")
#: MOSES prompts per task in the shipped suite, and the seed that drew their molecules
MOSES_PER_TASK, MOSES_SEED = 60, 0
#: the smallest end piece of a linker cut and the smallest linker, in heavy atoms (GenMol's smallest end
#: piece is ERLOTINIB's ethynyl, 2 atoms; its linkers are rings or chains of 3 and more)
MIN_END_ATOMS, MIN_LINKER_ATOMS = 2, 3


@dataclass(frozen=True)
class FragmentCase:
    """One prompt of a suite: ``name`` of its molecule, the ``task``, the molecule's SMILES (``original``) and
    the fragment ``prompt`` (SMILES with attachment points; a superstructure's has none)."""

    name: str
    task: str
    original: str
    prompt: str


def load_suite(suite: str) -> list[FragmentCase]:
    """The shipped suite ``suite`` ("genmol" or "moses"), task by task in GenMol's order."""
    if suite not in SUITES:
        raise ValueError(f"unknown fragment suite {suite!r}; choose one of {', '.join(SUITES)}")
    text = resources.files("imadarem.chem").joinpath(f"data/{suite}_fragments.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    return [FragmentCase(row["name"], task, row["smiles"], row[task])
            for task in TASKS for row in rows if row.get(task)]


def cut_case(smiles: str, task: str, rng: np.random.Generator) -> str | None:
    """The prompt ``task`` cuts from ``smiles`` by GenMol's rules (module docstring), drawn with ``rng`` where
    several cuts qualify; None when the molecule has none."""
    _need_rdkit()
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    if task in ("linker_design", "motif_extension"):
        cuts = _linker_cuts(mol)
        if not cuts:
            return None
        ends = cuts[int(rng.integers(len(cuts)))]
        return ".".join(ends) if task == "linker_design" else ends[int(rng.integers(2))]
    if task == "scaffold_decoration":
        return _decorated_scaffold(mol)
    if task == "superstructure_generation":
        scaffold = MurckoScaffold.GetScaffoldForMol(mol)
        if scaffold.GetNumAtoms() == 0 or scaffold.GetNumAtoms() == mol.GetNumAtoms():
            return None
        return Chem.MolToSmiles(scaffold)
    raise ValueError(f"unknown fragment task {task!r}; choose one of {', '.join(TASKS)}")


def moses_suite(test_smiles: list[str], per_task: int = MOSES_PER_TASK, seed: int = MOSES_SEED) -> list[FragmentCase]:
    """``per_task`` prompts per task from MOSES test molecules: the molecules in an order drawn with ``seed``,
    each task taking the first ones it can be cut from (a molecule serves at most one task, so the tasks do not
    share molecules)."""
    _need_rdkit()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(test_smiles))
    cases: dict[str, list[FragmentCase]] = {task: [] for task in TASKS}
    for index in order:
        open_tasks = [task for task in TASKS if len(cases[task]) < per_task]
        if not open_tasks:
            break
        task = open_tasks[int(index) % len(open_tasks)]
        prompt = cut_case(test_smiles[index], task, rng)
        # GenMol's check reads a scaffold's [nH] as "this n carries H", so an N-substituted ring's scaffold
        # would not be found in its own molecule: such prompts are left out
        if prompt is not None and fragments.keeps(fragments.parse_fragment_prompt(prompt), test_smiles[index]):
            cases[task].append(FragmentCase(f"MOSES-test-{int(index)}", task, test_smiles[index], prompt))
    return [case for task in TASKS for case in cases[task]]


def write_suite(cases: list[FragmentCase], path) -> None:
    """A suite as GenMol's CSV layout: one row per case (the other tasks' columns empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["name", "smiles", *TASKS], lineterminator="\n")
        writer.writeheader()
        for case in cases:
            writer.writerow({"name": case.name, "smiles": case.original, case.task: case.prompt})


# -- the cuts ------------------------------------------------------------------------------------------------

def _need_rdkit() -> None:
    if Chem is None:
        raise ImportError("fragment suites need RDKit: pip install 'imadarem[chem]'")


def _linker_cuts(mol) -> list[tuple[str, str]]:
    """Every pair of BRICS bonds whose cut leaves two end pieces (one attachment point each, at least
    MIN_END_ATOMS heavy atoms) and a linker between them (two attachment points, at least MIN_LINKER_ATOMS):
    the end pieces' SMILES, BRICS labels on their attachment points."""
    bonds = list(BRICS.FindBRICSBonds(mol))
    found = []
    for (a, la), (b, lb) in itertools.combinations(bonds, 2):
        ids = [mol.GetBondBetweenAtoms(*a).GetIdx(), mol.GetBondBetweenAtoms(*b).GetIdx()]
        labels = [(int(la[0]), int(la[1])), (int(lb[0]), int(lb[1]))]
        pieces = Chem.GetMolFrags(Chem.FragmentOnBonds(mol, ids, dummyLabels=labels), asMols=True)
        if len(pieces) != 3:
            continue
        points = [sum(atom.GetAtomicNum() == 0 for atom in p.GetAtoms()) for p in pieces]
        heavy = [p.GetNumAtoms() - n for p, n in zip(pieces, points)]
        if sorted(points) != [1, 1, 2]:
            continue
        linker = points.index(2)
        ends = [i for i in range(3) if i != linker]
        if heavy[linker] < MIN_LINKER_ATOMS or min(heavy[i] for i in ends) < MIN_END_ATOMS:
            continue
        found.append(tuple(Chem.MolToSmiles(pieces[i]) for i in ends))
    return sorted(set(found))


def _decorated_scaffold(mol) -> str | None:
    """The Murcko scaffold with ``[n*]`` where each side chain was; None without a scaffold or side chain."""
    scaffold = MurckoScaffold.GetScaffoldForMol(mol)
    if scaffold.GetNumAtoms() == 0 or scaffold.GetNumAtoms() == mol.GetNumAtoms():
        return None
    core = Chem.ReplaceSidechains(mol, scaffold)
    if core is None:
        return None
    return Chem.MolToSmiles(core)


if __name__ == "__main__":  # python -m imadarem.chem.suites [MOSES test.csv.gz]: rewrite data/moses_fragments.csv
    import gzip
    import sys
    from pathlib import Path

    source = sys.argv[1] if len(sys.argv) > 1 else str(Path.home() / ".cache/imadarem/moses/test.csv.gz")
    with gzip.open(source, "rt") as f:
        test = [row["SMILES"] for row in csv.DictReader(f)]
    target = Path(__file__).parent / "data" / "moses_fragments.csv"
    write_suite(moses_suite(test), target)
    print(target)
