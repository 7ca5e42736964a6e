"""``imadarem export``: a training run, a checkpoint or a model file -> a model file, checked against PyTorch
before it is reported done. It joins the ``imadarem`` group through the ``imadarem_commands`` hook and
imports torch and onnx only inside its body."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import click
from imadarem.runtime.cli import parse_options
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.hookspecs import hookimpl
from imadarem.training.cli import require_torch


@click.command("export")
@click.argument("source", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Model file to write (.onnx); with --to transformers, a new folder.")
@click.option("--to", "target", type=click.Choice(["onnx", "transformers"]), default="onnx", show_default=True,
              help="onnx: an Imadarem model file; transformers: a causal model's trunk as a Hugging Face GPT-2 "
                   "folder (no draft heads; token ids in imadarem_vocab.json).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="fp32", show_default=True,
              help="fp32; int8 (CPUs; causal files static: the same molecule in any batch, refine files dynamic); fp16 (GPUs: refine files, causal --decode files); "
                   "int4 (causal step files: weight-only MatMulNBits).")
@click.option("--decode", is_flag=True,
              help="causal: a decode file, the gate's whole draft-and-verify step in one graph, fixed shapes but the "
                   "batch (CUDA graphs on a GPU).")
@click.option("--drafts", type=click.IntRange(min=0),
              help="causal: draft heads to keep [default: all]; 0 gives the plain left-to-right model of the same "
                   "weights.")
@click.option("--attention", type=click.Choice(["matmul", "gqa"]), default="matmul", show_default=True,
              help="--decode: how the graph attends. gqa: onnxruntime's GroupQueryAttention, writing the KV cache "
                   "itself (one-token files, --drafts 0, fp32 or int8: CPUs; 1.04-1.52x at batch 64 on 2 cores).")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True,
              help="Checkpoints: the EMA weights or the raw trained weights.")
@click.option("--device-state/--no-device-state", default=None,
              help="refine: add the cond_rows input so the CUDA loop keeps its state on the GPU [default: on for fp16].")
@click.option("--sampling/--no-sampling", default=None,
              help="refine: add the sampling head (proposals and uncertainty measures in the graph) [default: on for "
                   "fp16].")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare the file with the PyTorch model on random batches.")
@click.option("--selector", help="Record this selector as the file's recommended decoding: a request that names "
                                 "none runs with it (and the --selector-option values) [default: the format's].")
@click.option("--selector-option", "selector_options", multiple=True, callback=parse_options, metavar="KEY=VALUE",
              help="An option of --selector, repeatable (e.g. --selector-option threshold=0.9).")
@click.option("--recommend-drafts", type=click.IntRange(min=0), metavar="N",
              help="With --selector: also recommend draft-and-verify with N drafts a call (causal files; block refine "
                   "files, whose drafts are their own predictions).")
def export_command(source, output, target, dtype, decode, drafts, attention, weights, device_state, sampling, check,
                   selector, selector_options, recommend_drafts):
    """Export SOURCE (a run folder, one of its checkpoints, or a model file to rebuild, such as the bundled
    model) as one ONNX model file. Family, shapes and tokenizer come from SOURCE: a refine model becomes a
    refinement step, a causal model a causal step (or, with --decode, a decode file)."""
    require_torch("imadarem export")
    from imadarem.export.exporters import check_options, export_source, load_source
    from imadarem.export.onnx_export import check_writable

    if target == "transformers":
        src = load_source(source, weights)
        if src.family != "causal":
            raise ImadaremError(f"--to transformers exports a causal model; {source} is a {src.family} model")
        if decode or drafts is not None or dtype != "fp32" or device_state is not None or sampling is not None \
                or selector is not None or recommend_drafts is not None or attention != "matmul":
            raise ImadaremError("--to transformers writes the fp32 trunk: it takes no --dtype, --decode, --drafts, "
                                "--device-state, --sampling, --selector or --attention")
        from imadarem.export.transformers_export import save_transformers

        click.echo(json.dumps(save_transformers(src.model, output)))
        return
    if (selector_options or recommend_drafts is not None) and selector is None:
        raise ImadaremError("--selector-option and --recommend-drafts need --selector")
    if selector is not None:
        if decode:
            raise ImadaremError("--selector: a decode file runs its own draft-and-verify step; it has no selector")
        from imadarem.runtime.registry import create_selector

        create_selector(selector, **selector_options)  # a bad name or option fails before anything is written
    check_writable(output)
    src = load_source(source, weights)
    num_drafts = getattr(src.model.config, "num_drafts", None)
    check_options(src.family, dtype, decode, drafts, device_state is not None or sampling is not None, num_drafts,
                  attention)
    if selector is None:
        summary = export_source(src, output, dtype, decode, drafts, device_state, sampling, check, attention)
    else:
        with _restored_on_error(output):  # a file that cannot run the selector is removed: the old one comes back
            summary = export_source(src, output, dtype, decode, drafts, device_state, sampling, check, attention)
            from imadarem.export.exporters import stamp_decoding

            summary["decoding"] = stamp_decoding(output, selector, selector_options, recommend_drafts)
    click.echo(json.dumps(summary))


@contextlib.contextmanager
def _restored_on_error(path: str):
    """Keep a copy of the file at ``path`` (if any) until the block ends; if the block fails, put it back. An
    export checked after writing (``stamp_decoding``) then never costs the user the file it was to replace."""
    from imadarem.runtime.files import temporary_beside

    if not Path(path).is_file():
        yield
        return
    backup = temporary_beside(path, ".old")
    try:
        shutil.copy2(path, backup)
        try:
            yield
        except BaseException:
            os.replace(backup, path)
            raise
    finally:
        backup.unlink(missing_ok=True)


@hookimpl
def imadarem_commands():
    return [export_command]
