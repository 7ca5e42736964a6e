"""Fragment prompts (GenMol's fragment tasks) as SELFIES templates, and the check that a molecule keeps them.

A fragment prompt is SMILES with attachment points (``*`` or ``[1*]``), the syntax of GenMol's
data/fragments.csv: two fragments ``A.B`` with one attachment point each ask for a *linker*, one fragment
with attachment points for a *decoration* (motif extension, scaffold decoration), one without for a
*superstructure*. Our generators fill blanks in a sequence of SELFIES symbols (every such sequence is a
valid molecule), so each sample gets a template: the fragments' symbols, fixed, with blanks for new atoms.

Why the templates look as they do:

- Only the end of a SELFIES string is open: a symbol's meaning depends on what comes before it, never on
  what follows. So one attachment point is written last: the fragment's SMILES is rooted so that a
  placeholder atom on it comes last, outside every branch and after every ring closure, and the
  placeholder is dropped. The generator grows the molecule from there freely, rings and branches
  included. A linker is a blank between fragment A, written that way, and fragment B, written from its
  attachment atom on.
- Every other blank lies between fixed symbols, and there SELFIES counts: a branch symbol says how many
  symbols its branch holds, a ring bond how many atoms back it closes. So such a blank holds a fixed
  number of atoms and nothing else (a branch or ring symbol in it would read the fixed symbols after it
  as its own length), each but the last keeping a free bond so that the chain cannot end early; the
  fragment's branch lengths and the ring bonds that span the blank are then rewritten for exactly that
  many atoms. The price: a decoration at those attachment points is a plain chain of 1-6 atoms, and a
  linker a plain chain of 1-8 atoms, without rings or branches.
- The open end's first symbol must be an atom written with the attachment point's bond: a ring or branch
  symbol there would act on the fragment's own last atom (a ring bond back to a neighbour raises the
  order of a fragment bond). Later ring bonds may still reach back into the fragment; now and then one
  bridges an aromatic ring, which then is no longer aromatic, and the molecule no longer keeps it.

``Template.allowed`` lists the symbols each constrained position may hold; a generator that ignores it
breaks the fragment often (random fills then keep a linker about a quarter of the time). ``keeps`` is
GenMol's check, a substructure match of the fragments without their attachment points.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import selfies as sf
from imadarem.chem.syntax import SUPERSTRUCTURE
from imadarem.plugins.tokenizers.selfies import atom_bond
from selfies.grammar_rules import get_index_from_selfies, get_selfies_from_index

try:
    from rdkit import Chem, rdBase
except ImportError:  # importable without RDKit; every function that needs it says what to install
    Chem = rdBase = None

#: linker lengths in atoms, drawn uniformly: our choice of short chains (GenMol draws no linker length:
#: it generates whole molecules around each fragment and cuts the linker out)
LINKER_LENGTHS = range(1, 9)
#: lengths in atoms of the chains at attachment points other than the open end, drawn uniformly
BRANCH_LENGTHS = range(1, 7)

_PLACEHOLDER = 54  # xenon: no fragment holds it (checked), and SELFIES writes it as one symbol
_TRIES, _KEEP, _SEED = 300, 16, 20251205  # random SMILES tried per fragment, distinct writings kept, seed
_BRANCH = re.compile(r"\[(.*)Branch([123])\]")
_RING = re.compile(r"\[(.*)Ring([123])\]")
_XE = re.compile(r"\[[=#/\\]?Xe\]")
_LABELLED_POINT = re.compile(r"\[\d*\*(?::\d+)?\]")
_ACCEPTED = ("accepted: 'A*.B*' (linker: two fragments with one attachment point each), one fragment with "
             "attachment points '*' or '[1*]' (decoration), or 'superstructure:SMILES' (a fragment without "
             "attachment points that the molecule must contain)")


@dataclass(frozen=True)
class FragmentTask:
    """What a fragment prompt asks for: ``kind`` is "linker", "decoration" or "superstructure";
    ``fragments`` are the fragments' canonical SMILES, attachment points included."""

    kind: str
    fragments: tuple[str, ...]

    def query(self):
        """The substructure every kept molecule holds (an RDKit query ``Mol``)."""
        return _query(self.fragments)


