"""``imadarem export``: checkpoint -> model file, checked against PyTorch before it is reported done."""

from __future__ import annotations

import json

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write (.onnx).")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True,
              help="EMA teacher weights or the raw trained weights.")
@click.option("--quantize", type=click.Choice(["int8"]), help="Dynamic int8 quantisation (edge CPUs).")
@click.option("--fp16", is_flag=True, help="float16 weights and compute, float32 I/O (GPUs).")
@click.option("--device-state/--no-device-state", default=None,
              help="Add the cond_rows input so the CUDA loop keeps its state on the GPU "
                   "[default: on for --fp16, off otherwise].")
@click.option("--sampling/--no-sampling", default=None,
              help="Add the sampling head (proposals, entropy, top-2, ... computed in the graph, so no "
                   "[batch, length, vocab] copy leaves the GPU) [default: on for --fp16, off otherwise].")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare the file with the PyTorch model on random batches.")
def export_command(checkpoint, output, weights, quantize, fp16, device_state, sampling, check):
    """Export CHECKPOINT (a run folder or one of its checkpoints) as one single-step ONNX model file."""
    from imadarem.export.onnx_export import export_checkpoint
    from imadarem.export.parity import parity_report
    from imadarem.runtime.errors import ImadaremError

    if quantize and fp16:
        raise ImadaremError("choose --quantize int8 or --fp16, not both")
    variant = "int8" if quantize else "fp16" if fp16 else "fp32"
    path = export_checkpoint(checkpoint, output, weights=weights, variant=variant, device_state=device_state,
                             sampling=sampling)
    summary = {"output": str(path), "variant": variant, "weights": weights, "bytes": path.stat().st_size}
    if check:
        summary.update(parity_report(checkpoint, path, weights=weights))
    click.echo(json.dumps(summary))
