"""Fragment prompts: parsing, SELFIES templates and GenMol's keep check, on GenMol's 40 fragment prompts.

The templates are checked the hard way: their blanks are filled with random symbols (the constrained
positions from what the template allows), decoded with SELFIES, and the molecule must still hold the
fragments.
"""

import re

import numpy as np
import pytest
import selfies as sf
from selfies.grammar_rules import INDEX_ALPHABET

Chem = pytest.importorskip("rdkit.Chem")


from imadarem.chem import fragments as fr  # noqa: E402  (after the RDKit skip)
from imadarem.chem.plugin import looks_like_fragment_prompt  # noqa: E402

# GenMol's data/fragments.csv (NVIDIA-Digital-Bio/genmol, Apache-2.0), drawn from the SAFE-DRUGS set
# (datamol-io/safe, CC-BY-4.0): name, SMILES, then the prompts for linker design, motif extension,
# scaffold decoration and superstructure generation.
GENMOL_FRAGMENTS = [
    ("BARICITINIB", "CCS(=O)(=O)N1CC(CC#N)(n2cc(-c3ncnc4[nH]ccc34)cn2)C1",
     "[11*]C1(CC#N)CN(S(=O)(=O)CC)C1.[13*]c1ncnc2[nH]ccc12",
     "[11*]C1(CC#N)CN(S(=O)(=O)CC)C1",
     "[1*]N1CC([2*])(n2cc(-c3ncnc4[nH]ccc34)cn2)C1",
     "c1nc(-c2cnn(C3CNC3)c2)c2cc[nH]c2n1"),
    ("CYCLOTHIAZIDE", "NS(=O)(=O)c1cc2c(cc1Cl)NC(C1CC3C=CC1C3)NS2(=O)=O",
     "[13*]C1Nc2cc(Cl)c(S(N)(=O)=O)cc2S(=O)(=O)N1.[12*]C1CC2C=CC1C2",
     "[13*]C1Nc2cc(Cl)c(S(N)(=O)=O)cc2S(=O)(=O)N1",
     "[1*]c1cc2c(cc1[2*])NC(C1CC3C=CC1C3)NS2(=O)=O",
     "O=S1(=O)NC(C2CC3C=CC2C3)Nc2ccccc21"),
    ("ELIGLUSTAT", "CCCCCCCC(=O)N[C@H](CN1CCCC1)[C@H](O)c1ccc2c(c1)OCCO2",
     "[11*]N1CCCC1.[17*]c1ccc2c(c1)OCCO2",
     "[17*]c1ccc2c(c1)OCCO2",
     "[1*][C@H](CN1CCCC1)[C@H]([2*])c1ccc2c(c1)OCCO2",
     "c1cc2c(cc1CCCN1CCCC1)OCCO2"),
    ("ERLOTINIB", "C#Cc1cccc(Nc2ncnc3cc(OCCOC)c(OCCOC)cc23)c1",
     "[2*]C#C.[14*]OCCOC",
     "[14*]OCCOC",
     "[1*]c1cccc(Nc2ncnc3cc([2*])c([3*])cc23)c1",
     "c1ccc(Nc2ncnc3ccccc23)cc1"),
    ("FUTIBATINIB", "C=CC(=O)N1CC[C@H](n2nc(C#Cc3cc(OC)cc(OC)c3)c3c(N)ncnc32)C1",
     "[8*][C@H]1CCN(C(=O)C=C)C1.[12*]c1cc(OC)cc(OC)c1",
     "[8*][C@H]1CCN(C(=O)C=C)C1",
     "[1*]N1CC[C@H](n2nc(C#Cc3cc([2*])cc([3*])c3)c3c([4*])ncnc32)C1",
     "C(#Cc1nn([C@H]2CCNC2)c2ncncc12)c1ccccc1"),
    ("LESINURAD", "O=C(O)CSc1nnc(Br)n1-c1ccc(C2CC2)c2ccccc12",
     "[11*]n1c(Br)nnc1SCC(=O)O.[14*]C1CC1",
     "[11*]n1c(Br)nnc1SCC(=O)O",
     "[1*]c1nnc([2*])n1-c1ccc(C2CC2)c2ccccc12",
     "c1ccc2c(-n3cnnc3)ccc(C3CC3)c2c1"),
    ("LIOTHYRONINE", "N[C@@H](Cc1cc(I)c(Oc2ccc(O)c(I)c2)c(I)c1)C(=O)O",
     "[3*]C[C@H](N)C(=O)O.[8*]c1ccc(O)c(I)c1",
     "[3*]C[C@H](N)C(=O)O",
     "[1*]c1cc([2*])c(Oc2ccc([3*])c([4*])c2)c([5*])c1",
     "c1ccc(Oc2ccccc2)cc1"),
    ("LOVASTATIN", "CC[C@H](C)C(=O)O[C@H]1C[C@@H](C)C=C2C=C[C@H](C)[C@H](CC[C@@H]3C[C@@H](O)CC(=O)O3)[C@H]21",
     "[18*][C@@H]1[C@@H]2C(=C[C@H](C)C[C@@H]2OC(=O)[C@@H](C)CC)C=C[C@@H]1C.[19*][C@@H]1C[C@@H](O)CC(=O)O1",
     "[18*][C@@H]1[C@@H]2C(=C[C@H](C)C[C@@H]2OC(=O)[C@@H](C)CC)C=C[C@@H]1C",
     "[1*][C@H]1C[C@@H]([2*])C=C2C=C[C@H]([3*])[C@H](CC[C@@H]3C[C@@H]([4*])CC(=O)O3)[C@H]21",
     "O=C1CCC[C@@H](CC[C@H]2CC=CC3=CCCC[C@@H]32)O1"),
    ("MARIBAVIR", "CC(C)Nc1nc2cc(Cl)c(Cl)cc2n1[C@H]1O[C@@H](CO)[C@H](O)[C@@H]1O",
     "[15*]n1c(NC(C)C)nc2cc(Cl)c(Cl)cc21.[14*][C@H]1O[C@@H](CO)[C@H](O)[C@@H]1O",
     "[14*][C@H]1O[C@@H](CO)[C@H](O)[C@@H]1O",
     "[1*]c1nc2cc([2*])c([3*])cc2n1[C@H]1O[C@@H]([4*])[C@H]([5*])[C@@H]1[6*]",
     "c1ccc2c(c1)ncn2[C@@H]1CCCO1"),
    ("SPIRAPRIL", "CCOC(=O)[C@H](CCc1ccccc1)N[C@@H](C)C(=O)N1CC2(C[C@H]1C(=O)O)SCCS2",
     "[7*]c1ccccc1.[17*]N1CC2(C[C@H]1C(=O)O)SCCS2",
     "[17*]N1CC2(C[C@H]1C(=O)O)SCCS2",
     "[1*][C@H](CCc1ccccc1)N[C@@H]([2*])C(=O)N1CC2(C[C@H]1[3*])SCCS2",
     "O=C(CNCCCc1ccccc1)N1CCC2(C1)SCCS2"),
]
TASKS = {"linker_design": "linker", "motif_extension": "decoration", "scaffold_decoration": "decoration",
         "superstructure_generation": "superstructure"}
