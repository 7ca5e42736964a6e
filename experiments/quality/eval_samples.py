"""Score the samples block_diffusion.py --samples wrote (one JSON line per model x decoder) with MOSES's
own FCD reference (fcd_stats.npz: mu and sigma of test_stats.npz in the molsets wheel) and filters.

    python3 eval_samples.py samples.jsonl results.jsonl DATA_DIR   # DATA_DIR: fcd_stats.npz, mcf.csv, wehi_pains.csv
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_diffusion import Evaluator  # noqa: E402

data = Path(sys.argv[3])
ev = Evaluator(data / "fcd_stats.npz", data / "mcf.csv", data / "wehi_pains.csv", "cpu")
with open(sys.argv[2], "a") as out:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        row = {"name": r["name"], "decoder": r["decoder"], "calls": r["calls_mean"], **ev(r["smiles"])}
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