@dataclass(frozen=True)
class Template:
    """One sample's prompt. ``text``: SELFIES symbols and ``<mask:N>`` blanks, the last blank open-ended
    when the text ends with it. ``allowed``: blank positions (0-based over the template's tokens, a
    ``<mask:N>`` counting N) that must hold one of the given symbols, so neither the end token nor a
    branch or ring symbol; what SELFIES then derives keeps the fragment."""

    text: str
    allowed: Mapping[int, frozenset[str]]

    def __str__(self) -> str:
        return self.text


def parse_fragment_prompt(prompt: str) -> FragmentTask:
    """The task a fragment prompt asks for; ``ValueError`` with one line saying what is wrong. A fragment
    without attachment points, with or without the ``superstructure:`` mark, asks for a superstructure."""
    _need_rdkit()
    text = prompt.strip() if isinstance(prompt, str) else ""
    superstructure = text.startswith(SUPERSTRUCTURE)
    text = text.removeprefix(SUPERSTRUCTURE).strip()
    pieces = text.split(".")
    if not all(pieces):
        raise ValueError(f"fragment prompt {prompt!r} has an empty fragment; {_ACCEPTED}")
    if len(pieces) > 2:
        raise ValueError(f"fragment prompt {prompt!r} has {len(pieces)} fragments, at most 2; {_ACCEPTED}")
    mols = [_fragment_mol(piece) for piece in pieces]
    points = [sum(atom.GetAtomicNum() == 0 for atom in mol.GetAtoms()) for mol in mols]
    if len(mols) == 2 and points != [1, 1]:
        raise ValueError(f"linker prompt {prompt!r} has {points[0]} and {points[1]} attachment points, "
                         f"not one each; {_ACCEPTED}")
    kind = "linker" if len(mols) == 2 else "decoration" if points[0] else "superstructure"
    if superstructure and kind != "superstructure":
        raise ValueError(f"superstructure prompt {prompt!r} has attachment points; {_ACCEPTED}")
    return FragmentTask(kind, tuple(Chem.MolToSmiles(mol) for mol in mols))


def templates(task: FragmentTask, rng: np.random.Generator, *, max_len: int,
              vocabulary: Iterable[str]) -> Template:
    """One sample's template for ``task``, drawn with ``rng``: which writing of the fragments (so which
    attachment point is the open end, or for a superstructure which atom the molecule grows from), and
    how long each fixed-length blank is. At most ``max_len - 1`` tokens (the end token follows); the
    open end is ``<mask:K>`` with K all the room left. A ``Template`` rather than its text, because
    some blank positions must hold atoms of a kind (``Template.allowed``) for the fragments to survive.

    Every fixed symbol must be in ``vocabulary`` (the model's symbols), else ``ValueError`` names the
    missing ones; a prompt's stereo marks are dropped when the vocabulary lacks their symbols (the model
    cannot write them, and ``keeps`` ignores stereo, as GenMol's check does)."""
    _need_rdkit()
    alphabet = _Alphabet(vocabulary)
    try:
        tokens = _tokens(task.kind, task.fragments, rng, alphabet, max_len - 1)
    except _Missing:
        flat = tuple(map(_without_stereo, task.fragments))
        if flat == task.fragments:
            raise
        tokens = _tokens(task.kind, flat, rng, alphabet, max_len - 1)
    allowed = {i: t.allowed for i, t in enumerate(tokens) if isinstance(t, _Blank) and t.allowed is not None}
    return Template(_text(tokens), allowed)


def keeps(task: FragmentTask, smiles: str) -> bool:
    """Whether ``smiles`` is a molecule holding every fragment of ``task`` (as disjoint substructures)."""
    _need_rdkit()
    if not isinstance(smiles, str) or not smiles:
        return False
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    return mol is not None and keeps_mol(task, mol)


def keeps_mol(task: FragmentTask, mol) -> bool:
    """:func:`keeps` of an RDKit molecule already read (an evaluation scores the same molecule further)."""
    return mol.HasSubstructMatch(task.query())


# -- the prompt and the check ---------------------------------------------------------------------------

def _need_rdkit() -> None:
    if Chem is None:
        raise ImportError("fragment prompts need RDKit: pip install rdkit")