CASES = [(row[0], column, prompt) for row in GENMOL_FRAGMENTS for column, prompt in zip(TASKS, row[2:])]
CASE_IDS = [f"{name}-{column}" for name, column, _ in CASES]

#: what random fills draw for the free positions: a realistic molecule vocabulary's common symbols
FILL = ["[C]", "[N]", "[O]", "[=C]", "[F]", "[Cl]", "[Branch1]", "[Ring1]", "[=O]", "[S]", "[=N]"]
#: the model's vocabulary: the fill symbols, the drugs' own symbols, and SELFIES's branch, ring and index
#: symbols (a fragment's writing may need more of those than the drug's canonical SELFIES does)
VOCAB = (set(FILL) | set(INDEX_ALPHABET)
         | {f"[{bond}{kind}{n}]" for bond in ("", "=", "#") for kind in ("Branch", "Ring") for n in (1, 2, 3)}
         | {s for row in GENMOL_FRAGMENTS for s in sf.split_selfies(sf.encoder(row[1]))})
MAX_LEN = 100
#: random fills per prompt. Every task keeps >= 99% of its 2,500; each prompt >= 97% of its 250, a floor
#: that leaves room for sampling noise: with 2,000 fills each, the least kept prompts measure 0.990-0.993.
#: The fills that lose a fragment close a ring from the first grown atoms back across one of its aromatic
#: rings (a bridge, after which RDKit no longer reads the ring as aromatic), which only the free open end
#: allows.
FILLS = 250


