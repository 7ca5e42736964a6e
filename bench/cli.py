"""``imadarem bench``: joins the ``imadarem`` group through the ``imadarem_commands`` hook (this module is an
entry point, as a plugin's would be) and imports torch only inside its body."""

from __future__ import annotations

from pathlib import Path

import click
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.hookspecs import hookimpl
from imadarem.training.cli import require_torch


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(","))
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
              help="Comma-separated. A refinement model (format 1): ort-fp32, ort-int8, ort-fp16, ort-fp32-head, "
                   "ort-fp16-head (files with the sampling head), torch, torch-bf16, xt-nar, xt-ar-kv. A block refine "
                   "model (the bundled refine): l2r, recommended, a selector's name, SELECTOR+dN (N drafts). A causal model "
                   "(the bundled one): FAMILY-PRECISION with FAMILY ort-loop, ort-l2r, ort-decode, ort-decode-l2r, ort-gqa-l2r "
                   "(the one-token decode file with GroupQueryAttention: int8, fp32 on cpu), "
                   "torch-decode, torch-decode-l2r (PyTorch eager), torch-compile, torch-compile-l2r (the same step "
                   "under torch.compile, --torch-compile-mode), ctranslate2 (CTranslate2's own decoder of the trunk: int8, "
                   "fp32 on cpu; needs ctranslate2) and PRECISION int8, int4, fp32 (cpu), fp16, fp32 (cuda); "
                   "ort-decode*-fp16-nograph: without CUDA graphs.")
@click.option("--samples", default=0, show_default=True, type=click.IntRange(min=0),
              help="Causal models: write this many molecules per engine as SMILES (OUT_DIR/samples) and score them "
                   "(FCD/Test) when the eval and fcd extras are installed.")
@click.option("--steps", type=click.IntRange(min=1), help="Refinement steps [default: the model's K].")
@click.option("--selector", default="gate", show_default=True, help="gate or entropy (the PyTorch loop has both).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for onnxruntime and torch [default: all].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--agreement-n", default=256, show_default=True, type=click.IntRange(min=0),
              help="Sequences decoded greedily to compare int8/fp16 tokens with fp32.")
@click.option("--torch-compile-mode", default="default", show_default=True,
              type=click.Choice(["default", "reduce-overhead", "max-autotune"]),
              help="Causal models: torch.compile's mode for the torch-compile rows (inductor).")
@click.option("--reference", type=click.Path(dir_okay=False),
              help="Causal models: another model file or bundled model's name (e.g. the previous bundled model), "
                   "timed as it is beside the rows, same seeds and batch sizes.")
@click.option("-o", "--out-dir", default="bench-results", show_default=True, type=click.Path(file_okay=False))
def bench_command(model, checkpoint, batch_sizes, providers, engines, samples, steps, selector, repeats, threads,
                  seed, agreement_n, torch_compile_mode, reference, out_dir):
    """Time the runtime against the real alternatives, side by side. A refinement model: its loop against
    PyTorch eager, x-transformers and a KV-cache AR decoder. A causal model (the bundled one): the
    refinement loop (draft-and-verify) against the same model's left-to-right decoder, on onnxruntime
    (host loop and decode graphs, CUDA graphs on a GPU) and in PyTorch eager.

    Writes OUT_DIR/bench.json and OUT_DIR/bench.md.
    """
    require_torch("imadarem bench")
    from imadarem.bench.runner import Bench, BenchArgs
    from imadarem.runtime.files import check_output
    from imadarem.runtime.session import check_threads

    engines = None if engines == ("all",) else engines
    if model and checkpoint:
        raise ImadaremError("give --model or --checkpoint, not both")
    check_threads(threads)  # all before minutes of exports and timing
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ImadaremError(f"-o {out_dir} exists and is not a folder")
    for name in ("bench.json", "bench.md"):
        check_output(Path(out_dir) / name, "-o")
    args = BenchArgs(model=model, checkpoint=checkpoint, batch_sizes=batch_sizes, providers=providers,
                     engines=engines, steps=steps, selector=selector, repeats=repeats, threads=threads, seed=seed,
                     agreement_n=agreement_n, out_dir=out_dir, samples=samples, torch_compile_mode=torch_compile_mode,
                     reference=reference)
    bench = Bench(args)
    bench.run(progress=lambda msg: click.echo(f"bench: {msg}", err=True))
    click.echo((Path(out_dir) / "bench.md").read_text())



@hookimpl
def imadarem_commands():
    return [bench_command]