def _fragment_mol(smiles: str):
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"fragment {smiles!r} is not valid SMILES; {_ACCEPTED}")
    for atom in mol.GetAtoms():
        if atom.GetAtomicNum() == _PLACEHOLDER:
            raise ValueError(f"fragment {smiles!r} holds xenon, which stands for attachment points here; "
                             f"{_ACCEPTED}")
        bonded = [n for n in atom.GetNeighbors() if n.GetAtomicNum() != 0]
        if atom.GetAtomicNum() == 0 and (atom.GetDegree() != 1 or len(bonded) != 1):
            raise ValueError(f"an attachment point of fragment {smiles!r} has {atom.GetDegree()} bonds to "
                             f"{len(bonded)} fragment atoms; each '*' bonds to exactly one fragment atom")
    return mol


@lru_cache(maxsize=256)
def _query(fragments: tuple[str, ...]):
    # GenMol's filter_by_substructure: plain '*' attachment points, read as SMARTS, deleted, written as
    # SMILES and read as SMARTS again; so aromatic atoms must stay aromatic, and stereo is not checked
    smarts = _LABELLED_POINT.sub("*", ".".join(fragments))
    query = Chem.DeleteSubstructs(Chem.MolFromSmarts(smarts), Chem.MolFromSmiles("*"))
    return Chem.MolFromSmarts(Chem.MolToSmiles(query))


def _without_stereo(smiles: str) -> str:
    mol = Chem.MolFromSmiles(smiles)
    Chem.RemoveStereochemistry(mol)
    return Chem.MolToSmiles(mol)


# -- the symbols a blank may hold ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Blank:
    """A blank position: the symbols it may hold (None: any, or the end token), and whether it starts a
    blank of its own (a ``<mask:N>`` marker)."""

    allowed: frozenset[str] | None
    starts: bool = False


class _Missing(ValueError):
    """The model's vocabulary lacks symbols that every writing of a fragment needs."""


class _Alphabet:
    def __init__(self, vocabulary: Iterable[str]):
        self.vocabulary = frozenset(vocabulary)
        self.bond = {s: a[0] for s in self.vocabulary if (a := atom_bond(s)) is not None}
        self.atoms = frozenset(self.bond)
        self.chain = frozenset(s for s in self.bond if atom_bond(s)[1])

    def writable(self, writings: Iterable[tuple[str, ...]], fragment: str) -> list[tuple[str, ...]]:
        """The writings whose symbols (xenon aside) are all in the vocabulary; _Missing if none is."""
        lacking = [{s for s in w if s not in self.vocabulary and not _XE.fullmatch(s)} for w in writings]
        usable = [w for w, missing in zip(writings, lacking) if not missing]
        if not usable:
            raise _Missing(f"the model's vocabulary lacks the SELFIES symbol(s) "
                           f"{', '.join(sorted(min(lacking, key=len)))} that fragment {fragment!r} needs")
        return usable

    def first(self, symbols: frozenset[str], bond: tuple) -> frozenset[str]:
        """The symbols written with ``bond``: a blank's first atom keeps the attachment point's bond."""
        found = frozenset(s for s in symbols if self.bond[s] == bond)
        if not found:
            raise ValueError("the model's vocabulary has no atom symbol for the blank at an attachment "
                             f"point (an atom written with a bond of order {bond[0]})")
        return found

    def chain_blank(self, bond: tuple, n: int, *, closed: bool) -> list[_Blank]:
        """n atoms in a row, the first bonded with ``bond``; each but the last keeps a free bond, so SELFIES
        derives exactly n atoms; the last too when ``closed`` (a linker, which fragment B follows)."""
        slots = [self.chain] * (n - 1) + [self.chain if closed else self.atoms]
        return [_Blank(self.first(slots[0], bond), True)] + [_Blank(s) for s in slots[1:]]

    def open_end(self, bond: tuple, n: int) -> list[_Blank]:
        """n blanks the generator may end early, the first an atom with ``bond``."""
        return [_Blank(self.first(self.atoms, bond), True)] + [_Blank(None)] * (n - 1)


# -- writings of a fragment -----------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _placed(smiles: str) -> str:
    """The fragment with xenon for its attachment points."""
    mol = Chem.RWMol(Chem.MolFromSmiles(smiles))
    for atom in mol.GetAtoms():
        if atom.GetAtomicNum() == 0:
            atom.SetAtomicNum(_PLACEHOLDER)
            atom.SetIsotope(0)
            atom.SetAtomMapNum(0)
            atom.SetNoImplicit(True)
    return Chem.MolToSmiles(mol)