def _tokens(template):
    """The template's tokens, a blank as None."""
    tokens = []
    for i, piece in enumerate(re.split(r"<mask:(\d+)>", template.text)):
        tokens += [None] * int(piece) if i % 2 else list(sf.split_selfies(piece))
    return tokens


def _fill(template, rng, *, free=FILL, open_len=None):
    """Random symbols in the blanks: allowed positions from what they allow, the others from ``free``;
    an open end stops after a random 1..40 symbols (or ``open_len``), as a generator's end token would."""
    tokens = _tokens(template)
    if template.text.endswith(">"):
        room = int(re.search(r"<mask:(\d+)>$", template.text)[1])
        tokens = tokens[: len(tokens) - room + (open_len or int(rng.integers(1, min(room, 40) + 1)))]
    out = []
    for i, token in enumerate(tokens):
        if token is None:
            options = sorted(template.allowed[i]) if i in template.allowed else free
            token = options[int(rng.integers(len(options)))]
        out.append(token)
    return "".join(out)


# -- prompts --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,column,prompt", CASES, ids=CASE_IDS)
def test_genmol_prompts_parse_and_their_drug_keeps_them(name, column, prompt):
    task = fr.parse_fragment_prompt(prompt)
    assert task.kind == TASKS[column]
    assert len(task.fragments) == (2 if column == "linker_design" else 1)
    assert looks_like_fragment_prompt(prompt) == (column != "superstructure_generation")
    drug = dict((row[0], row[1]) for row in GENMOL_FRAGMENTS)[name]
    assert fr.keeps(task, drug)
    assert not fr.keeps(task, "CCO") and not fr.keeps(task, "") and not fr.keeps(task, "C1CC")


@pytest.mark.parametrize("prompt,says", [
    ("[1*]C.[2*]C.[3*]C", "3 fragments"),
    ("[1*]CC[2*].[3*]c1ccccc1", "2 and 1 attachment points"),
    ("c1ccccc1.CCO", "0 and 0 attachment points"),
    ("C1CC(", "not valid SMILES"),
    ("C*C", "has 2 bonds"),
    ("*", "has 0 bonds"),
    ("**", "to 0 fragment atoms"),
    ("", "empty fragment"),
    ("[1*]C.", "empty fragment"),
    ("[Xe]C[1*]", "xenon"),
])
def test_bad_prompts_are_refused_in_one_line(prompt, says):
    with pytest.raises(ValueError) as caught:
        fr.parse_fragment_prompt(prompt)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_looks_like_fragment_prompt():
    assert looks_like_fragment_prompt("[1*]c1ccccc1")
    assert looks_like_fragment_prompt("*CC.*c1ccccc1")
    for prompt in ("c1ccccc1", "CC(=O)<mask:12>", "[C][C]<mask:3>", "*C<mask:3>", None):
        assert not looks_like_fragment_prompt(prompt)


# -- SELFIES facts the templates rest on ----------------------------------------------------------------

