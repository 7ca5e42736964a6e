"""FCD/Test against sequential model calls per molecule for the levers of this folder (one PNG).

    python3 plot_frontier.py frontier.png

Lines: draft-and-verify with 1, 2 and 3 drafts (batch 5 and 6 of the README), the same drafts committed by
confidence without verification, block diffusion (bd4 m, batch 4) with its confidence threshold, and the
left-to-right yardstick (one token per call) of each batch.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]


def series(data, name, decoders):
    got = {r["decoder"]: r for r in data if r["name"] == name}
    pts = sorted((got[d]["calls"], got[d]["fcd"]) for d in decoders if d in got)
    return [p[0] for p in pts], [p[1] for p in pts]


def main(out: str) -> None:
    spec, bd = rows("results-speculative.jsonl"), rows("results-continued.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label, color in (("mtp3", "batch 5", "tab:blue"), ("mtp3-2", "batch 6", "tab:green")):
        x, y = series(spec, name, ["spec,drafts=1", "spec,drafts=2", "spec"] if name == "mtp3" else
                      ["spec,drafts=1", "spec"])
        ax.plot(x, y, "o-", color=color, label=f"draft-and-verify, 1–3 drafts ({label})")
        x, y = series(spec, name, ["tau=0.7", "tau=0.9"])
        ax.plot(x, y, "s--", color=color, alpha=0.6, label=f"same drafts by confidence, unverified ({label})")
    for name, label, color in (("ar", "batch 5", "tab:blue"), ("ar-2", "batch 6", "tab:green")):
        x, y = series(spec, name, ["T=1.0"])
        ax.plot(x, y, "*", color=color, markersize=14, label=f"left-to-right yardstick ({label})")
    x, y = series(bd, "bd4m-cont", [r["decoder"] for r in bd])
    ax.plot(x, y, "^-", color="tab:red", label="block diffusion bd4 m, confidence threshold (batch 4)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axvline(18, color="grey", lw=0.8, ls=":")
    ax.text(12.2, 1.06, "bar: FCD ≤ 1.0 at ≤ 18 calls", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("sequential model calls per molecule")
    ax.set_ylabel("FCD/Test (MOSES reference, n = 10,000)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE / "frontier.png"))
