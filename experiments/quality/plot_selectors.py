"""FCD/Test against sequential model calls: one line per selector on the bundled model, and the baseline.

    python3 plot_selectors.py selectors-n10000.jsonl fcd-vs-calls.png

Each JSONL row is one `(model, selector, step budget)` run at n = 10,000 (``name`` "ours" for the bundled
model, "baseline" for the equal-compute left-to-right yardstick decoded one token per call), with its
mean ``calls`` and its ``fcd`` from imadarem's MOSES-exact scorer. A budget below what a molecule needs
leaves the loop's last step to fill the rest unverified, which is what the left part of each line shows.
"""
import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = [json.loads(line) for line in open(sys.argv[1])]
lines = defaultdict(list)
for r in rows:
    if r["selector"].startswith("one token"):  # the lean decoder, not a selector: in the table only
        continue
    label = "baseline: left to right, one token per call" if r["name"] == "baseline" else r["selector"]
    lines[label].append((r["calls"], r["fcd"]))
fig, ax = plt.subplots(figsize=(8.6, 4.2))
COLORS = {"gate": "C0", "l2r": "C1", "maskgit": "C2", "critic": "C3", "uniform": "C5", "entropy": "C4",
          "overwrite": "C9"}
SAME_AS_GATE = ("entropy", "overwrite")  # they place the gate's drafts (every mask; the window counts)
for label in sorted(lines, key=lambda s: (s == "gate", s.startswith("baseline"), s)):  # gate drawn on top
    pts = sorted(lines[label])
    style = {"color": "black", "linestyle": "--"} if label.startswith("baseline") else {"color": COLORS.get(label)}
    if label in SAME_AS_GATE:
        style = {"color": COLORS[label], "linestyle": ":", "markersize": 9, "markerfacecolor": "none"}
        label += " (= gate's molecules)"
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
            linewidth=2.5 if label == "gate" else 1.2, zorder=3 if label == "gate" else 2, **style)
ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
ax.text(5.5, 1.1, "target FCD/Test 1.0", color="grey", fontsize=8)
ax.set_yscale("log")
ax.set_xlabel("sequential model calls per molecule (mean)")
ax.set_ylabel("FCD/Test (MOSES reference, n = 10,000)")
ax.set_title("Bundled model (draft heads, int8): quality against calls")
ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