def test_selfies_counts_branches_in_symbols_and_rings_in_atoms():
    assert INDEX_ALPHABET[:16] == ("[C]", "[Ring1]", "[Ring2]", "[Branch1]", "[=Branch1]", "[#Branch1]",
                                   "[Branch2]", "[=Branch2]", "[#Branch2]", "[O]", "[N]", "[=N]", "[=C]",
                                   "[#C]", "[S]", "[P]")
    assert sf.decoder("[C][Branch1][Ring1][O][O][C]") == "C(OO)C"  # [Ring1] = 1: a branch of 2 symbols
    assert sf.decoder("[C][C][C][Ring1][Ring1]") == "C1CC1"  # a ring bond to the atom 2 back
    assert sf.decoder("[C][C][N][C][Ring1][Ring1]") == "CC1NC1"  # an atom more: the same bond moves
    assert sf.decoder("[C][F][C]") == "CF"  # an atom without a free bond ends the chain


def test_writings_read_back_unchanged():
    """The derivation tree writes back the very symbols it was read from."""
    for row in GENMOL_FRAGMENTS:
        a, b = fr.parse_fragment_prompt(row[2]).fragments
        scaffold = fr.parse_fragment_prompt(row[4]).fragments[0]
        writings = [*fr._writings(fr._placed(a), False), *fr._writings(fr._placed(b), True),
                    *fr._writings(fr._placed(scaffold), False)]
        for writing in writings:
            assert fr._write(fr._tree(writing)) == list(writing)


# -- templates ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kept():
    """For each prompt, how many of FILLS random fills of its templates keep the fragments."""
    counts = {}
    for seed, (name, column, prompt) in enumerate(CASES):
        task, rng = fr.parse_fragment_prompt(prompt), np.random.default_rng(seed)
        counts[name, column] = sum(
            fr.keeps(task, sf.decoder(_fill(fr.templates(task, rng, max_len=MAX_LEN, vocabulary=VOCAB), rng)))
            for _ in range(FILLS))
    return counts


@pytest.mark.parametrize("column", TASKS)
def test_random_fills_keep_the_fragments_99_percent(kept, column):
    assert sum(n for (_, c), n in kept.items() if c == column) / (FILLS * len(GENMOL_FRAGMENTS)) >= 0.99


@pytest.mark.parametrize("name,column,prompt", CASES, ids=CASE_IDS)
def test_random_fills_keep_each_prompt(kept, name, column, prompt):
    assert kept[name, column] / FILLS >= 0.97


@pytest.mark.parametrize("name,column,prompt", CASES, ids=CASE_IDS)
def test_template_contract(name, column, prompt):
    task = fr.parse_fragment_prompt(prompt)
    rng = np.random.default_rng(0)
    texts = set()
    for _ in range(8):
        template = fr.templates(task, rng, max_len=MAX_LEN, vocabulary=VOCAB)
        tokens = _tokens(template)
        texts.add(template.text)
        assert str(template) == template.text
        assert len(tokens) <= MAX_LEN - 1
        assert all(t in VOCAB for t in tokens if t is not None)
        assert all(tokens[i] is None and symbols <= VOCAB for i, symbols in template.allowed.items())
        for symbols in template.allowed.values():  # atoms only, never a branch or ring symbol
            assert not any("Branch" in s or "Ring" in s for s in symbols)
        if task.kind == "linker":  # B closes it; the linker's atoms all keep a free bond
            assert tokens[-1] is not None
            assert all(not {"[F]", "[Cl]", "[=O]", "[#N]"} & template.allowed[i]
                       for i, t in enumerate(tokens) if t is None)
        else:  # the open end: all the room left, its first symbol an atom with the attachment's bond
            assert len(tokens) == MAX_LEN - 1 and template.text.endswith(">")
            first = tokens.index(None, max(i for i, t in enumerate(tokens) if t is not None))
            assert template.allowed[first] and not {"[=C]", "[=O]", "[#C]"} & template.allowed[first]
    assert len(texts) > 1  # each sample its own writing and blank lengths


def test_templates_are_drawn_with_the_generator_given():
    task = fr.parse_fragment_prompt(GENMOL_FRAGMENTS[8][4])
    first = [fr.templates(task, np.random.default_rng(3), max_len=MAX_LEN, vocabulary=VOCAB) for _ in range(2)]
    assert first[0] == first[1]


