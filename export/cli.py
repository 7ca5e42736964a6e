"""``imadarem export`` (checkpoint -> model file, checked against PyTorch before it is reported done) and
``imadarem bench``. They join the ``imadarem`` group through the ``imadarem_commands`` hook and import
torch and onnx only inside their bodies."""

from __future__ import annotations

import json
from pathlib import Path

import click
from imadarem.runtime.errors import ImadaremError
from imadarem.runtime.hookspecs import hookimpl
from imadarem.training.cli import require_torch


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
    require_torch("imadarem export")
    from imadarem.export.onnx_export import export_checkpoint
    from imadarem.export.parity import parity_report

    if quantize and fp16:
        raise ImadaremError("choose --quantize int8 or --fp16, not both")
    variant = "int8" if quantize else "fp16" if fp16 else "fp32"
    path = export_checkpoint(checkpoint, output, weights=weights, variant=variant, device_state=device_state,
                             sampling=sampling)
    summary = {"output": str(path), "variant": variant, "weights": weights, "bytes": path.stat().st_size}
    if check:
        summary.update(parity_report(checkpoint, path, weights=weights))
    click.echo(json.dumps(summary))


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
              help="Comma-separated. A refinement model (format 1): ort-fp32, ort-int8, ort-fp16, ort-fp32-head, "
                   "ort-fp16-head (files with the sampling head), torch, torch-bf16, xt-nar, xt-ar-kv. A causal model "
                   "(the bundled one): FAMILY-PRECISION with FAMILY ort-loop, ort-l2r, ort-decode, ort-decode-l2r, "
                   "torch-decode, torch-decode-l2r and PRECISION int8, int4, fp32 (cpu), fp16, fp32 (cuda); "
                   "ort-decode*-fp16-nograph: without CUDA graphs.")
@click.option("--samples", default=0, show_default=True, type=click.IntRange(min=0),
              help="Causal models: write this many molecules per engine as SMILES (OUT_DIR/samples) and score them "
                   "(FCD/Test) when the eval and fcd extras are installed.")
@click.option("--steps", type=click.IntRange(min=1), help="Refinement steps [default: the model's K].")
@click.option("--selector", default="gate", show_default=True, help="gate or entropy (the PyTorch loop has both).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for onnxruntime and torch [default: all].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--agreement-n", default=256, show_default=True, type=click.IntRange(min=0),
              help="Sequences decoded greedily to compare int8/fp16 tokens with fp32.")
@click.option("-o", "--out-dir", default="bench-results", show_default=True, type=click.Path(file_okay=False))
def bench_command(model, checkpoint, batch_sizes, providers, engines, samples, steps, selector, repeats, threads,
                  seed, agreement_n, out_dir):
    """Time the runtime against the real alternatives, side by side. A refinement model: its loop against
    PyTorch eager, x-transformers and a KV-cache AR decoder. A causal model (the bundled one): the
    refinement loop (draft-and-verify) against the same model's left-to-right decoder, on onnxruntime
    (host loop and decode graphs, CUDA graphs on a GPU) and in PyTorch eager.

    Writes OUT_DIR/bench.json and OUT_DIR/bench.md.
    """
    require_torch("imadarem bench")
    from imadarem.export.bench.runner import Bench, BenchArgs

    engines = None if engines == ("all",) else engines
    if model and checkpoint:
        raise ImadaremError("give --model or --checkpoint, not both")
    args = BenchArgs(model=model, checkpoint=checkpoint, batch_sizes=batch_sizes, providers=providers,
                     engines=engines, steps=steps, selector=selector, repeats=repeats, threads=threads, seed=seed,
                     agreement_n=agreement_n, out_dir=out_dir, samples=samples)
    bench = Bench(args)
    bench.run(progress=lambda msg: click.echo(f"bench: {msg}", err=True))
    click.echo((Path(out_dir) / "bench.md").read_text())


@click.command("export-causal")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--vocab", type=click.Path(dir_okay=False),
              help="The token list (JSON) the weights were trained with (SOURCE = research weights).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write (.onnx).")
