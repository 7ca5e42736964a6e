"""Named training presets shipped with the package (``imadarem train --preset NAME``).

A preset sets ``TrainArgs`` fields and the family's config fields; any flag given on the command line wins
over the preset's value. ``moses-causal`` is the bundled model's recipe (experiments/runs/ has the runs),
``moses-refine`` the refinement family's (issue #24, in progress: the block objective, after the mixture's
first run sampled poorly), ``moses-imadarem-v`` the previous bundled
model's; the ``tiny-*`` presets train in a couple of minutes on a laptop CPU.
No torch here: the command line imports this module.
"""

from __future__ import annotations

from typing import Any

from imadarem.runtime.errors import ImadaremError

#: the optimiser and schedule of every MOSES preset (AdamW betas 0.9/0.98, warmup, cosine to 0.1 x lr)
_MOSES = {"data": "moses", "batch_size": 512, "lr": 1e-3, "warmup_steps": 300, "min_lr_ratio": 0.1,
          "weight_decay": 0.01, "val_fraction": 0.002, "eval_interval": 2000, "eval_batches": 8,
          "checkpoint_interval": 2000, "log_interval": 200, "seed": 0}

#: block models see only true tokens inside their blocks: no refills (training/block_objective.py says why)
_CLEAN_BLOCKS = {"sample_replace_rate": 0.0, "random_replace_rate": 0.0}

PRESETS: dict[str, dict[str, Any]] = {
    "moses-causal": {
        "summary": "the bundled model: a 4.96 M-parameter left-to-right transformer with 3 draft heads on MOSES "
                   "(SELFIES), one GPU",
        # docs/models.md: the run behind default.onnx (experiments/runs/shared-h200-2026-12-05/causal-drop)
        "args": {**_MOSES, "family": "causal", "steps": 35_000, "batch_size": 1024, "lr": 1.5e-3, "compile": True},
        "model": {"hidden_size": 256, "num_layers": 6, "num_heads": 8, "num_drafts": 3, "max_seq_len": 56,
                  "dropout": 0.1},
    },
    "moses-refine": {
        "summary": "a refinement model on MOSES (SELFIES), issue #24 in progress: block diffusion (blocks of 4 "
                   "decoded left to right, every block trained in every row) with middle blanks that see their "
                   "suffix, and a gate that commits and revises, one GPU",
        "args": {**_MOSES, "family": "refine", "steps": 60_000, "compile": True},
        "model": {"hidden_size": 256, "num_layers": 6, "num_heads": 8, "dropout": 0.0, "max_seq_len": 56,
                  "max_refinement_steps": 64, "objective": "block", "block_size": 4, "stop_threshold": 0.0,
                  "sampling_temperature": 1.0, "use_critic": False, **_CLEAN_BLOCKS},
    },
    "moses-imadarem-v": {
        "summary": "Imadarem V on MOSES (SELFIES), the previous bundled model's recipe, one GPU",
        "args": {**_MOSES, "family": "refine", "steps": 24_000, "warmup_steps": 1000, "val_fraction": 0.01,
                 "eval_interval": 1000, "checkpoint_interval": 1000, "log_interval": 100},
        "model": {"hidden_size": 256, "num_layers": 6, "num_heads": 8, "dropout": 0.1, "max_seq_len": 64,
                  "max_refinement_steps": 12, "ema_decay": 0.9995},
    },
    "tiny-causal": {
        "summary": "a small left-to-right model with 2 draft heads: minutes on a laptop CPU",
        "args": {"family": "causal", "steps": 600, "batch_size": 64, "lr": 3e-3, "warmup_steps": 50,
                 "eval_interval": 200, "checkpoint_interval": 200, "log_interval": 50},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_drafts": 2},
    },
    "tiny-refine": {
        "summary": "a small refinement model (block diffusion, blocks of 4): minutes on a laptop CPU",
        "args": {"family": "refine", "steps": 600, "batch_size": 64, "lr": 3e-3, "warmup_steps": 50,
                 "eval_interval": 200, "checkpoint_interval": 200, "log_interval": 50},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "dropout": 0.0, "max_refinement_steps": 64,
                  "objective": "block", "block_size": 4, "stop_threshold": 0.0, "sampling_temperature": 1.0,
                  **_CLEAN_BLOCKS},
    },
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ImadaremError(f"unknown preset {name!r} (choose from: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]