def _carbon(template):
    """The template with carbon in every blank (one at the open end), and how many blanks it filled."""
    tokens = _tokens(template)
    if template.text.endswith(">"):
        tokens = tokens[: len(tokens) - int(re.search(r"<mask:(\d+)>$", template.text)[1]) + 1]
    return "".join(t or "[C]" for t in tokens), tokens.count(None)


@pytest.mark.parametrize("name,column,prompt", CASES, ids=CASE_IDS)
def test_blanks_sit_at_the_attachment_points(name, column, prompt):
    """Carbon in every blank gives the fragments with a carbon chain on each attachment point (a linker
    chain between them): the ring bonds and branches rewritten around the blanks still close where
    they did, and every blank atom is derived."""
    task = fr.parse_fragment_prompt(prompt)
    mols = [Chem.MolFromSmiles(f) for f in task.fragments]
    atoms = sum(sum(a.GetAtomicNum() > 0 for a in mol.GetAtoms()) for mol in mols)
    rings = sum(mol.GetRingInfo().NumRings() for mol in mols)
    carbon = task.query() if task.kind == "linker" else Chem.MolFromSmiles(
        ".".join(re.sub(r"\[\d*\*\]|\*", "C", f) for f in task.fragments))
    rng = np.random.default_rng(1)
    for _ in range(20):
        template = fr.templates(task, rng, max_len=MAX_LEN, vocabulary=VOCAB)
        selfies, blanks = _carbon(template)
        mol = Chem.MolFromSmiles(sf.decoder(selfies))
        assert mol.GetNumAtoms() == atoms + blanks, template.text
        assert mol.HasSubstructMatch(carbon), template.text
        assert mol.GetRingInfo().NumRings() == rings, template.text
        assert len(Chem.GetMolFrags(mol)) == 1


def test_ring_bonds_that_span_a_blank_are_rewritten():
    """Written from one attachment point round the ring to the other, para-disubstituted benzene closes
    its ring across the first blank; the ring bond's count back is rewritten for the blank's atoms, so the
    chains stay para, however long."""
    task = fr.parse_fragment_prompt("[1*]c1ccc([2*])cc1")
    para = Chem.MolFromSmiles("Cc1ccc(C)cc1")
    rng = np.random.default_rng(4)
    spanning = 0
    for _ in range(40):
        template = fr.templates(task, rng, max_len=MAX_LEN, vocabulary=VOCAB)
        spanning += bool(re.search(r"<mask:\d+>.*\[Ring", template.text))
        mol = Chem.MolFromSmiles(sf.decoder(_carbon(template)[0]))
        assert mol.HasSubstructMatch(para) and mol.GetRingInfo().NumRings() == 1, template.text
    assert spanning


def test_linker_keeps_fragment_b_whatever_bond_its_last_atom_takes():
    """B's first atom bonds to the linker's last atom with what that atom has left; every symbol a linker
    position allows (double and triple bonds included) leaves B whole."""
    rng = np.random.default_rng(2)
    for row in GENMOL_FRAGMENTS:
        task = fr.parse_fragment_prompt(row[2])
        template = fr.templates(task, rng, max_len=MAX_LEN, vocabulary=VOCAB)
        tokens = _tokens(template)
        blanks = [i for i, t in enumerate(tokens) if t is None]
        for symbol in sorted(set().union(*(template.allowed[i] for i in blanks))):
            filled = [t or (symbol if symbol in template.allowed[i] else "[C]") for i, t in enumerate(tokens)]
            assert fr.keeps(task, sf.decoder("".join(filled))), (row[0], symbol, template.text)


# -- vocabulary and length -------------------------------------------------------------------------------

def test_a_symbol_the_model_lacks_is_named():
    task = fr.parse_fragment_prompt(GENMOL_FRAGMENTS[0][4])  # an [nH], which SELFIES writes [NH1]
    with pytest.raises(ValueError, match=re.escape("[NH1]")):
        fr.templates(task, np.random.default_rng(0), max_len=MAX_LEN, vocabulary=VOCAB - {"[NH1]"})


