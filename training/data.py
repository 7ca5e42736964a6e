"""Training data: text lines, SMILES files converted to SELFIES, and the MOSES set from its PyPI wheel.

Encoded datasets are cached (keyed by the file's sha256 and the tokenizer) because SELFIES conversion of
MOSES takes minutes. Sequences are stored as int arrays [N, max_seq_len]: ids, EOS, then PAD.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from imadarem.runtime.errors import DataError, ImadaremError, TokenizerError
from imadarem.runtime.registry import tokenizer_from_json, tokenizer_to_json
from imadarem.runtime.tokenizer import (
    TokenizerAdapter,
    resolve_special_ids,
)

MOSES_WHEEL = "molsets-0.3.1-py3-none-any.whl"
MOSES_WHEEL_SHA256 = "7f4450e3ebecebe79c3a2a55950c93daddee071120daf64a163d03481e811d34"
MOSES_MEMBERS = {
    "train": "moses/dataset/data/train.csv.gz",
    "test": "moses/dataset/data/test.csv.gz",
    "test_scaffolds": "moses/dataset/data/test_scaffolds.csv.gz",
    "mcf": "moses/metrics/mcf.csv",
    "pains": "moses/metrics/wehi_pains.csv",
    "test_stats": "moses/dataset/data/test_stats.npz",
}
#: MOSES's own FCD/Test reference (mu, sigma of ChemNet activations on the test split), as plain arrays
MOSES_FCD_REFERENCE = "test_fcd_reference.npz"


def default_cache_dir() -> Path:
    root = os.environ.get("IMADAREM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "imadarem")
    return Path(root)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- MOSES -----------------------------------------------------------------------------------------
def fetch_moses(cache_dir: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None) -> dict[str, Path]:
    """Extract MOSES train/test (and the filter SMARTS) from the molsets 0.3.1 wheel into ``cache_dir``.

    The wheel is fetched with ``pip download --no-deps`` (never installed: its pins break environments)
    unless ``wheel`` points at a local copy; its sha256 is checked either way.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "moses"
    cache.mkdir(parents=True, exist_ok=True)
    out = {name: cache / Path(member).name for name, member in MOSES_MEMBERS.items()}
    if all(p.is_file() for p in out.values()):
        return out
    whl = Path(wheel) if wheel else cache / MOSES_WHEEL
    if not whl.is_file():
        if wheel:
            raise DataError(f"MOSES wheel not found: {whl}")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "-d", str(cache), "molsets==0.3.1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not whl.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"could not download molsets==0.3.1 with pip: {last}")
    digest = sha256_file(whl)
    if digest != MOSES_WHEEL_SHA256:
        raise DataError(f"{whl}: sha256 {digest} does not match the expected {MOSES_WHEEL_SHA256}")
    with zipfile.ZipFile(whl) as zf:
        for name, member in MOSES_MEMBERS.items():
            tmp = out[name].with_suffix(out[name].suffix + ".part")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                dst.write(src.read())
            os.replace(tmp, out[name])
    return out


def moses_fcd_reference(files: dict[str, Path]) -> Path:
    """MOSES's FCD/Test reference (``test_stats.npz['stats']['FCD']``: mu, sigma) as a plain-array npz.

    The wheel stores it as a pickled dict; it is read here once, from the sha256-checked wheel's copy,
    and kept as two float arrays, so every later read needs no pickle.
    """
    out = files["test_stats"].with_name(MOSES_FCD_REFERENCE)
    if out.is_file():
        return out
    import numpy as np

    with np.load(files["test_stats"], allow_pickle=True) as raw:  # MOSES's own file, sha256-checked above
        fcd = raw["stats"].item()["FCD"]
    tmp = out.with_suffix(".part.npz")
    np.savez(tmp, mu=np.asarray(fcd["mu"], dtype=np.float64), sigma=np.asarray(fcd["sigma"], dtype=np.float64))
    os.replace(tmp, out)
    return out


# -- reading files ---------------------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def detect_format(path: str | os.PathLike) -> str:
    name = str(path).lower().removesuffix(".gz")
    if name.endswith((".csv", ".smi", ".smiles")):
        return "smiles"
    if name.endswith(".selfies"):
        return "selfies"
    return "text"