@lru_cache(maxsize=256)
def _open_sites(smiles: str) -> tuple[str, ...]:
    """A superstructure's fragment with xenon on one atom that has an implicit hydrogen, for each such
    atom (GenMol's attachment sites, ``[*;h]``)."""
    mol = Chem.MolFromSmiles(smiles)
    sites = []
    for atom in mol.GetAtoms():
        if atom.GetNumImplicitHs() > 0:
            placed = Chem.RWMol(mol)
            xenon = Chem.Atom(_PLACEHOLDER)
            xenon.SetNoImplicit(True)
            placed.AddBond(atom.GetIdx(), placed.AddAtom(xenon), Chem.BondType.SINGLE)
            Chem.SanitizeMol(placed)
            sites.append(Chem.MolToSmiles(placed))
    if not sites:
        raise ValueError(f"superstructure fragment {smiles!r} has no atom with a hydrogen to grow from")
    return tuple(sites)


@lru_cache(maxsize=1024)
def _writings(smiles: str, rooted: bool) -> tuple[tuple[str, ...], ...]:
    """Distinct SELFIES writings of ``smiles`` (attachment points as xenon), from random SMILES: rooted,
    starting at its one xenon; else ending on a xenon outside every branch, and not starting with one."""
    mol = Chem.MolFromSmiles(smiles)
    found: dict[tuple[str, ...], None] = {}
    error = ""
    for written in Chem.MolToRandomSmilesVect(mol, _TRIES, randomSeed=_SEED):
        if written.startswith("[Xe]") != rooted or not (rooted or written.endswith("[Xe]")):
            continue
        try:
            symbols = tuple(sf.split_selfies(sf.encoder(written, strict=True)))
        except sf.EncoderError as exc:
            error = ": " + str(exc).strip().splitlines()[0]
            continue
        top = [item[0] == "atom" and bool(_XE.fullmatch(item[1])) for item in _tree(symbols)]
        if top[0] == rooted and (rooted or top[-1]):  # the string test above, on the derivation tree
            found[symbols] = None
        if len(found) == _KEEP:
            break
    if not found:
        raise ValueError(f"fragment {smiles.replace('[Xe]', '*')!r} has no SELFIES writing that "
                         f"{'starts' if rooted else 'ends'} at an attachment point{error}")
    return tuple(found)


def _pick(rng: np.random.Generator, options: tuple):
    return options[int(rng.integers(len(options)))]


# -- SELFIES derivation trees ---------------------------------------------------------------------------

def _tree(symbols: tuple[str, ...]) -> list[tuple]:
    """The derivation tree of a SELFIES writing: a chain is a list of ("atom", symbol, number),
    ("ring", bond, number of the atom it closes to) and ("branch", bond, chain) items. Atoms are numbered
    in derivation order, the order in which ring bonds count back."""
    count = 0

    def chain(i: int, end: int, prev: int) -> list[tuple]:
        nonlocal count
        items = []
        while i < end:
            match = _BRANCH.fullmatch(symbols[i]) or _RING.fullmatch(symbols[i])
            if match is None:
                items.append(("atom", symbols[i], count))
                prev, count, i = count, count + 1, i + 1
                continue
            n = int(match[2])
            q, i = get_index_from_selfies(*symbols[i + 1 : i + 1 + n]), i + 1 + n
            if match.re is _RING:
                items.append(("ring", match[1], prev - q - 1))
            else:
                items.append(("branch", match[1], chain(i, i + q + 1, prev)))
                i += q + 1
        return items

    return chain(0, len(symbols), -1)


def _blanks(chain: list[tuple], rng: np.random.Generator, alphabet: _Alphabet, short: bool) -> list[tuple]:
    """The chain with each xenon (each is the last item of a branch) as a ("blank", slots) of a drawn
    length, one atom when ``short``."""
    items = []
    for item in chain:
        if item[0] == "atom" and _XE.fullmatch(item[1]):
            n = 1 if short else int(rng.integers(BRANCH_LENGTHS.start, BRANCH_LENGTHS.stop))
            item = ("blank", alphabet.chain_blank(atom_bond(item[1])[0], n, closed=False))
        elif item[0] == "branch":
            item = ("branch", item[1], _blanks(item[2], rng, alphabet, short))
        items.append(item)
    return items