def test_stereo_is_dropped_when_the_model_cannot_write_it():
    flat = {s for s in VOCAB if "@" not in s}
    rng = np.random.default_rng(0)
    for prompt in (GENMOL_FRAGMENTS[8][4], GENMOL_FRAGMENTS[7][2]):
        task = fr.parse_fragment_prompt(prompt)
        for _ in range(20):
            template = fr.templates(task, rng, max_len=MAX_LEN, vocabulary=flat)
            assert "@" not in template.text
            assert fr.keeps(task, sf.decoder(_fill(template, rng)))


def test_a_prompt_longer_than_the_model_is_refused():
    for prompt in (GENMOL_FRAGMENTS[7][2], GENMOL_FRAGMENTS[7][4]):
        with pytest.raises(ValueError, match="tokens"):
            fr.templates(fr.parse_fragment_prompt(prompt), np.random.default_rng(0), max_len=20,
                         vocabulary=VOCAB)


# -- the reader in the runtime: imadarem-run --prompt 'A*.B*' and Generator.generate(prompt=...) --------------

def test_fragment_prompts_run_through_the_generator_one_layout_per_sample():
    from conftest import FIXTURES
    from imadarem.runtime import Generator

    gen = Generator(FIXTURES / "pinned" / "refine.onnx")  # 8 SELFIES symbols, 14 positions
    for prompt in ("N*.O*", "N*"):  # (a second attachment point needs branch symbols this vocabulary lacks)
        samples = gen.generate(12, prompt=prompt, seed=0, batch_size=5)
        assert all(s.kept for s in samples), (prompt, [s.text for s in samples])
        task = fr.parse_fragment_prompt(prompt)
        assert all(fr.keeps(task, s.text) for s in samples)
        # the layouts differ between samples (linker lengths, writings), and each depends on the seed and its index
        assert [s.ids for s in gen.generate(5, prompt=prompt, seed=0, batch_size=2)] == [s.ids for s in samples[:5]]
    assert len({len(s.ids) for s in gen.generate(12, prompt="N*.O*", seed=0)}) > 1


def test_a_left_to_right_model_refuses_a_blank_before_fixed_symbols_and_takes_one_attachment_point():
    from conftest import FIXTURES
    from imadarem.runtime import Generator, PromptError

    gen = Generator(FIXTURES / "pinned" / "causal.onnx")
    with pytest.raises(PromptError, match="left-to-right model: a blank before fixed symbols"):
        gen.generate(2, prompt="N*.O*", seed=0)
    with pytest.raises(PromptError, match="left-to-right model"):
        gen.generate(2, prompt="[C]<mask:2>[O]", seed=0)
    assert all(s.kept for s in gen.generate(6, prompt="N*", seed=0))


def test_a_restricted_blank_holds_only_its_ids():
    from imadarem.runtime.bans import run_bias
    from imadarem.runtime.prompt import blank_layout, with_allowed
    from imadarem.runtime.tokenizer import SpecialIds

    special = SpecialIds(mask=1, pad=0, eos=2)
    layout = with_allowed(blank_layout(6, special), {2: (4, 5)})
    bias = run_bias(layout, None, special, 8)
    assert np.isfinite(bias[2]).tolist() == [False, False, False, False, True, True, False, False]
    assert np.isfinite(bias[3, 2])  # EOS elsewhere as before


@pytest.mark.parametrize("prompt, says", [("C*.N*.O*", "3 fragments"), ("C**", "attachment point"),
                                          ("c1cc*", "not valid SMILES")])
def test_a_bad_fragment_prompt_is_one_line_and_exit_2(prompt, says):
    from conftest import FIXTURES
    from test_cli_contract import in_process

    code, out, err = in_process([str(FIXTURES / "pinned" / "refine.onnx"), "--prompt", prompt, "-n", "2"])
    assert code == 2 and out == "" and err.count("\n") == 1 and says in err, err
