"""Issue #24's fragment suite (b) on the lent machine's CPU cores: worker processes share its prompts and seeds.

Why: suite (b) (240 MOSES prompts x 100 samples) takes ~17 minutes a seed with 2 threads here for the 4.9 M
refine model and about three times that for the 14.5 M trunk; the device has 16 cores. The onnxruntime CPU build
there runs the same graph as here, so the numbers are those `imadarem eval fragments` gives: each worker holds one
Generator and calls ``training.evaluation.fragments.evaluate_case`` (what the command calls, with ``--retries 0``) for
the (prompt, seed) units it claims; the rows are merged as the command merges them (checked here: the same molecules,
prompt by prompt, as `imadarem eval fragments --task motif_extension --seeds 0 --samples 3 --selector l2r`).

Processes start in their own session, so they outlive a call while the machine stays warm (30 s between calls):

    python3 experiments/device/fragments.py export CHECKPOINT NAME     # once: /tmp/frag/NAME.onnx (fp32)
    python3 experiments/device/fragments.py launch NAME --seeds 0,1 --selector l2r --workers 13 --call-seconds 560
    python3 experiments/device/fragments.py wait NAME --call-seconds 560   # merges into $OUT/NAME.json.gz when done

Needs .whl/ (imadarem and its runtime wheels, as session.py), .evalwhl/ (RDKit for Python 3.12) and
.evaldata/moses/sa_fpscores.npz (the SA fragment scores, `imadarem data moses` writes them) in the call's carry.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORK = Path("/tmp/frag")
SITE, RDKIT_SITE = "/tmp/site", "/tmp/site-rdkit"
TASKS = ("linker_design", "motif_extension", "scaffold_decoration", "superstructure_generation")
METRICS = ("validity", "uniqueness", "quality", "diversity", "distance", "kept", "valid", "calls",
           "qed_ok", "sa_ok", "macrocycles")  # the command's METRICS and DIAGNOSTICS
START = time.time()


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{SITE}:{RDKIT_SITE}", PYTHONUNBUFFERED="1", IMADAREM_CACHE="/tmp/imcache")


def install() -> None:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade"]
    if glob.glob(".whl/*.whl") and not Path(SITE, "imadarem").is_dir():  # none here: the installed package
        subprocess.run([*pip, "--target", SITE, *glob.glob(".whl/*.whl")], check=True)
    if glob.glob(".evalwhl/*.whl") and not Path(RDKIT_SITE, "rdkit").is_dir():
        subprocess.run([*pip, "--target", RDKIT_SITE, *glob.glob(".evalwhl/*.whl")], check=True)
    sa = Path(".evaldata/moses/sa_fpscores.npz")
    if sa.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "sa_fpscores.npz").write_bytes(sa.read_bytes())


def worker_main(args: argparse.Namespace) -> None:
    """One worker process: holds one Generator and takes (task, prompt, seed) units from the shared queue
    directory, claiming each by an atomic rename, until none is left; one JSON row per unit."""
    from imadarem.chem.suites import load_suite
    from imadarem.runtime.generator import Generator
    from imadarem.training.evaluation import fragments as ef

    if args.weigh_writings:  # experiment: prefix writings drawn by the model's own prefix probability
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fragments"))
        from writing_probe import weigh_writings
        weigh_writings(args.weigh_writings, args.writing_temperature, args.per_site)
    gen = Generator(str(WORK / f"{args.name}.onnx"), threads=args.threads)
    scorer = ef.PromptScorer(WORK / "sa_fpscores.npz")
    cases = {f"{c.task}-{i}": c for i, c in enumerate(load_suite("moses"))}
    queue, rows = WORK / args.name / "queue", WORK / args.name / "rows"
    for unit in sorted(queue.glob("*.todo")):
        mine = unit.with_suffix(f".{os.getpid()}")
        try:
            unit.rename(mine)
        except FileNotFoundError:  # another worker took it
            continue
        key, seed = mine.stem.split("_", 1)[1].rsplit("-s", 1)
        row = ef.evaluate_case(gen, scorer, cases[key], int(seed), args.samples, selector=args.selector, retries=0)
        (rows / f"{mine.stem}.json").write_text(json.dumps(row))


def merge(name: str, meta: dict) -> dict:
    """The workers' rows as one `imadarem eval fragments --json` result (per-task means over prompts and seeds)."""
    prompts = [json.loads(p.read_text()) for p in sorted((WORK / name / "rows").glob("*.json"))]
    tasks = {}
    for task in TASKS:
        mine = [r for r in prompts if r["task"] == task]
        if not mine:
            continue
        row = {"prompts": len({r["name"] for r in mine}), "runs": len(mine)}
        for metric in METRICS:
            values = [r[metric] for r in mine if metric in r]
            row[metric] = float(np.mean(values)) if values else float("nan")
        tasks[task] = row
    return {**meta, "model": f"{name}.onnx", "suite": "moses", "prefix_prompts": False, "retries": 0,
            "seeds": sorted({r["seed"] for r in prompts}), "tasks": tasks, "prompts": prompts}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("verb", choices=("export", "launch", "wait", "worker"))
    p.add_argument("name", help="export: CHECKPOINT NAME; the others: NAME (/tmp/frag/NAME.onnx)", nargs="+")
    p.add_argument("--seeds", default="0")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, in the order the workers take them")
    p.add_argument("--selector")
    p.add_argument("--workers", type=int, default=(os.cpu_count() or 2) - 2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--call-seconds", type=float, default=560)
    p.add_argument("--weigh-writings", metavar="CHECKPOINT",
                   help="pick prefix writings in proportion to this PyTorch checkpoint's prefix probability "
                        "(experiments/fragments/writing_probe.py) instead of uniformly")
    p.add_argument("--writing-temperature", type=float, default=1.0)
    p.add_argument("--per-site", action="store_true", help="with --weigh-writings: each site keeps its uniform share")
    a = p.parse_args()
    if a.verb == "worker":
        a.name = a.name[0]
        return worker_main(a)
    install()
    if a.verb == "export":  # CHECKPOINT NAME
        checkpoint, name = a.name
        subprocess.run([sys.executable, "-m", "imadarem.runtime.cli", "export", checkpoint, "-o", str(WORK / f"{name}.onnx"),
                        "--dtype", "fp32"], env=env(), check=True)
        return
    name = a.name[0]
    here = WORK / name
    if a.verb == "launch":
        from_suite = subprocess.run(
            [sys.executable, "-c", "from imadarem.chem.suites import load_suite\n"
             "print('\\n'.join(f'{c.task}-{i}' for i, c in enumerate(load_suite('moses'))))"],
            env=env(), check=True, capture_output=True, text=True).stdout.split()
        for folder in ("queue", "rows", "logs"):
            (here / folder).mkdir(parents=True, exist_ok=True)
        tasks = a.tasks.split(",")
        for key in from_suite:
            for seed in a.seeds.split(","):
                task = key.rsplit("-", 1)[0]
                if task in tasks:  # the tasks in --tasks order: the workers take the first ones first
                    (here / "queue" / f"{tasks.index(task)}_{key}-s{seed}.todo").write_text("")
        (here / "meta.json").write_text(json.dumps({"samples": a.samples, "selector": a.selector or "default",
                                                    "workers": a.workers, "threads": a.threads,
                                                    "weigh_writings": a.weigh_writings,
                                                    "writing_temperature": a.writing_temperature,
                                                    "per_site": a.per_site}))
        for w in range(a.workers):
            cmd = [sys.executable, __file__, "worker", name, "--threads", str(a.threads), "--samples", str(a.samples)]
            if a.selector:
                cmd += ["--selector", a.selector]
            if a.weigh_writings:
                cmd += ["--weigh-writings", a.weigh_writings, "--writing-temperature", str(a.writing_temperature)]
                cmd += ["--per-site"] if a.per_site else []
            log = open(here / "logs" / f"worker-{w}.log", "w")
            proc = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            (here / "logs" / f"worker-{w}.pid").write_text(str(proc.pid))
        print(f"{len(list((here / 'queue').glob('*.todo')))} units, {a.workers} workers", flush=True)
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    while True:
        pids = [int(f.read_text()) for f in (here / "logs").glob("*.pid")]
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        if not alive or time.time() > START + a.call_seconds - 20:
            break
        time.sleep(10)
    done, todo = len(list((here / "rows").glob("*.json"))), len(list((here / "queue").glob("*.todo")))
    print(f"{len(alive)} workers alive; {done} units done, {todo} waiting, after {time.time() - START:.0f} s", flush=True)
    for f in sorted((here / "logs").glob("*.log")):
        text = f.read_text().strip().splitlines()
        if text:
            print(f"--- {f.name}: {text[-1]}")
    if not alive and done:
        result = merge(name, json.loads((here / "meta.json").read_text()))
        with gzip.open(out / f"{name}.json.gz", "wt") as fh:
            json.dump([result], fh)
        print(json.dumps({t: {m: round(v, 4) for m, v in r.items()} for t, r in result["tasks"].items()}))


if __name__ == "__main__":
    main()