def _write(chain: list[tuple]) -> list:
    """The tokens of a tree: symbols, and a blank's slots; branch lengths and ring bonds are counted
    anew, each blank holding as many atoms as it has slots."""
    number: dict[int, int] = {}
    count = 0

    def write(items: list[tuple], prev: int) -> list:
        nonlocal count
        out: list = []
        for item in items:
            if item[0] == "atom":
                number[item[2]] = prev = count
                count += 1
                out.append(item[1])
            elif item[0] == "blank":
                out += item[1]
                count += len(item[1])
                prev = count - 1
            elif item[0] == "ring":
                out += _counted(f"{item[1]}Ring", prev - number[item[2]] - 1)
            else:
                inner = write(item[2], prev)
                out += _counted(f"{item[1]}Branch", len(inner) - 1) + inner
        return out

    return write(chain, -1)


def _counted(name: str, q: int) -> list[str]:
    index = get_selfies_from_index(q)
    if len(index) > 3:
        raise ValueError(f"a fragment's branch or ring spans {q + 1} SELFIES symbols, more than SELFIES holds")
    return [f"[{name}{len(index)}]", *index]


# -- templates ------------------------------------------------------------------------------------------

def _tokens(kind: str, fragments: tuple[str, ...], rng: np.random.Generator, alphabet: _Alphabet,
            room: int) -> list:
    """A template's tokens: SELFIES symbols and blanks."""
    if kind == "superstructure":
        writings = [w for site in _open_sites(fragments[0]) for w in _writings(site, False)]
    else:
        writings = list(_writings(_placed(fragments[0]), False))
    tree = _tree(_pick(rng, alphabet.writable(writings, fragments[0])))
    bond = atom_bond(tree.pop()[1])[0]  # the open end: the xenon written last
    if kind == "linker":
        head = _write(tree)
        tail = list(_pick(rng, alphabet.writable(_writings(_placed(fragments[1]), True), fragments[1]))[1:])
        fits = [n for n in LINKER_LENGTHS if len(head) + n + len(tail) <= room]
        if not fits:
            raise ValueError(f"the linker prompt needs {len(head) + 1 + len(tail)} tokens, more than the "
                             f"model's {room} before its end token")
        tokens = head + alphabet.chain_blank(bond, _pick(rng, fits), closed=True) + tail
    else:
        body = _write(_blanks(tree, rng, alphabet, short=False))
        if len(body) >= room:  # the fixed-length blanks as short as they go
            body = _write(_blanks(tree, rng, alphabet, short=True))
        if len(body) >= room:
            raise ValueError(f"the fragment needs {len(body) + 1} tokens with its open end, more than the "
                             f"model's {room} before its end token")
        tokens = body + alphabet.open_end(bond, room - len(body))
    alphabet.writable([tuple(t for t in tokens if isinstance(t, str))], ".".join(fragments))  # new counts
    return tokens


def _text(tokens: list) -> str:
    parts: list[str] = []
    for token in tokens:
        if isinstance(token, str):
            parts.append(token)
        elif not token.starts:
            parts[-1] = f"<mask:{int(parts[-1][6:-1]) + 1}>"
        else:
            parts.append("<mask:1>")
    return "".join(parts)


# -- a left-to-right model's form of a prompt ------------------------------------------------------------

def prefix_prompt(task: FragmentTask) -> str:
    """The prompt a left-to-right model can take, as SAFE-GPT takes fragments, first: one fragment with one
    attachment point (the open end). A linker's first fragment; a decoration's fragment with its first
    attachment point kept and the others hydrogens; a superstructure's prompt as it is (it grows from one
    atom already). Its molecules are still checked against ``task``."""
    _need_rdkit()
    if task.kind == "superstructure":
        return SUPERSTRUCTURE + task.fragments[0]
    mol = Chem.RWMol(Chem.MolFromSmiles(task.fragments[0]))
    points = [atom.GetIdx() for atom in mol.GetAtoms() if atom.GetAtomicNum() == 0]
    for index in points[1:]:
        atom = mol.GetAtomWithIdx(index)
        atom.SetAtomicNum(1)
        atom.SetIsotope(0)
        atom.SetAtomMapNum(0)
    return Chem.MolToSmiles(Chem.RemoveHs(mol.GetMol()))