def read_lines(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with _open_text(path) as fh:
            return [line.rstrip("\r\n") for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def read_smiles(path: str | os.PathLike) -> list[str]:
    """SMILES from a .csv(.gz) (column 'SMILES', else the first) or a one-per-line .txt/.smi file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if ".csv" not in path.name.lower():
        return [line.split()[0] for line in read_lines(path)]
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty")
            lower = [h.strip().lower() for h in header]
            col = lower.index("smiles") if "smiles" in lower else 0
            rows = [row[col] for row in reader if len(row) > col and row[col]]
            if "smiles" not in lower:  # no header: the first line was data
                rows.insert(0, header[0])
            return rows
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _map_chunks(fn: Callable[[tuple], list], items: list, workers: int | None, *args) -> list:
    """``fn((start, items[start:start + chunk], *args))`` over chunks of ``items``, flattened in order; in
    ``workers`` spawned processes when there are enough items to pay for them."""
    workers = workers or os.cpu_count() or 1
    chunk = max(1, len(items)) if workers <= 1 or len(items) < 5000 else max(1000, len(items) // (workers * 8))
    jobs = [(i, items[i : i + chunk], *args) for i in range(0, len(items), chunk)]
    if len(jobs) <= 1:
        return [x for job in jobs for x in fn(job)]
    with get_context("spawn").Pool(workers) as pool:
        return [x for part in pool.imap(fn, jobs) for x in part]


def _to_selfies(job: tuple[int, list[str]]) -> list[str | None]:
    """SELFIES of each SMILES (None where it cannot be converted: skipped and counted by the caller)."""
    from imadarem.plugins.tokenizers.selfies import smiles_to_selfies as convert

    out: list[str | None] = []
    for smi in job[1]:
        try:
            out.append(convert(smi))
        except TokenizerError:
            out.append(None)
    return out


def smiles_to_selfies_batch(smiles: list[str], workers: int | None = None) -> list[str | None]:
    """The SELFIES tokenizer's conversion over many SMILES, in ``workers`` processes."""
    return _map_chunks(_to_selfies, smiles, workers)


def _random_writings(job: tuple[int, list[str], int, int]) -> list[list[str]]:
    """``n`` random SMILES writings of each SMILES (RDKit, seeded by the run's seed and the record's index, so a
    cached encoding is reproducible); an unreadable one has none."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    start, smiles, n, seed = job
    out = []
    for i, smi in enumerate(smiles):
        mol = Chem.MolFromSmiles(smi)
        out.append(list(Chem.MolToRandomSmilesVect(mol, n, randomSeed=(seed * 1_000_003 + start + i) % (1 << 31)))
                   if mol is not None else [])
    return out


def random_writings(smiles: list[str], n: int, seed: int, workers: int | None = None) -> list[list[str]]:
    """:func:`_random_writings` over many SMILES, in ``workers`` processes."""
    try:
        import rdkit  # noqa: F401
    except ImportError:
        raise DataError("--writings needs RDKit: pip install 'imadarem[chem]'") from None
    return _map_chunks(_random_writings, smiles, workers, n, seed)


# -- encoding --------------------------------------------------------------------------------------
@dataclass
class EncodedData:
    """Token id sequences (without EOS) and the tokenizer that made them; with random writings
    (``--writings``), ``molecules`` holds each sequence's record index (its file writing comes first)."""

    tokenizer: TokenizerAdapter
    sequences: list[np.ndarray]
    source_hash: str
    skipped: int = 0
    molecules: np.ndarray | None = None

    def pack(self, max_seq_len: int) -> tuple[np.ndarray, int]:
        """[N, max_seq_len] int64: ids, EOS, PAD...; also the number dropped for being too long."""
        arr, dropped, _ = self.pack_with_molecules(max_seq_len)
        return arr, dropped

    def pack_with_molecules(self, max_seq_len: int) -> tuple[np.ndarray, int, np.ndarray | None]:
        """:meth:`pack`, and the record index of each packed row (None without random writings)."""
        sp = resolve_special_ids(self.tokenizer)
        limit = max_seq_len - (1 if sp.eos is not None else 0)
        fits = [0 < len(s) <= limit for s in self.sequences]
        kept = [s for s, ok in zip(self.sequences, fits) if ok]
        molecules = None if self.molecules is None else self.molecules[np.array(fits, dtype=bool)]
        arr = np.full((len(kept), max_seq_len), sp.pad, dtype=np.int64)
        if kept:  # one scatter instead of a Python loop over a million rows
            lengths = np.fromiter((len(s) for s in kept), np.int64, len(kept))
            rows = np.repeat(np.arange(len(kept)), lengths)
            cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            arr[rows, cols] = np.concatenate(kept)
            if sp.eos is not None:
                arr[np.arange(len(kept)), lengths] = sp.eos
        return arr, len(self.sequences) - len(kept), molecules


def build_tokenizer(kind: str, texts: list[str], tokenizer_file: str | None) -> TokenizerAdapter:
    from imadarem.runtime.registry import get_tokenizer_class

    cls = get_tokenizer_class(kind)
    if kind == "hf":
        if not tokenizer_file:
            raise DataError("the 'hf' tokenizer needs --tokenizer-file tokenizer.json")
        return cls.from_file(tokenizer_file)
    if hasattr(cls, "from_corpus"):
        try:
            return cls.from_corpus(texts)
        except NotImplementedError as exc:
            raise DataError(f"tokenizer {kind!r} cannot be built from a corpus: {exc}") from None
    raise DataError(f"tokenizer {kind!r} cannot be built from a corpus; pass a model's tokenizer instead")


#: ``--data`` names that stand for a MOSES split (extracted from the molsets wheel on first use)
MOSES_NAMES = {"moses": "train", "moses:train": "train", "moses:test": "test", "moses:test_scaffolds": "test_scaffolds"}


def resolve_data(data: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A data file's path: ``moses`` (or ``moses:test``, ...) is MOSES's split, else the path itself."""
    name = str(data)
    if name in MOSES_NAMES:
        return fetch_moses()[MOSES_NAMES[name]]
    return Path(data)


def encode_file(path: str | os.PathLike, data_format: str = "auto", tokenizer: str | TokenizerAdapter = "auto",
                tokenizer_file: str | None = None, cache_dir: str | os.PathLike | None = None,
                workers: int | None = None, writings: int = 0, seed: int = 0) -> EncodedData:
    """Read ``path`` and encode it, reusing a cached encoding of the same file and tokenizer. ``writings``:
    SMILES data only, each record also in that many random SMILES writings (``seed`` picks them)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = detect_format(path) if data_format == "auto" else data_format
    if fmt not in ("text", "smiles", "selfies"):
        raise DataError(f"unknown data format {fmt!r} (choose from: auto, text, smiles, selfies)")
    kind = tokenizer if isinstance(tokenizer, str) else tokenizer.name
    if kind == "auto":
        kind = "selfies" if fmt in ("smiles", "selfies") else "char"
    if kind == "selfies" and fmt == "text":
        fmt = "smiles"
    if writings and fmt != "smiles":
        raise DataError(f"--writings needs SMILES data; {path} is read as {fmt}")
    source_hash = sha256_file(path)
    given = None if isinstance(tokenizer, str) else tokenizer_to_json(tokenizer)
    file_hash = sha256_file(tokenizer_file) if tokenizer_file else None
    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "encoded"

    def entry(given_json: str | None) -> Path:
        key_material = json.dumps([source_hash, fmt, kind, given_json, file_hash]
                                  + ([writings, seed] if writings else []))  # old keys unchanged without writings
        return cache / f"{path.name}.{hashlib.sha256(key_material.encode()).hexdigest()[:20]}.npz"

    cached = entry(given)
    # a run continued from a checkpoint passes the tokenizer the first run built from this same file: the
    # encoding cached then is this one, so it is reused when its stored tokenizer is the given one
    candidates = [cached] if given is None else [cached, entry(None)]
    for candidate in candidates:
        if candidate.is_file():
            try:
                with np.load(candidate, allow_pickle=False) as z:
                    stored = str(z["tokenizer"])
                    if candidate != cached and stored != given:
                        continue
                    tok = tokenizer_from_json(stored)
                    flat, offsets = z["flat"].astype(np.int32), z["offsets"]
                    seqs = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
                    molecules = z["molecules"] if "molecules" in z else None
                    return EncodedData(tok, seqs, source_hash, int(z["skipped"]), molecules)
            except (OSError, KeyError, ValueError, ImadaremError):
                pass  # a damaged cache entry is rebuilt

    if fmt == "text":
        texts = read_lines(path)
    elif fmt == "selfies":
        texts = read_lines(path)
    else:
        smiles = read_smiles(path)
        records = np.arange(len(smiles))
        if writings:  # each record's file writing first, then its random ones
            extra = random_writings(smiles, writings, seed, workers)
            records = np.concatenate([records, np.repeat(records, [len(w) for w in extra])])
            smiles = smiles + [w for ws in extra for w in ws]
        converted = smiles_to_selfies_batch(smiles, workers)
        texts = [s for s in converted if s]
        records = records[[bool(s) for s in converted]]
    skipped_conv = 0 if fmt != "smiles" else len(converted) - len(texts)
    if not texts:
        raise DataError(f"{path}: no usable records")
    tok = tokenizer if not isinstance(tokenizer, str) else build_tokenizer(kind, texts, tokenizer_file)
    seqs, skipped, encoded = [], skipped_conv, []
    for i, text in enumerate(texts):
        try:
            seqs.append(np.asarray(tok.encode(text), dtype=np.int32))
            encoded.append(i)
        except ImadaremError:
            skipped += 1
    data = EncodedData(tok, seqs, source_hash, skipped, records[encoded] if writings else None)
    _save_cache(cached, data)
    return data


def _save_cache(path: Path, data: EncodedData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(s) for s in data.sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate(data.sequences) if data.sequences else np.zeros(0, np.int32)
    # the smallest integer type that holds the vocabulary, compressed: MOSES's 1.58 M molecules take
    # ~25 MB instead of 230 (small enough to carry to a GPU machine instead of encoding there)
    small = np.uint8 if data.tokenizer.vocab_size <= 256 else np.uint16 if data.tokenizer.vocab_size <= 65536 else np.int32
    tmp = path.with_name(path.name + ".part.npz")
    extra = {} if data.molecules is None else {"molecules": data.molecules.astype(np.int32)}
    np.savez_compressed(tmp, flat=flat.astype(small), offsets=offsets, skipped=np.int64(data.skipped),
                        tokenizer=np.array(tokenizer_to_json(data.tokenizer)), **extra)
    os.replace(tmp, path)


def split_validation(arr: np.ndarray, fraction: float, seed: int, max_val: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    n_val = min(max_val, int(round(len(arr) * fraction)))
    if n_val <= 0:
        return arr, arr[:0]
    perm = np.random.default_rng(seed).permutation(len(arr))
    return arr[perm[n_val:]], arr[perm[:n_val]]


def split_by_molecule(arr: np.ndarray, molecules: np.ndarray, fraction: float, seed: int,
                      max_val: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """:func:`split_validation` over records rather than rows: a held-out molecule leaves training in every
    writing, and validates in its file writing only (its first row), so the validation loss reads as an
    unaugmented run's."""
    first = np.unique(molecules, return_index=True)[1]
    n_val = min(max_val, int(round(len(first) * fraction)))
    if n_val <= 0:
        return arr, arr[:0]
    held = first[np.random.default_rng(seed).permutation(len(first))[:n_val]]
    out = np.isin(molecules, molecules[held])
    return arr[~out], arr[np.sort(held)]


def iter_batches(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(step, row indices) forever: a fresh seeded permutation per epoch, so any step can be resumed."""
    if n == 0:
        raise DataError("no training sequences")
    per_epoch = max(1, n // batch_size)
    step, drawn, perm = start_step, None, None
    while True:
        epoch, offset = divmod(step, per_epoch)
        if epoch != drawn:  # one permutation per epoch (drawing it is most of a small model's GPU step)
            perm = np.random.default_rng([seed, epoch]).permutation(n)
            if n < batch_size:
                perm = np.resize(perm, batch_size)
            drawn = epoch
        yield step, perm[offset * batch_size : (offset + 1) * batch_size]
        step += 1
