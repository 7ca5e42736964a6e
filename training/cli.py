"""``imadarem train``, ``imadarem data`` and ``imadarem bench``: click commands that import torch only when they run."""

from __future__ import annotations

import json
from pathlib import Path

import click
from imadarem.runtime.cli import _parse_option


@click.command("train", context_settings={"show_default": True})
@click.option("--data", type=click.Path(dir_okay=False), help="Training file: text lines, SMILES .csv(.gz)/.smi, .selfies.")
@click.option("--out-dir", default="runs/imadarem", type=click.Path(file_okay=False), help="Run folder (checkpoints, logs).")
@click.option("--resume", is_flag=True, help="Continue the run in --out-dir from its latest checkpoint.")
@click.option("--data-format", type=click.Choice(["auto", "text", "smiles", "selfies"]), default="auto")
@click.option("--tokenizer", default="auto", help="Tokenizer plugin: auto (selfies for molecules, else char), char, selfies, hf.")
@click.option("--tokenizer-file", type=click.Path(dir_okay=False), help="tokenizer.json for --tokenizer hf.")
@click.option("--val-data", type=click.Path(dir_okay=False), help="Validation file [default: a split of --data].")
@click.option("--val-fraction", default=0.01, type=click.FloatRange(0, 0.5))
@click.option("--steps", type=click.IntRange(min=1), help="Total optimiser steps [default: 10000].")
@click.option("--max-new-steps", type=click.IntRange(min=1), help="Stop after this many steps in this call (chunked training).")
@click.option("--batch-size", default=128, type=click.IntRange(min=1), help="Global batch size.")
@click.option("--lr", default=3e-4, type=click.FloatRange(min=0, min_open=True))
@click.option("--warmup-steps", default=500, type=click.IntRange(min=0))
@click.option("--weight-decay", default=0.01, type=click.FloatRange(min=0))
@click.option("--grad-clip", default=1.0, type=click.FloatRange(min=0, min_open=True))
@click.option("--optimizer", type=click.Choice(["adamw", "ranger21"]), default="adamw")
@click.option("--seed", default=0, type=int)
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", help="auto = bf16 autocast on CUDA.")
@click.option("--eval-interval", default=500, type=click.IntRange(min=1))
@click.option("--checkpoint-interval", default=500, type=click.IntRange(min=1))
@click.option("--log-interval", default=50, type=click.IntRange(min=1))
@click.option("--workers", type=click.IntRange(min=1), help="Processes for SMILES -> SELFIES conversion.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Encoded-data cache [default: ~/.cache/imadarem].")
@click.option("--hidden-size", type=click.IntRange(min=8))
@click.option("--layers", "num_layers", type=click.IntRange(min=1))
@click.option("--heads", "num_heads", type=click.IntRange(min=1))
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True))
@click.option("--max-seq-len", type=click.IntRange(min=2))
@click.option("--refine-steps", "max_refinement_steps", type=click.IntRange(min=1), help="K, the model's step count.")
@click.option("--schedule", "corruption_schedule", type=click.Choice(["linear", "cosine"]))
@click.option("--critic/--no-critic", "use_critic", default=None, help="Train a token-critic head.")
@click.option("--gate/--no-gate", "use_refine_gate", default=None, help="Train the refinement gate.")
@click.option("--set", "config_set", multiple=True, callback=_parse_option, metavar="KEY=VALUE",
              help="Any other ImplicitRefinementConfig field, e.g. --set ema_decay=0.9995.")
