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
    for f in reversed([f for f in dataclasses.fields(TrainArgs) if f.name != "model" and f.metadata.get("cli", True)]):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            func = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=f.default,
                                help=f.metadata["help"])(func)
            continue
        func = click.option(flag, f.name, default=f.default, type=_click_type(f, f.default),
                            help=f.metadata["help"])(func)
    return func


#: model-config flags: (flag, config field, type, help); each family accepts those its config has
MODEL_OPTIONS = (
    ("--hidden-size", "hidden_size", click.IntRange(min=8), None),
    ("--layers", "num_layers", click.IntRange(min=1), None),
    ("--heads", "num_heads", click.IntRange(min=1), None),
    ("--max-seq-len", "max_seq_len", click.IntRange(min=2), "Longest sequence in tokens, EOS included."),
    ("--drafts", "num_drafts", click.IntRange(0, 16), "causal: draft heads (tokens 2.. D+1 ahead)."),
    ("--dropout", "dropout", click.FloatRange(0, 1, max_open=True), "Dropout in training (refine, causal)."),
    ("--refine-steps", "max_refinement_steps", click.IntRange(min=1), "refine: K, the model's step count."),
    ("--schedule", "corruption_schedule", click.Choice(["linear", "cosine"]), "refine: corruption schedule."),
)
FLAG_OF = {name: flag for flag, name, _, _ in MODEL_OPTIONS} | {"use_critic": "--critic/--no-critic",
                                                                 "use_refine_gate": "--gate/--no-gate"}


def model_options(func):
    for flag, name, kind, help_text in reversed(MODEL_OPTIONS):
        func = click.option(flag, name, type=kind, help=help_text or f"Model config {name} [default: the family's].")(func)
    func = click.option("--critic/--no-critic", "use_critic", default=None, help="refine: train a token-critic head.")(func)
    func = click.option("--gate/--no-gate", "use_refine_gate", default=None, help="refine: train the refinement gate.")(func)
    return click.option("--set", "config_set", multiple=True, callback=parse_options, metavar="KEY=VALUE",
                        help="Any other field of the family's config, e.g. --set ema_decay=0.9995.")(func)


def _check_family_flags(family: str, model: dict[str, Any]) -> None:
    """A model flag the family's config does not have is one line, before any data is read."""
    from imadarem.training.families import get_family

    fields = set(get_family(family).flags.values())
    for name in model:
        if name in FLAG_OF and name not in fields:
            raise ImadaremError(f"{FLAG_OF[name]} is not a setting of the {family} family")


