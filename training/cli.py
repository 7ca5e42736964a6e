"""``imadarem train``, ``imadarem data`` and ``imadarem eval``: the training side's commands.

They join the ``imadarem`` group through the ``imadarem_commands`` hook (this module is an entry point
of the ``imadarem`` group, as a third-party plugin would be), and import torch, RDKit or the evaluation
code only inside their bodies, so listing them costs nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from imadarem.runtime.cli import parse_options
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.hookspecs import hookimpl
from imadarem.training.args import TrainArgs


def require_torch(command: str) -> None:
    """A one-line error, not a ModuleNotFoundError traceback, when the ``train`` extra is missing."""
    if importlib.util.find_spec("torch") is None:
        raise ImadaremError(f"{command} needs PyTorch: pip install 'imadarem[train]'")


def _click_type(f: dataclasses.Field, default: Any):
    meta = f.metadata
    if meta.get("choices"):
        return click.Choice(meta["choices"])
    if meta.get("path"):
        return click.Path(dir_okay=meta["path"] == "dir", file_okay=meta["path"] == "file")
    kind = meta.get("kind") or type(default)
    if kind is int:
        return click.IntRange(min=meta.get("low"), max=meta.get("high"))
    if kind is float:
        high = meta.get("high")
        return click.FloatRange(min=meta.get("low"), max=high, min_open=meta.get("open_low", False),
                                max_open=high is not None and high < 1)
    return str


def train_args_options(func):
    """One click option per TrainArgs field, its default and help taken from the field."""
    for f in reversed([f for f in dataclasses.fields(TrainArgs) if f.name != "model"]):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            func = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=f.default,
                                help=f.metadata["help"])(func)
            continue
        func = click.option(flag, f.name, default=f.default, type=_click_type(f, f.default),
                            help=f.metadata["help"])(func)
    return func


#: ImplicitRefinementConfig fields with their own flags (their defaults live in the config class)
MODEL_OPTIONS = (
    ("--hidden-size", "hidden_size", click.IntRange(min=8), None),
    ("--layers", "num_layers", click.IntRange(min=1), None),
    ("--heads", "num_heads", click.IntRange(min=1), None),
    ("--dropout", "dropout", click.FloatRange(0, 1, max_open=True), None),
    ("--max-seq-len", "max_seq_len", click.IntRange(min=2), None),
    ("--refine-steps", "max_refinement_steps", click.IntRange(min=1), "K, the model's step count."),
    ("--schedule", "corruption_schedule", click.Choice(["linear", "cosine"]), None),
)


def model_options(func):
    for flag, name, kind, help_text in reversed(MODEL_OPTIONS):
        func = click.option(flag, name, type=kind, help=help_text or f"Model config {name} [default: the config's].")(func)
    func = click.option("--critic/--no-critic", "use_critic", default=None, help="Train a token-critic head.")(func)
    func = click.option("--gate/--no-gate", "use_refine_gate", default=None, help="Train the refinement gate.")(func)
    return click.option("--set", "config_set", multiple=True, callback=parse_options, metavar="KEY=VALUE",
                        help="Any other ImplicitRefinementConfig field, e.g. --set ema_decay=0.9995.")(func)


@click.command("train", context_settings={"show_default": True})
@click.option("--resume", is_flag=True, help="Continue the run in --out-dir from its latest checkpoint.")
@click.option("--max-new-steps", type=click.IntRange(min=1), help="Stop after this many steps in this call (chunked training).")
@train_args_options
@model_options
@click.pass_context
def train_command(ctx, resume, max_new_steps, config_set, **values):
    """Train an Imadarem V model; checkpoints go to OUT_DIR and --resume continues a stopped run.

    Runs under `torchrun --nproc_per_node N` with DDP (NCCL on GPUs, gloo on CPU).
    """
    require_torch("imadarem train")
    from imadarem.training.trainer import train

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    given = {k for k in values if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    if resume:
        overrides = {k: values[k] for k in given if k in fields and k != "out_dir"}
        result = train(TrainArgs(out_dir=values["out_dir"]), resume=True, max_new_steps=max_new_steps,
                       overrides=overrides)
    else:
        if not values["data"]:
            raise ImadaremError("--data is required (or --resume to continue a run)")
        model = {k: v for k, v in values.items() if k not in fields and v is not None}
        model.update(config_set)
        args = TrainArgs(**{k: v for k, v in values.items() if k in fields}, model=model)
        if (Path(args.out_dir) / "latest").exists():
            raise ImadaremError(f"{args.out_dir} already holds a run: use --resume to continue it or another --out-dir")
        result = train(args, max_new_steps=max_new_steps)
    click.echo(json.dumps({k: result[k] for k in ("step", "checkpoint", "interrupted")}))
    if result["interrupted"]:
        click.echo(f"interrupted at step {result['step']}; checkpoint saved. Continue with: "
                   f"imadarem train --resume --out-dir {values['out_dir']}", err=True)
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




@click.group("eval")
def eval_group():
    """Measure generation quality."""


@eval_group.command("molecules")
@click.option("--model", type=click.Path(dir_okay=False), help="Model file [default: the bundled model].")
@click.option("-n", "--num", "n", default=30000, show_default=True, type=click.IntRange(min=10))
@click.option("--selector", "selectors", multiple=True,
              help="Repeatable [default: gate].")
@click.option("--steps", "steps_list", multiple=True, type=click.IntRange(min=1), help="Repeatable [default: the model's K].")
@click.option("--temperature", type=click.FloatRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1))
@click.option("--moses-cache", type=click.Path(file_okay=False), help="Where `imadarem data moses` put MOSES.")
@click.option("--intdiv-sample", default=5000, show_default=True, type=click.IntRange(min=2))
@click.option("--fcd/--no-fcd", "with_fcd", default=None,
              help="FCD/Test with the fcd package's ChemNet [default: when the fcd extra is installed].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the rows as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write quality-vs-steps figure (PNG).")
@click.option("--samples", "score_files", is_flag=True,
              help="Score the SMILES FILES given (one molecule per line, e.g. from `imadarem bench --samples`) "
                   "instead of generating.")
@click.argument("sample_files", nargs=-1, type=click.Path(dir_okay=False))
def eval_molecules_command(model, n, selectors, steps_list, temperature, seed, batch_size, threads, moses_cache,
                           intdiv_sample, with_fcd, json_path, plot_path, score_files, sample_files):
    """Validity, Unique@1k/10k, Novelty, IntDiv, Filters and FCD/Test of generated molecules (RDKit,
    MOSES splits)."""
    from imadarem.training.evaluation import molecules as em

    cols = ["selector", "steps", "valid", "unique@1k", "unique@10k", "novelty", "intdiv", "filters", "fcd",
            "heavy_atoms", "steps_used", "edits_per_step", "early_stop", "seconds"]
    if bool(score_files) != bool(sample_files):
        raise ImadaremError("give --samples and the SMILES files to score, or neither")
    if sample_files:
        if model or selectors or steps_list or plot_path:
            raise ImadaremError("--samples scores files: it takes no --model, --selector, --steps or --plot")
        cols = ["samples", "n", "valid", "unique@1k", "unique@10k", "novelty", "intdiv", "filters", "fcd",
                "heavy_atoms"]
    shown = []

    def show(row):
        if not shown:  # the header with the first row: a setup error (data, FCD) prints nothing else
            click.echo("| " + " | ".join(cols) + " |")
            click.echo("|" + "---|" * len(cols))
        shown.append(row)
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols]
        click.echo("| " + " | ".join(cells) + " |")

    if sample_files:
        rows = em.evaluate_samples(list(sample_files), moses_cache, intdiv_sample, progress=show, with_fcd=with_fcd)
    else:
        rows = em.evaluate(model, n, list(selectors), list(steps_list) or [None], seed, temperature, batch_size,
                           moses_cache, intdiv_sample, threads, progress=show, with_fcd=with_fcd)
    em.write(rows, json_path)
    if plot_path:
        em.plot(rows, plot_path)


@hookimpl
def imadarem_commands():
    return [train_command, data_group, eval_group]