@click.option("--time-limit", type=click.FloatRange(min=1), help="Seconds of wall time, then checkpoint and stop cleanly.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_command(data, out_dir, resume, data_format, tokenizer, tokenizer_file, val_data, val_fraction, steps,
                  max_new_steps, batch_size, lr, warmup_steps, weight_decay, grad_clip, optimizer, seed, device,
                  precision, eval_interval, checkpoint_interval, log_interval, workers, cache_dir, config_set,
                  time_limit, no_progress, **model_fields):
    """Train an Imadarem V model; checkpoints go to OUT_DIR and --resume continues a stopped run.

    Runs under `torchrun --nproc_per_node N` with DDP (NCCL on GPUs, gloo on CPU).
    """
    from imadarem.runtime.errors import ImadaremError
    from imadarem.training.trainer import TrainArgs, train

    if resume:
        overrides = {"steps": steps, "device": device, "progress": not no_progress, "workers": workers,
                     "cache_dir": cache_dir, "data": data, "time_limit": time_limit}
        result = train(TrainArgs(out_dir=out_dir), resume=True, max_new_steps=max_new_steps, overrides=overrides)
    else:
        if not data:
            raise ImadaremError("--data is required (or --resume to continue a run)")
        model = {k: v for k, v in model_fields.items() if v is not None}
        model.update(config_set)
        args = TrainArgs(data=data, out_dir=out_dir, data_format=data_format, tokenizer=tokenizer,
                         tokenizer_file=tokenizer_file, val_data=val_data, val_fraction=val_fraction,
                         steps=steps or 10000, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, grad_clip=grad_clip, optimizer=optimizer, seed=seed,
                         device=device, precision=precision, eval_interval=eval_interval,
                         checkpoint_interval=checkpoint_interval, log_interval=log_interval, workers=workers,
                         cache_dir=cache_dir, progress=not no_progress, time_limit=time_limit, model=model)
        from pathlib import Path

        if (Path(out_dir) / "latest").exists():
            raise ImadaremError(f"{out_dir} already holds a run: use --resume to continue it or another --out-dir")
        result = train(args, max_new_steps=max_new_steps)
    click.echo(json.dumps({k: result[k] for k in ("step", "checkpoint", "interrupted")}))
    if result["interrupted"]:
        click.echo(f"interrupted at step {result['step']}; checkpoint saved. Continue with: "
                   f"imadarem train --resume --out-dir {out_dir}", err=True)
        return 130
    return 0


@click.group("data")
def data_group():
    """Get datasets."""


@data_group.command("moses")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where to put the files [default: ~/.cache/imadarem/moses].")
@click.option("--wheel", type=click.Path(dir_okay=False), help="A local molsets-0.3.1 wheel instead of downloading it.")
def moses_command(cache_dir, wheel):
    """Extract MOSES train/test SMILES from the molsets==0.3.1 wheel (sha256-checked, never installed)."""
    from imadarem.training.data import fetch_moses

    for name, path in fetch_moses(cache_dir, wheel).items():
        click.echo(f"{name}\t{path}")


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


def _name_list(ctx, param, value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@click.command("bench")
@click.option("--model", type=click.Path(dir_okay=False), help="Model file [default: the bundled model].")
@click.option("--checkpoint", type=click.Path(), help="Benchmark a training run / checkpoint instead of a model file.")
@click.option("--batch-sizes", default="1,16,64,256", show_default=True, callback=_int_list)
@click.option("--providers", default="cpu", show_default=True, callback=_name_list, help="cpu and/or cuda.")
@click.option("--engines", default="all", show_default=True, callback=_name_list,
              help="Comma-separated: ort-fp32, ort-int8, ort-fp16, ort-fp32-head, ort-fp16-head (files with the "
                   "sampling head), torch, torch-bf16, xt-nar, xt-ar-kv.")
@click.option("--steps", type=click.IntRange(min=1), help="Refinement steps [default: the model's K].")
@click.option("--selector", default="gate", show_default=True, help="gate or entropy (the PyTorch loop has both).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for onnxruntime and torch [default: all].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--agreement-n", default=256, show_default=True, type=click.IntRange(min=0),
              help="Sequences decoded greedily to compare int8/fp16 tokens with fp32.")
@click.option("-o", "--out-dir", default="bench-results", show_default=True, type=click.Path(file_okay=False))
def bench_command(model, checkpoint, batch_sizes, providers, engines, steps, selector, repeats, threads, seed,
                  agreement_n, out_dir):
    """Time the runtime loop against PyTorch eager, x-transformers and a KV-cache AR decoder.

    Writes OUT_DIR/bench.json and OUT_DIR/bench.md (the table, with ratios against the PyTorch loop).
    """
    from imadarem.runtime.errors import ImadaremError
    from imadarem.training.bench import ENGINES, Bench, BenchArgs

    engines = ENGINES if engines == ("all",) else engines
    if model and checkpoint:
        raise ImadaremError("give --model or --checkpoint, not both")
    args = BenchArgs(model=model, checkpoint=checkpoint, batch_sizes=batch_sizes, providers=providers,
                     engines=engines, steps=steps, selector=selector, repeats=repeats, threads=threads, seed=seed,
                     agreement_n=agreement_n, out_dir=out_dir)
    bench = Bench(args)
    bench.run(progress=lambda msg: click.echo(f"bench: {msg}", err=True))
    click.echo((Path(out_dir) / "bench.md").read_text())
