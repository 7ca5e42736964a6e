"""``TrainArgs``: every knob of a training run, declared once.

Each field's default is the one default of that knob: ``imadarem train`` builds its options from these
fields (help text and value range in each field's metadata), and ``run.json`` stores them, so a resumed
run continues with exactly what it started with. No torch here: the command line imports this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def knob(default: Any, help: str, *, low: float | None = None, high: float | None = None,
         choices: tuple[str, ...] | None = None, kind: type | None = None, path: str | None = None,
         option: str | None = None, open_low: bool = False) -> Any:
    """A TrainArgs field with what its command-line option needs: help text, range (``low``/``high``,
    inclusive; ``high`` exclusive for fractions), ``choices``, value ``kind`` when the default is None,
    ``path`` ("file" or "dir"), and ``option`` when the flag is not the field's name."""
    meta = {"help": help, "low": low, "high": high, "choices": choices, "kind": kind, "path": path,
            "option": option, "open_low": open_low}
    return field(default=default, metadata=meta)


#: the model families (``training/families/``), named here without importing torch
FAMILIES = ("causal", "refine")


@dataclass
class TrainArgs:
    family: str = knob("causal", "Model family: causal (left to right with draft heads) or refine (bidirectional, fills blanks and revises).",
                       choices=FAMILIES)
    data: str = knob("", "Training file: text lines, SMILES .csv(.gz)/.smi, .selfies; or moses (MOSES train).")
    out_dir: str = knob("runs/imadarem", "Run folder (checkpoints, logs).", path="dir")
    data_format: str = knob("auto", "How to read --data.", choices=("auto", "text", "smiles", "selfies"))
    tokenizer: str = knob("auto", "Tokenizer plugin: auto (selfies for molecules, else char), char, selfies, hf.")
    tokenizer_file: str | None = knob(None, "tokenizer.json for --tokenizer hf.", kind=str, path="file")
    val_data: str | None = knob(None, "Validation file [default: a split of --data].", kind=str, path="file")
    val_fraction: float = knob(0.01, "Share of --data held out for validation.", low=0, high=0.5)
    writings: int = knob(0, "SMILES data: each molecule also in this many random SMILES writings (RDKit), so the model "
                            "takes fragment prompts, which are written in such orders; held-out molecules stay out "
                            "in every writing.", low=0, high=64)
    steps: int = knob(10000, "Total optimiser steps.", low=1)
    batch_size: int = knob(128, "Global batch size (split over DDP ranks).", low=1)
    lr: float = knob(3e-4, "Peak learning rate.", low=0, open_low=True)
    min_lr_ratio: float = knob(0.1, "Final learning rate as a share of --lr (cosine decay).", low=0, high=1)
    warmup_steps: int = knob(500, "Linear warmup steps.", low=0)
    weight_decay: float = knob(0.01, "AdamW weight decay.", low=0)
    grad_clip: float = knob(1.0, "Gradient norm clip.", low=0, open_low=True)
    optimizer: str = knob("adamw", "Optimiser.", choices=("adamw", "ranger21"))
    seed: int = knob(0, "Seed of everything random (batch order, corruption, dropout).", low=0, high=2**32 - 1)
    eval_interval: int = knob(500, "Steps between validation losses.", low=1)
    eval_batches: int = knob(4, "Validation batches per evaluation.", low=1)
    checkpoint_interval: int = knob(500, "Steps between checkpoints.", low=1)
    log_interval: int = knob(50, "Steps between log lines.", low=1)
    keep_checkpoints: int = knob(2, "Checkpoints kept in the run folder.", low=1)
    device: str = knob("auto", "auto, cpu, cuda or cuda:N.")
    precision: str = knob("auto", "auto = bf16 autocast on CUDA, fp32 on CPU.", choices=("auto", "fp32", "bf16"))
    compile: bool = knob(False, "torch.compile the training forward (GPUs: fewer kernel launches; the same loss).")
    workers: int | None = knob(None, "Processes for SMILES -> SELFIES conversion.", kind=int, low=1)
    cache_dir: str | None = knob(None, "Encoded-data cache [default: ~/.cache/imadarem].", kind=str, path="dir")
    progress: bool = knob(True, "Show a progress bar.")
    time_limit: float | None = knob(None, "Seconds of wall time, then checkpoint and stop cleanly.", kind=float, low=1)
    init_from: str | None = knob(None, "Start from this checkpoint's (or run folder's) EMA weights, config and tokenizer: "
                                 "fine-tune on your data or continue a run in a new schedule.", kind=str)
    #: the preset the run started from (recorded in run.json; ``--preset`` on the command line)
    preset: str | None = field(default=None, metadata={"help": "", "cli": False})
    #: the family's config overrides (its own fields hold their defaults)
    model: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
