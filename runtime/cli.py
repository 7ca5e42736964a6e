"""Command line: ``imadarem-run`` (generation) and the ``imadarem`` group.

Every command imports its heavy modules inside its body, so ``--help``, ``imadarem plugins`` and
``imadarem-run`` never import torch. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from imadarem.runtime.errors import ImadaremError

EXIT_BAD_INPUT = 2


def _fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> None:
    message = " ".join(str(message).split())  # exactly one line
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(code)


def _invoke(command: click.Command, prog: str, args: list[str] | None = None) -> None:
    try:
        result = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(EXIT_BAD_INPUT)
    except click.ClickException as exc:
        _fail(prog, exc.format_message())
    except ImadaremError as exc:
        _fail(prog, str(exc))
    except click.Abort:
        _fail(prog, "aborted", 130)
    except KeyboardInterrupt:
        _fail(prog, "interrupted", 130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    except OSError as exc:
        _fail(prog, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    sys.exit(result if isinstance(result, int) else 0)


def _parse_option(_ctx, _param, values: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        try:
            options[key.replace("-", "_")] = json.loads(raw)
        except ValueError:
            options[key.replace("-", "_")] = raw
    return options


def _render_trajectory(sample, tokenizer, mask_id: int, pad_id: int) -> list[str]:
    lines = []
    for step in sample.trajectory:
        shown = []
        refined = set(step.refined)
        for pos, tok in enumerate(step.tokens):
            if tok == pad_id:
                break
            piece = "_" if tok == mask_id else tokenizer.id_to_token(tok)
            shown.append(click.style(piece, bold=True, fg="yellow") if pos in refined else piece)
        status = "  early stop" if step.stopped else ""
        lines.append(f"  t={step.t:<2} refined {len(step.refined):>3}  re-masked {len(step.remasked):>3}  "
                     f"change {step.change_ratio:5.2f}{status}  " + " ".join(shown))
    return lines


@click.command("run")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-n", "--num", "n", default=16, show_default=True, type=click.IntRange(min=1), help="Sequences to generate.")
@click.option("--selector", default="gate", show_default=True, help="Selector plugin (see `imadarem plugins`).")
@click.option("--steps", type=click.IntRange(min=1), help="Refinement steps K [default: the model's].")
@click.option("--temperature", type=click.FloatRange(min=0), help="Sampling temperature [default: the model's].")
@click.option("--stop-threshold", type=click.FloatRange(0, 1), help="Early-stop change ratio [default: the model's].")
@click.option("--seed", type=int, help="Random seed (same seed, same output).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads.")
@click.option("--prompt", help="Template like '[C][C](=O)<mask:12>' or a plain prefix to continue.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per model call [default: all].")
@click.option("-o", "--option", "options", multiple=True, callback=_parse_option, metavar="KEY=VALUE",
              help="Selector option, repeatable (e.g. -o schedule=linear).")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text", show_default=True)
@click.option("--trajectory", is_flag=True, help="Show each step: refined positions, change ratio, early stop.")
def run_command(model, n, selector, steps, temperature, stop_threshold, seed, provider, threads, prompt,
                batch_size, options, fmt, trajectory):
    """Generate sequences with MODEL (an Imadarem .onnx file; default: the bundled model)."""
    from imadarem.runtime.generator import Generator

    gen = Generator(model, provider=provider, threads=threads)
    samples = gen.generate(n, selector=selector, steps=steps, temperature=temperature,
                           stop_threshold=stop_threshold, seed=seed, prompt=prompt, batch_size=batch_size,
                           trajectory=trajectory, **options)
    for i, sample in enumerate(samples):
        if fmt == "jsonl":
            click.echo(json.dumps(sample.as_dict()))
            continue
        if trajectory:
            stop = "early stop" if sample.early_stop else "all steps"
            click.echo(f"#{i} {sample.text}    ({sample.steps} steps, {stop})")
            for line in _render_trajectory(sample, gen.tokenizer, gen.special.mask, gen.special.pad):
                click.echo(line)
        else:
            click.echo(sample.text)


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json):
    """List the installed selector and tokenizer plugins (and any that failed to load)."""
    from imadarem.runtime.registry import list_plugins, plugin_problems

    plugins, problems = list_plugins(), plugin_problems()
    if as_json:
        click.echo(json.dumps({"plugins": [p.as_dict() for p in plugins],
                               "problems": [p.as_dict() for p in problems]}, indent=2))
        return
    rows = [("KIND", "NAME", "DISTRIBUTION", "VERSION", "SUMMARY")]
    rows += [(p.kind, p.name, p.distribution, p.version, p.summary) for p in plugins]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    for problem in problems:
        click.echo(f"error: {problem}", err=True)


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_command(model, as_json):
    """Show a model file's metadata, inputs/outputs and parameter count."""
    from imadarem.runtime.modelfile import describe_model_file

    info = describe_model_file(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    cfg = info["config"]
    click.echo(f"model file   {info['path']}  ({info['bytes']:,} bytes, format {info['format']})")
    click.echo(f"parameters   {info['parameters']:,}" if info["parameters"] is not None else "parameters   unknown")
    click.echo(f"tokenizer    {info['tokenizer']['adapter']} ({cfg['vocab_size']} tokens), special ids {info['special_ids']}")
    click.echo("config       " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items())))
    for kind in ("inputs", "outputs"):
        for io in info[kind]:
            click.echo(f"{kind[:-1]:<12} {io['name']:<10} {io['type']:<15} {io['shape']}")
    for key, value in sorted(info["provenance"].items()):
        click.echo(f"provenance   {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


class LazyGroup(click.Group):
    """A group whose subcommands live in other modules and are imported only when used."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            module_name, attr = self.lazy[name].split(":")
            import importlib

            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)


# subcommands filled in by their own modules; none of those modules imports torch at import time
LAZY_COMMANDS: dict[str, str] = {
    "train": "imadarem.training.cli:train_command",
    "data": "imadarem.training.cli:data_group",
    "export": "imadarem.export.cli:export_command",
    "bench": "imadarem.training.cli:bench_command",
}


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imadarem")
def cli():
    """Imadarem: train, export and run iterative-refinement sequence generators."""


cli.add_command(run_command)
cli.add_command(plugins_command)
cli.add_command(inspect_command)


def main(args: list[str] | None = None) -> None:
    _invoke(cli, "imadarem", args)


def run_main(args: list[str] | None = None) -> None:
    _invoke(run_command, "imadarem-run", args)



@click.group("eval")
def eval_group():
    """Measure generation quality."""


@eval_group.command("molecules")
@click.option("--model", type=click.Path(dir_okay=False), help="Model file [default: the bundled model].")
@click.option("-n", "--num", "n", default=30000, show_default=True, type=click.IntRange(min=10))
@click.option("--selector", "selectors", multiple=True, default=["gate"], show_default=True, help="Repeatable.")
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
def eval_molecules_command(model, n, selectors, steps_list, temperature, seed, batch_size, threads, moses_cache,
                           intdiv_sample, with_fcd, json_path, plot_path):
    """Validity, Unique@1k/10k, Novelty, IntDiv, Filters and FCD/Test of generated molecules (RDKit,
    MOSES splits)."""
    from imadarem.runtime import eval_molecules as em

    cols = ["selector", "steps", "valid", "unique@1k", "unique@10k", "novelty", "intdiv", "filters", "fcd",
            "heavy_atoms", "steps_used", "edits_per_step", "early_stop", "seconds"]
    shown = []

    def show(row):
        if not shown:  # the header with the first row: a setup error (data, FCD) prints nothing else
            click.echo("| " + " | ".join(cols) + " |")
            click.echo("|" + "---|" * len(cols))
        shown.append(row)
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols]
        click.echo("| " + " | ".join(cells) + " |")

    rows = em.evaluate(model, n, list(selectors), list(steps_list) or [None], seed, temperature, batch_size,
                       moses_cache, intdiv_sample, threads, progress=show, with_fcd=with_fcd)
    em.write(rows, json_path)
    if plot_path:
        em.plot(rows, plot_path)


cli.add_command(eval_group)


if __name__ == "__main__":  # pragma: no cover
    main()