@click.option("--decode", is_flag=True,
              help="Write a decode file: the gate selector's whole draft-and-verify step in one graph, fixed shapes "
                   "but the batch (CUDA graphs on a GPU), run by `imadarem-run` like any model file.")
@click.option("--drafts", type=click.IntRange(min=0),
              help="Draft heads to keep [default: all]; 0 gives the plain left-to-right model of the same weights.")
@click.option("--quantize", type=click.Choice(["int8", "int4"]),
              help="int8: dynamic quantisation (CPUs; 4x smaller); int4: weight-only MatMulNBits (5.5x smaller).")
@click.option("--fp16", is_flag=True, help="float16 weights, caches and compute, sampling in float32 (GPUs; decode files).")
@click.option("--max-seq-len", default=56, show_default=True, type=click.IntRange(min=1))
@click.option("--hidden-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--layers", default=6, show_default=True, type=click.IntRange(min=1))
@click.option("--heads", default=8, show_default=True, type=click.IntRange(min=1))
def export_causal_command(source, vocab, output, decode, drafts, quantize, fp16, max_seq_len, hidden_size, layers,
                          heads):
    """Export a causal model (a left-to-right transformer, with draft heads or without) as a format-2 model file.

    SOURCE is the research weights a training/recipes/quality run saved (--save; give --vocab and the shape
    options), or a format-2 step file such as the bundled model (an int8 one is dequantised). The default
    output is one step with a KV cache, decoded by `imadarem-run` through the refinement loop, where every
    draft is verified; --decode writes the decode file instead.
    """
    require_torch("imadarem export-causal")
    import hashlib
    import tempfile

    from imadarem.export.causal_export import causal_parity, export_causal
    from imadarem.export.decode_export import export_decode
    from imadarem.export.onnx_export import _quiet_exporters, check_writable, quantize_int4, quantize_int8

    if quantize and fp16:
        raise ImadaremError("choose --quantize or --fp16, not both")
    if fp16 and not decode:
        raise ImadaremError("--fp16 writes decode files (GPUs): add --decode")
    if quantize == "int4" and decode:
        raise ImadaremError("--decode files are fp32, int8 or fp16 (int4 measured slower: BENCH-NOTES.md)")
    check_writable(output)
    if source.endswith(".onnx"):
        from imadarem.export.onnx_import import causal_from_onnx

        model, report = causal_from_onnx(source)
        provenance = {"rebuilt_from": Path(source).name, "source_sha256": _sha256(source),
                      "dequantized": report.quantized}
    else:
        from imadarem.training.causal import load_research_checkpoint

        if not vocab:
            raise ImadaremError("research weights need --vocab (the token list they were trained with)")
        model = load_research_checkpoint(source, vocab, max_seq_len, hidden_size, layers, heads)
        provenance = {"weights": Path(source).name, "weights_sha256": _sha256(source),
                      "vocab_sha256": hashlib.sha256(Path(vocab).read_bytes()).hexdigest()}
    if drafts is not None and drafts > model.config.num_drafts:
        raise ImadaremError(f"--drafts {drafts}: the model has {model.config.num_drafts} draft heads")
    variant = quantize or ("fp16" if fp16 else "fp32")
    provenance["variant"] = variant
    if decode:
        export_decode(model, output, drafts, variant, provenance)
        summary = {"output": str(output), "graph": "decode", "variant": variant,
                   "drafts": model.config.num_drafts if drafts is None else drafts, "bytes": Path(output).stat().st_size}
        click.echo(json.dumps(summary))
        return
    if drafts is not None:
        model = model.without_drafts(drafts)
    if quantize:
        with tempfile.TemporaryDirectory() as tmp, _quiet_exporters():
            fp32 = export_causal(model, Path(tmp) / "fp32.onnx", provenance)
            (quantize_int8 if quantize == "int8" else quantize_int4)(fp32, Path(output))
    else:
        export_causal(model, output, provenance)
    summary = {"output": str(output), "variant": variant, "drafts": model.config.num_drafts,
               "bytes": Path(output).stat().st_size, **causal_parity(model, output)}
    click.echo(json.dumps(summary))


def _sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@hookimpl
def imadarem_commands():
    return [export_command, export_causal_command, bench_command]
