"""Encode the training data on the lent machine, where a run will look it up, with a checkpoint's tokenizer.

    PYTHONPATH=/tmp/site:/tmp/site-rdkit python3 experiments/device/encode.py CHECKPOINT_DIR \
        [--writings 1] [--seed 0] [--workers 15]

Why: a run continued from a checkpoint (``--init-from``) encodes its data with that checkpoint's tokenizer, and
with ``--writings N`` each molecule also in N random SMILES writings (RDKit). That encoding takes ~17 minutes on the
2-core development machine and is 39 MB for MOSES with one writing, so carrying it beside the checkpoint passes a
call's 64 MiB; on the device's 16 cores it takes a few minutes. This reads only the checkpoint's ``state.json``
(the tokenizer; the weights may be parked), encodes ``.devdata/train.csv.gz`` exactly as ``imadarem train`` would
(``training.data.encode_file``: the same cache key, so the run finds it) into ``/tmp/imcache/encoded/``, and copies
the CSV to ``/tmp/data/train.csv.gz``, the paths ``session.py`` gives its runs. ``--seed`` must be the run's
``--seed`` (the presets' 0): the writings are drawn from it. Needs .whl/ (installed to /tmp/site, as session.py
does) and .evalwhl/ (RDKit for the device's Python, installed to /tmp/site-rdkit).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SITE, RDKIT_SITE = "/tmp/site", "/tmp/site-rdkit"
CACHE, DATA = Path("/tmp/imcache"), Path("/tmp/data/train.csv.gz")


def install() -> None:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade"]
    if glob.glob(".whl/*.whl") and not Path(SITE, "imadarem").is_dir():
        subprocess.run([*pip, "--target", SITE, *glob.glob(".whl/*.whl")], check=True)
    if glob.glob(".evalwhl/*.whl") and not Path(RDKIT_SITE, "rdkit").is_dir():
        subprocess.run([*pip, "--target", RDKIT_SITE, *glob.glob(".evalwhl/*.whl")], check=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", help="a checkpoint folder (its state.json holds the tokenizer)")
    p.add_argument("--data", default=".devdata/train.csv.gz")
    p.add_argument("--writings", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=15)
    a = p.parse_args()
    install()
    for site in (SITE, RDKIT_SITE):
        if Path(site).is_dir() and site not in sys.path:
            sys.path.insert(0, site)
    from imadarem.runtime.registry import tokenizer_from_json
    from imadarem.training.data import encode_file

    DATA.parent.mkdir(parents=True, exist_ok=True)
    if not DATA.exists():
        shutil.copy(a.data, DATA)
    state = json.loads((Path(a.checkpoint) / "state.json").read_text())
    start = time.time()
    data = encode_file(DATA, "auto", tokenizer_from_json(state["tokenizer"]), None, CACHE / "encoded", a.workers,
                       writings=a.writings, seed=a.seed)
    print(json.dumps({"rows": len(data.sequences), "skipped": data.skipped, "seconds": round(time.time() - start),
                      "files": sorted(p.name for p in (CACHE / "encoded").glob("*.npz"))}), flush=True)


if __name__ == "__main__":
    main()