@click.command("train", context_settings={"show_default": True})
@click.option("--resume", is_flag=True, help="Continue the run in --out-dir from its latest checkpoint.")
@click.option("--preset", help="A named recipe shipped with Imadarem (see --list-presets); flags given win over it.")
@click.option("--list-presets", is_flag=True, help="List the presets and exit.")
@click.option("--max-new-steps", type=click.IntRange(min=1), help="Stop after this many steps in this call (chunked training).")
@train_args_options
@model_options
@click.pass_context
def train_command(ctx, resume, preset, list_presets, max_new_steps, config_set, **values):
    """Train a model of a family (--family causal: left to right with draft heads; refine: bidirectional, fills
    blanks and revises);
    checkpoints go to OUT_DIR and --resume continues a stopped run.

    Runs under `torchrun --nproc_per_node N` with DDP (NCCL on GPUs, gloo on CPU).
    """
    from imadarem.training import presets

    if list_presets:
        for name, entry in sorted(presets.PRESETS.items()):
            click.echo(f"{name:<14} {entry['summary']}")
        return 0
    require_torch("imadarem train")
    from imadarem.training.trainer import train

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    given = {k for k in values if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    if resume:
        if preset or config_set or any(k not in fields and values[k] is not None for k in values):
            raise ImadaremError("--resume continues a run with its own settings: give no --preset, model flags or --set")
        overrides = {k: values[k] for k in given if k in fields and k != "out_dir"}
        result = train(TrainArgs(out_dir=values["out_dir"]), resume=True, max_new_steps=max_new_steps,
                       overrides=overrides)
    else:
        chosen = presets.preset(preset) if preset else {"args": {}, "model": {}}
        args = {k: v for k, v in values.items() if k in fields}
        args.update({k: v for k, v in chosen["args"].items() if k not in given})
        model = dict(chosen["model"])
        model.update({k: v for k, v in values.items() if k not in fields and v is not None})
        model.update(config_set)
        if preset:
            args["preset"] = preset
        if args.get("init_from") and "family" not in given and "family" not in chosen["args"]:
            from imadarem.training.checkpoint import family_name, read_state, resolve_checkpoint

            args["family"] = family_name(read_state(resolve_checkpoint(args["init_from"])))  # the weights load once, later
        if not args["data"]:
            raise ImadaremError("--data is required (or --preset, or --resume to continue a run)")
        _check_family_flags(args["family"], {k: v for k, v in values.items() if k not in fields and v is not None})
        args = TrainArgs(**{k: v for k, v in args.items() if k in fields or k == "preset"}, model=model)
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
@click.option("-o", "--option", "options", multiple=True, callback=parse_options, metavar="KEY=VALUE",
              help="Selector option for every row, repeatable (e.g. -o threshold=0.7), as imadarem-run's.")
@click.option("--temperature", type=click.FloatRange(min=0))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1))
@click.option("--moses-cache", type=click.Path(file_okay=False), help="Where `imadarem data moses` put MOSES.")
@click.option("--intdiv-sample", type=click.IntRange(min=2),
              help="IntDiv and IntDiv2 on this many random valid molecules [default: all of them, as MOSES].")
@click.option("--jobs", "n_jobs", type=click.IntRange(min=1),
              help="Processes for RDKit's per-molecule work [default: every CPU core].")
@click.option("--fcd/--no-fcd", "with_fcd", default=None,
              help="FCD/Test and FCD/TestSF with the fcd package's ChemNet [default: when the fcd extra is installed].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the rows as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write quality-vs-steps figure (PNG).")
@click.option("--samples", "score_files", is_flag=True,
              help="Score the SMILES FILES given (one molecule per line, e.g. from `imadarem bench --samples`) "
                   "instead of generating.")
@click.argument("sample_files", nargs=-1, type=click.Path(dir_okay=False))
def eval_molecules_command(model, n, selectors, steps_list, options, temperature, seed, batch_size, threads,
                           moses_cache, intdiv_sample, n_jobs, with_fcd, json_path, plot_path, score_files,
                           sample_files):
    """MOSES's metrics of generated molecules, under MOSES's names: valid, unique@1000/10000, FCD, SNN, Frag and
    Scaf against Test and TestSF, IntDiv, IntDiv2, Filters, Novelty, and the Wasserstein distances of logP, SA,
    QED and weight to Test (RDKit; MOSES's splits and reference statistics). The reference sets' descriptors
    are computed on first use (minutes) and cached."""
    from imadarem.training.evaluation import molecules as em

    metrics = [m for m in em.MOSES_METRICS if with_fcd is not False or not m.startswith("FCD/")]
    cols = ["selector", "steps", *metrics, "steps_used", "edits_per_step", "early_stop", "seconds"]
    if bool(score_files) != bool(sample_files):
        raise ImadaremError("give --samples and the SMILES files to score, or neither")
    from imadarem.runtime.files import check_output

    for path, what in ((json_path, "--json"), (plot_path, "--plot")):  # before minutes of generation
        if path:
            check_output(path, what)
    if sample_files:
        if model or selectors or steps_list or options or plot_path:
            raise ImadaremError("--samples scores files: it takes no --model, --selector, --steps, --option or --plot")
        cols = ["samples", "n", *metrics]
    shown = []

    def show(row):
        if not shown:  # the header with the first row: a setup error (data, FCD) prints nothing else
            click.echo("| " + " | ".join(cols) + " |")
            click.echo("|" + "---|" * len(cols))
        shown.append(row)
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols]
        if row.get("options") and "selector" in cols:
            cells[cols.index("selector")] += " " + " ".join(f"{k}={v}" for k, v in row["options"].items())
        click.echo("| " + " | ".join(cells) + " |")

    if sample_files:
        rows = em.evaluate_samples(list(sample_files), moses_cache, intdiv_sample, progress=show, with_fcd=with_fcd,
                                   n_jobs=n_jobs)
    else:
        rows = em.evaluate(model, n, list(selectors), list(steps_list) or [None], seed, temperature, batch_size,
                           moses_cache, intdiv_sample, threads, progress=show, with_fcd=with_fcd, n_jobs=n_jobs,
                           selector_options=options)
    sampled = sorted({r["IntDiv_molecules"] for r in rows if intdiv_sample and "IntDiv_molecules" in r})
    if sampled:
        click.echo(f"\nIntDiv, IntDiv2: on {', '.join(map(str, sampled))} random valid molecules "
                   "(--intdiv-sample; MOSES uses all)")
    em.write(rows, json_path)
    if plot_path:
        em.plot(rows, plot_path)


