"""Several training runs sharing the lent GPU for one session, across chained device calls.

A device call lasts at most 10 minutes, but processes started in their own session live until the machine
goes back (it stays warm 30 s after a call). So the first call starts every run in the background and the
next calls only watch; no run pays for a restart or a recompile between calls. Runs write to /tmp/runs on
the device (the repository copy loses ignored folders between calls).

    python3 experiments/device/session.py start SPEC.json --deadline-in S --call-seconds S
    python3 experiments/device/session.py add SPEC.json --call-seconds S
    python3 experiments/device/session.py wait --call-seconds S
    python3 experiments/device/session.py collect --call-seconds S

SPEC.json is a list of {"name": ..., "steps": first guess, "args": [imadarem train flags]}, "fixed": true for a
run whose --steps must stay as given (a recipe's reproduction; it resumes in the next session if it runs
out). ``start`` (and, for a run it left unfitted, the next ``wait``) *fits each run's schedule to the
deadline*: once a run has logged ~2,000 steps it measures that run's steps/s (with its neighbours running), and if the steps that fit before the deadline differ from the run's
by more than 4% it stops the run (SIGTERM: the trainer checkpoints at that step) and resumes it with
``--steps`` set to what fits; the cosine schedule is then the one of that many steps, except for the few
hundred steps already taken (where the two schedules differ by < 1% of the learning rate). Once the fixed runs
end, ``wait`` fits the others again to the speed they have alone (the learning rate then follows the longer
cosine from that step: a step up, as in a warm restart). ``add`` launches a further spec's runs under the running
session's deadline: a call's working tree may hold 64 MiB, so a run that starts from a checkpoint kept in the
repository can follow in the next call, once the data is on the device. ``collect`` waits for the runs to end and
packs each run's log, run.json and last checkpoint with the EMA weights only (what ``imadarem export`` uses; the
raw weights and optimiser moments stay on the device) into 15 MiB parts under $OUT. Every other verb returns as
soon as no run is left alive, and sends back the snapshot of each run that ended since the last call (all of
them with ``--snapshots``). Needs the wheels in .whl/ and .devdata/ (train.csv.gz, encoded/*.npz).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

RUNS = Path("/tmp/runs")
DATA = Path("/tmp/data/train.csv.gz")
SITE = "/tmp/site"
START = time.time()


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=SITE, PYTHONUNBUFFERED="1", IMADAREM_CACHE="/tmp/imcache")


def install() -> None:
    if not Path(SITE, "imadarem").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", SITE, *glob.glob(".whl/*.whl")], check=True)
    enc = Path("/tmp/imcache/encoded")
    enc.mkdir(parents=True, exist_ok=True)
    for f in glob.glob(".devdata/encoded/*.npz"):
        if not (enc / Path(f).name).exists():
            shutil.copy(f, enc)
    DATA.parent.mkdir(parents=True, exist_ok=True)
    if not DATA.exists():
        shutil.copy(".devdata/train.csv.gz", DATA)


def deadline() -> float:
    return float((RUNS / "deadline").read_text())


def launch(name: str, args: list[str], resume_steps: int | None = None) -> None:
    run = RUNS / name
    left = int(deadline() - time.time() - 30)
    common = ["--out-dir", str(run), "--no-progress", "--time-limit", str(max(left, 1))]
    if resume_steps is None:
        for mark in ("fitted", "steps", "refit", "sent"):  # a new run under a reused name starts unmarked
            (RUNS / f"{name}.{mark}").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "imadarem.training", "--data", str(DATA), *common, *args]
    else:
        cmd = [sys.executable, "-m", "imadarem.training", "--resume", "--steps", str(resume_steps), *common]
        (RUNS / f"{name}.steps").write_text(str(resume_steps))  # run.json keeps the steps of the first launch
    out = open(RUNS / f"{name}.out", "a")
    out.write(f"\n# {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
    out.flush()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    (RUNS / f"{name}.pid").write_text(str(proc.pid))


def alive(name: str) -> bool:
    pid_file = RUNS / f"{name}.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a finished child of this process stays a zombie until reaped
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def log(name: str) -> list[dict]:
    path = RUNS / name / "log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def status(names: list[str]) -> None:
    for name in names:
        rows = log(name)
        last = rows[-1] if rows else {}
        val = next((r for r in reversed(rows) if any(k.startswith("val_") for k in r)), {})
        shown = {k: v for k, v in val.items() if k.startswith("val_")}
        print(f"[{time.time() - START:5.0f}s] {name}: alive={alive(name)} step={last.get('step')} "
              f"s={last.get('seconds')} tok/s={last.get('tokens_per_s')} val@{val.get('step')}={shown}", flush=True)


def steps_of(name: str) -> int:
    """The steps the run now trains to: those of its last resume, else those it was launched with."""
    fitted = RUNS / f"{name}.steps"
    if fitted.exists():
        return int(fitted.read_text())
    return int(json.loads((RUNS / name / "run.json").read_text())["args"]["steps"])


def resume_to_fit(name: str, step: int, rate: float, label: str = "", restart_cost: float = 80.0) -> None:
    """Stop ``name`` and resume it with the steps that fit before the deadline at ``rate`` steps/s, unless its
    planned steps are already within 4% of them."""
    left = deadline() - time.time() - 45
    planned = steps_of(name)
    fits = int(step + rate * (left - restart_cost)) // 500 * 500
    if left <= restart_cost or fits <= step:  # too late to restart: the time limit stops it where it is
        return
    print(f"[{time.time() - START:5.0f}s] {name}{label}: {rate:.1f} steps/s, {planned} planned, {fits} fit",
          flush=True)
    if abs(fits - planned) <= 0.04 * planned:
        return
    os.killpg(int((RUNS / f"{name}.pid").read_text()), signal.SIGTERM)
    while alive(name):
        time.sleep(1)
    launch(name, [], resume_steps=fits)


def fit(name: str, min_span: int = 1600) -> bool:
    """Fit ``name`` to the deadline once it has logged ``min_span`` steps; True once it needs no more fitting."""
    rows = [r for r in log(name) if "seconds" in r and "step" in r]
    # the trainer's ``seconds`` restart from 0 at each resume: measure only since the last launch
    cut = max((i for i in range(1, len(rows)) if rows[i]["seconds"] < rows[i - 1]["seconds"]), default=0)
    rows = [r for r in rows[cut:] if r.get("step", 0) >= 400]
    if len(rows) < 2 or rows[-1]["step"] - rows[0]["step"] < min_span:
        return False
    a, b = rows[0], rows[-1]
    resume_to_fit(name, b["step"], (b["step"] - a["step"]) / max(b["seconds"] - a["seconds"], 1e-6))
    return True


def refit_alone(names: list[str], marks: dict[str, tuple[float, int]], span: float = 90.0) -> None:
    """Once the fixed runs have ended, fit the others again to the speed they now have on their own.

    ``start`` fitted them to the speed they had beside the fixed runs; left alone they would end early and
    leave the GPU idle until the deadline. Each is measured over ``span`` seconds of wall time, then fitted
    (at most once: RUNS/<name>.refit marks it).
    """
    for name in names:
        rows = log(name)
        if (RUNS / f"{name}.refit").exists() or not alive(name) or not rows:
            continue
        step, now = rows[-1]["step"], time.time()
        if name not in marks:
            marks[name] = (now, step)
            continue
        t0, s0 = marks[name]
        if now - t0 < span or step <= s0:
            continue
        (RUNS / f"{name}.refit").write_text("")
        resume_to_fit(name, step, (step - s0) / (now - t0), label=" alone")


def snapshot(name: str, out: Path) -> None:
    """The run's log, run.json and newest checkpoint (EMA weights only) as <name>.tar.part-* in ``out``."""
    from safetensors.numpy import load_file, save_file  # the device has safetensors (transformers needs it)

    run = RUNS / name
    ckpt = run / "checkpoints" / (run / "latest").read_text().strip()
    pack = Path("/tmp/pack") / name
    shutil.rmtree(pack, ignore_errors=True)
    (pack / "checkpoints" / ckpt.name).mkdir(parents=True)
    weights = {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if k.startswith("ema.")}
    save_file(weights, str(pack / "checkpoints" / ckpt.name / "model.safetensors"),
              metadata={"format": "imadarem-checkpoint-1"})
    shutil.copy(ckpt / "state.json", pack / "checkpoints" / ckpt.name)
    (pack / "latest").write_text(ckpt.name + "\n")
    for f in ("log.jsonl", "run.json"):
        shutil.copy(run / f, pack)
    if (RUNS / f"{name}.out").exists():
        shutil.copy(RUNS / f"{name}.out", pack / "stdout.txt")
    tar = Path("/tmp/pack") / f"{name}.tar"
    with tarfile.open(tar, "w") as t:
        t.add(pack, arcname=name)
    subprocess.run(["split", "-b", "15M", str(tar), str(out / f"{name}.tar.part-")], check=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("verb", choices=("start", "add", "wait", "collect"))
    p.add_argument("spec", nargs="?")
    p.add_argument("--deadline-in", type=float, help="start: seconds from now when every run must have stopped")
    p.add_argument("--call-seconds", type=float, required=True, help="return before this many seconds")
    p.add_argument("--snapshots", action="store_true",
                   help="start/add/wait: send the checkpoints back too (their transfer can outlast the 30 s the "
                        "machine waits for the next call)")
    a = p.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    end = START + a.call_seconds
    if a.verb != "start" and not (RUNS / "spec.json").exists():
        sys.exit(f"session.py {a.verb}: no session on this machine (a fresh one: the last went back with its runs)")
    install()
    if a.verb == "start":
        RUNS.mkdir(parents=True, exist_ok=True)
        (RUNS / "deadline").write_text(str(time.time() + a.deadline_in))
        spec = json.loads(Path(a.spec).read_text())
        (RUNS / "spec.json").write_text(json.dumps(spec))
        for run in spec:
            launch(run["name"], ["--steps", str(run["steps"]), *run["args"]])
    added = []
    if a.verb == "add":
        added = json.loads(Path(a.spec).read_text())
        spec = json.loads((RUNS / "spec.json").read_text()) + added
        (RUNS / "spec.json").write_text(json.dumps(spec))
        for run in added:
            launch(run["name"], ["--steps", str(run["steps"]), *run["args"]])
    runs = json.loads((RUNS / "spec.json").read_text())
    names = [r["name"] for r in runs]
    fixed = {r["name"] for r in runs if r.get("fixed")}  # a recipe's exact --steps (a reproduction): never fitted
    # every run not yet fitted, whichever call launched it: a ``start`` that returns before its runs have
    # logged enough steps leaves the fitting to the next ``wait`` (2026-12-07: a run left unfitted ran its
    # 60,000-step schedule into the deadline and stopped at step 18,213 with the learning rate still high)
    pending = set() if a.verb == "collect" else {n for n in names if not (RUNS / f"{n}.fitted").exists()} - fixed
    last_status = 0.0
    marks: dict[str, tuple[float, int]] = {}
    while time.time() < end - 45:
        for name in sorted(pending):
            if alive(name) and fit(name):
                pending.discard(name)
                (RUNS / f"{name}.fitted").write_text("")
        if a.verb == "wait" and fixed and not any(alive(n) for n in fixed):
            refit_alone(sorted(set(names) - fixed - pending), marks)
        if not any(alive(n) for n in names):  # nothing left to train: return now, with the snapshots
            break
        if time.time() - last_status > 60:
            status(names)
            last_status = time.time()
        time.sleep(5)
    if a.verb == "collect":
        for name in names:
            if alive(name):  # out of time: stop it now, the trainer checkpoints where it is
                os.killpg(int((RUNS / f"{name}.pid").read_text()), signal.SIGTERM)
        t = time.time()
        while any(alive(n) for n in names) and time.time() - t < 40:
            time.sleep(1)
    status(names)
    # The next call must come within 30 s of this one's end or the machine goes back with /tmp/runs. Sending
    # every checkpoint back every call (~20 MB each) made the transfer outlast that window (2026-12-06: the
    # machine went back between calls); sending none lost two finished runs when a caller stalled on an API
    # error (2026-12-06, refine-clean-cont3 and causal-seed1). So a run's checkpoint comes back once, in the
    # first call after it ended (it changes no more), and every call's with --snapshots or collect.
    for name in names:
        ended = not alive(name) and log(name) and not (RUNS / f"{name}.sent").exists()
        if not (ended or a.verb == "collect" or a.snapshots):
            continue
        try:
            snapshot(name, out)
            if not alive(name):
                (RUNS / f"{name}.sent").write_text("")
        except (OSError, ValueError) as exc:
            print(f"{name}: no snapshot ({exc})", flush=True)
    for name in names:
        print(f"--- {name}.out (tail)")
        text = (RUNS / f"{name}.out").read_text().splitlines() if (RUNS / f"{name}.out").exists() else []
        print("\n".join(text[-4:]))


if __name__ == "__main__":
    main()
