"""Command line: ``imadarem-run`` (generation) and the ``imadarem`` group.

Every command imports its heavy modules inside its body, so ``--help``, ``imadarem plugins`` and
``imadarem-run`` never import torch. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import click
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.limits import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_RETRIES,
    MAX_RETRIES,
    MAX_STEPS,
    MAX_TEMPERATURE,
)

EXIT_BAD_INPUT = 2


def _fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> None:
    message = " ".join(str(message).split())  # exactly one line
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(code)


def _one_line_warnings(prog: str) -> None:
    """Warnings reach a command-line user as one ``prog: warning: ...`` line each (no source lines)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        click.echo(f"{prog}: warning: {text}", err=True)

    warnings.showwarning = show


def _stdout_open() -> bool:
    """Whether standard output can be written (``cmd >&-`` closes it: Python then has no sys.stdout)."""
    import io

    if sys.stdout is None:
        return False
    try:
        fd = sys.stdout.fileno()
    except io.UnsupportedOperation:  # an in-memory stream (a test, a notebook): writable
        return True
    except (OSError, ValueError, AttributeError):
        return False
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def invoke(command: click.Command, prog: str, args: list[str] | None = None) -> None:
    """Run a click command the Imadarem way: bad input is one line on stderr and exit status 2."""
    _one_line_warnings(prog)
    if not _stdout_open():  # what it prints would go nowhere, and the exit status would say it worked
        _fail(prog, "standard output is closed: nothing could be written (redirect it to a file instead)")
    previous = _interrupt_as(_Interrupted)
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
    except (KeyboardInterrupt, _Interrupted):
        _fail(prog, "interrupted", 130)
    except (BrokenPipeError, _ReaderGone):
        # what is still buffered for stdout can never be written: point it at /dev/null for the exit flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as exc:
        _fail(prog, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    sys.exit(result if isinstance(result, int) else 0)


class _Interrupted(BaseException):
    """Ctrl-C, raised past click (which would print a bare newline for a KeyboardInterrupt) and past
    ``except Exception`` blocks (which would report it as a plugin's fault)."""


def _interrupt_as(exc_type):
    """Let SIGINT raise ``exc_type``; the previous handler, or None off the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(_signum, _frame):
        raise exc_type()

    return signal.signal(signal.SIGINT, handler)


def parse_options(_ctx, _param, values: tuple[str, ...]) -> dict[str, Any]:
    """click callback for repeatable KEY=VALUE options (values read as JSON when they parse)."""
    options: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        if raw.strip().lower() in ("true", "false"):  # True / FALSE too: never a string that reads as true
            options[key.replace("-", "_")] = raw.strip().lower() == "true"
            continue
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


HELP = {"help_option_names": ["-h", "--help"]}


@click.command("run", context_settings=HELP)
@click.argument("model", required=False)
@click.option("-n", "--num", "n", default=16, show_default=True, type=click.IntRange(min=1), help="Sequences to generate.")
@click.option("--selector", help="Selector plugin (see `imadarem plugins`) [default: the model's, gate].")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), help="Refinement steps K [default: the model's].")
@click.option("--temperature", type=click.FloatRange(0, MAX_TEMPERATURE), help="Sampling temperature [default: the model's].")
@click.option("--stop-threshold", type=click.FloatRange(0, 1), help="Early-stop change ratio [default: the model's].")
@click.option("--seed", type=click.IntRange(min=0),
              help="Random seed: same seed, same samples, whatever -n and --batch-size.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads.")
@click.option("--prompt", help="Template like 'CC(=O)<mask:12>' or '[C][C][=Branch1][C][=O]<mask:12>' (SMILES "
              "fragment or SELFIES, then blanks), or a plain prefix to continue.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Sequences per model call; memory grows with it, never with -n.")
@click.option("--drafts", type=click.IntRange(min=0),
              help="Causal models: draft heads a call may use [default: all]; 0 decodes one token per call.")
@click.option("-o", "--option", "options", multiple=True, callback=parse_options, metavar="KEY=VALUE",
              help="Selector option, repeatable (e.g. -o schedule=linear).")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text", show_default=True)
@click.option("--trajectory", is_flag=True, help="Show each step: refined positions, change ratio, early stop.")
@click.option("--retries", type=click.IntRange(0, MAX_RETRIES),
              help=f"Fragment prompts: draw a sample that lost its fragments again, at most this many times "
                   f"[default: {DEFAULT_RETRIES}; 0: never].")
@click.option("--grid", "grid_path", metavar="FILE",
              help="Also draw the samples into FILE (.svg or .png): molecules in a grid, a fragment prompt's "
                   "fragments highlighted (the chem extra).")
def run_command(model, n, selector, steps, temperature, stop_threshold, seed, provider, threads, prompt,
                batch_size, drafts, options, fmt, trajectory, retries, grid_path):
    """Generate sequences with MODEL: an Imadarem .onnx file or a bundled model's name (see `imadarem
    models`; default: the bundled default model).

    Samples are printed as each batch finishes; a progress bar shows on stderr when it is a terminal.
    On Ctrl-C what was printed stays, and the exit status is 130.
    """
    from imadarem.runtime.generator import Generator

    gen = Generator(model, provider=provider, threads=threads)
    drawer = _grid_drawer(grid_path, gen.tokenizer) if grid_path else None
    if selector is not None:
        options["selector"] = selector
    samples = gen.iter_generate(n, steps=steps, temperature=temperature,
                                stop_threshold=stop_threshold, seed=seed, prompt=prompt, batch_size=batch_size,
                                trajectory=trajectory, drafts=drafts, retries=retries, **options)
    texts = []
    with _progress(n) as progress:
        for i, sample in enumerate(samples):
            try:
                _print_sample(i, sample, fmt, trajectory, gen)
            except BrokenPipeError:  # the reader has enough (`| head`): stop quietly, as Unix tools do
                raise _ReaderGone() from None
            texts.append(sample.text)
            progress.update(1)
    if drawer is not None:
        drawer.draw(texts, grid_path, prompt)


def _grid_drawer(path: str, tokenizer):
    """The drawer for --grid, checked before any sample is generated: its file can be written, and some
    installed plugin draws this model's texts into that kind of file."""
    from pathlib import Path

    from imadarem.runtime.files import check_output
    from imadarem.runtime.registry import drawer_for

    check_output(path, "--grid")
    drawer = drawer_for(tokenizer)
    if drawer is None:
        raise ImadaremError(f"--grid: no installed plugin draws {getattr(tokenizer, 'name', '?')} samples (molecules "
                            "of a SELFIES model need the chem extra: pip install 'imadarem[chem]')")
    if Path(path).suffix.lower() not in drawer.suffixes:
        raise ImadaremError(f"--grid {path!r}: {drawer.name} writes {' or '.join(drawer.suffixes)} files")
    return drawer


class _ReaderGone(Exception):
    """stdout's reader closed the pipe (not an OSError, so that click does not turn it into exit 1)."""


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, _count: int) -> None:
        pass


def _progress(n: int):
    """click's progress bar on stderr, only when stderr is a terminal (never in pipes or logs)."""
    if not sys.stderr.isatty():
        return _NoProgress()
    return click.progressbar(length=n, label="generating", file=sys.stderr, show_pos=True)


def _print_sample(i: int, sample, fmt: str, trajectory: bool, gen) -> None:
    if fmt == "jsonl":
        click.echo(json.dumps(sample.as_dict()))
        return
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
    """List the installed plugins: selectors, tokenizers and commands (and any that failed to load).

    Exits with status 1 when a plugin failed to load, so scripts and CI notice a broken install.
    """
    from imadarem.runtime.registry import list_plugins, plugin_problems

    plugins, problems = list_plugins(), plugin_problems()
    if as_json:
        click.echo(json.dumps({"plugins": [p.as_dict() for p in plugins],
                               "problems": [p.as_dict() for p in problems]}, indent=2))
        return 1 if problems else 0
    rows = [("KIND", "NAME", "DISTRIBUTION", "VERSION", "SUMMARY")]
    rows += [(p.kind, p.name, p.distribution, p.version, p.summary) for p in plugins]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    return 1 if problems else 0


@click.command("inspect")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_command(model, as_json):
    """Show MODEL's metadata, inputs/outputs and parameter count (a file or a bundled model's name;
    default: the bundled default model)."""
    from imadarem.runtime.formats import describe_model

    info = describe_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    cfg = info["config"]
    click.echo(f"model file   {info['path']}  ({info['bytes']:,} bytes, format {info['format']}: {info['kind']})")
    click.echo(f"parameters   {info['parameters']:,}" if info["parameters"] is not None else "parameters   unknown")
    click.echo(f"tokenizer    {info['tokenizer']['adapter']} ({cfg['vocab_size']} tokens), special ids {info['special_ids']}")
    click.echo("config       " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items())))
    for kind in ("inputs", "outputs"):
        for io in info[kind]:
            click.echo(f"{kind[:-1]:<12} {io['name']:<10} {io['type']:<15} {io['shape']}")
    for key, value in sorted(info["provenance"].items()):
        click.echo(f"provenance   {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if info["decoding"]:
        options = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(info["decoding"]["options"].items()))
        if "drafts" in info["decoding"]:
            options = f"{options} drafts={info['decoding']['drafts']}".strip()
        click.echo(f"decoding     {info['decoding']['selector']} {options}".rstrip()
                   + "  (recommended: what a run that names no --selector gets)")


class PluginGroup(click.Group):
    """The ``imadarem`` group: its own commands plus those plugins add through ``imadarem_commands``
    (the development side's ``train``, ``export``, ``bench``, ``eval`` and ``data`` among them), looked up
    only when the group is listed or a name is not its own."""

    def _plugin_commands(self) -> dict[str, click.Command]:
        from imadarem.runtime.registry import commands

        return {c.name: c for c in commands() if c.name not in self.commands}

    def list_commands(self, ctx):
        return sorted(set(self.commands) | set(self._plugin_commands()))

    def get_command(self, ctx, name):
        return self.commands.get(name) or self._plugin_commands().get(name)


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imadarem")
def cli():
    """Imadarem: train, export and run iterative-refinement sequence generators."""


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_command(as_json):
    """List the bundled models: name, format, size and measured quality (pass a name as MODEL)."""
    from imadarem.runtime.models import bundled, bundled_path

    rows = []
    for name, entry in sorted(bundled().items()):
        path = bundled_path(name)
        rows.append({"name": name, "file": str(path), "bytes": path.stat().st_size, **entry})
    if not rows:
        click.echo("this installation has no bundled model", err=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        q = row.get("quality", {})
        measured = ", ".join(f"{k} {v}" for k, v in q.items())
        click.echo(f"{row['name']:<10} {row.get('format', '?'):<7} {row['bytes'] / 1e6:5.1f} MB  {row['summary']}")
        if measured:
            click.echo(f"{'':<10} measured: {measured}")


cli.add_command(run_command)
cli.add_command(plugins_command)
cli.add_command(inspect_command)
cli.add_command(models_command)


def main(args: list[str] | None = None) -> None:
    invoke(cli, "imadarem", args)


def run_main(args: list[str] | None = None) -> None:
    invoke(run_command, "imadarem-run", args)


if __name__ == "__main__":  # pragma: no cover
    main()
