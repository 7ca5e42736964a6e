"""Encode MOSES train SMILES to SELFIES token ids: a compact cache (14 MB) for block_diffusion.py.

    python3 encode_moses.py train.csv.gz DATA_DIR/train_selfies.npz   # train.csv.gz from `imadarem data moses`

Ids: [PAD]=0 [MASK]=1 [EOS]=2 [UNK]=3, then the SELFIES alphabet sorted; rows padded to 72.
"""

import gzip
import json
import sys
from multiprocessing import Pool

import numpy as np
import selfies as sf

SPECIALS = ["[PAD]", "[MASK]", "[EOS]", "[UNK]"]
WIDTH = 72


def encode(smiles: list[str]) -> list[list[str] | None]:
    out = []
    for smi in smiles:
        try:
            out.append(list(sf.split_selfies(sf.encoder(smi, strict=True))))
        except Exception:  # noqa: BLE001 - an unreadable SMILES is dropped
            out.append(None)
    return out


def main(src: str, dst: str) -> None:
    lines = gzip.open(src, "rt").read().splitlines()
    column = lines[0].split(",").index("SMILES")
    smiles = [line.split(",")[column] for line in lines[1:]]
    with Pool() as pool:
        symbols = [s for part in pool.imap(encode, [smiles[i : i + 5000] for i in range(0, len(smiles), 5000)])
                   for s in part]
    itos = SPECIALS + sorted({t for s in symbols if s for t in s})
    stoi = {s: i for i, s in enumerate(itos)}
    kept = [s for s in symbols if s and len(s) <= WIDTH - 1]
    ids = np.zeros((len(kept), WIDTH), dtype=np.uint8)
    for i, s in enumerate(kept):
        ids[i, : len(s)] = [stoi[t] for t in s]
        ids[i, len(s)] = SPECIALS.index("[EOS]")
    print(len(smiles), "molecules,", len(kept), "kept,", len(itos), "tokens, mean length",
          np.mean([len(s) for s in kept]))
    np.savez_compressed(dst, ids=ids)
    with open(dst + ".vocab.json", "w") as fh:
        json.dump(itos, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