@eval_group.command("fragments")
@click.option("--model", "models", multiple=True, type=click.Path(dir_okay=False),
              help="Model file or bundled model's name, repeatable: one row per model and task [default: the "
                   "bundled model]. A left-to-right model gets each prompt as a prefix (SAFE-GPT's way).")
@click.option("--suite", type=click.Choice(["genmol", "moses"]), default="genmol", show_default=True,
              help="genmol: GenMol's 10 drugs, its published rows beside ours; moses: 240 prompts cut from MOSES "
                   "test molecules by the same rules.")
@click.option("--task", "tasks", multiple=True, help="Repeatable: linker_design, motif_extension, "
              "scaffold_decoration, superstructure_generation [default: all four].")
@click.option("--samples", default=100, show_default=True, type=click.IntRange(min=1),
              help="Molecules per prompt and seed (GenMol: 100).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds (GenMol: 3).")
@click.option("--selector", help="Selector for every row [default: the model's].")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1))
@click.option("--moses-cache", type=click.Path(file_okay=False), help="Where `imadarem data moses` put MOSES (SA scores).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every row (per task and prompt) as JSON.")
@click.option("--grid", "grid_dir", type=click.Path(file_okay=False),
              help="Draw one picture per task and model into this folder (the task's first prompt, fragments highlighted).")
@click.option("--retries", default=0, show_default=True, type=click.IntRange(min=0),
              help="Redraws of a sample that lost its fragments (0: one draw, as GenMol samples; imadarem-run's "
                   "default is 3). Calls count every draw.")
def eval_fragments_command(models, suite, tasks, samples, seeds, selector, batch_size, threads, moses_cache,
                           json_path, grid_dir, retries):
    """GenMol's fragment tasks (linker design, motif extension, scaffold decoration, superstructure
    generation) and metrics as its code computes them: validity (molecules that keep the fragments), uniqueness,
    quality (QED >= 0.6 and SA <= 4), diversity and distance; plus kept, valid and model calls."""
    from imadarem.runtime.files import check_output
    from imadarem.training.data import fetch_moses
    from imadarem.training.evaluation import fragments as ef
    from imadarem.training.evaluation import moses_reference as mr

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ImadaremError(f"--seeds {seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seed_list:
        raise ImadaremError("--seeds: give at least one seed")
    task_list = ef.check_tasks(tasks)
    if json_path:
        check_output(json_path, "--json")
    sa_path = mr.sa_scores_file(fetch_moses(moses_cache)["test"].parent)
    results = []
    for model in models or (None,):
        result = ef.evaluate(model, suite, task_list, samples, seed_list, sa_path, selector=selector,
                             batch_size=batch_size, threads=threads,
                             grid_dir=str(Path(grid_dir) / Path(str(model or "default")).stem) if grid_dir else None,
                             retries=retries)
        results.append(result)
        ef.write(results, json_path)
    for line in ef.table(results):
        click.echo(line)


@hookimpl
def imadarem_commands():
    return [train_command, data_group, eval_group]
