"""Decode files: the gate selector's draft-and-verify step (or the left-to-right step) as one graph with the
state on the device. They give the host loop's and the left-to-right decoder's molecules, token for token,
on every engine: onnxruntime on the CPU, on CUDA with and without CUDA graphs, and PyTorch eager."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import rewrite_metadata
from imadarem.export.causal_export import export_causal
from imadarem.export.decode_export import export_decode
from imadarem.runtime import Generator, ImadaremError, ModelFileError
from imadarem.runtime.formats.decode import GPU_START_ROWS, KEY_START, _bucket
from imadarem.runtime.metadata import KEY_CONFIG
from imadarem.runtime.results import LoopTimings
from imadarem.training.reference import TorchDecode, torch_decode
from test_causal import tiny_model


class _Files(dict):
    """The model's files by name, each exported on first use (~5-12 s each on 2 cores): the int8 and fp16
    decode files serve CI's slow pass only, so the fast suite does not pay for them."""

    SPECS = {"dv": (None, "fp32", "mha"), "l2r": (0, "fp32", "mha"), "dv8": (None, "int8", "mha"),
             "dv16": (None, "fp16", "mha"), "gqa": (0, "fp32", "gqa")}

    def __init__(self, model, out):
        super().__init__()
        self.model, self.out = model, out

    def __missing__(self, name):
        if name == "step":
            self[name] = export_causal(self.model, self.out / "step.onnx")
        else:
            drafts, variant, attention = self.SPECS[name]
            extra = {"attention": "gqa"} if attention == "gqa" else {}
            self[name] = export_decode(self.model, self.out / f"{name}.onnx", drafts, variant, **extra)
        return self[name]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    model = tiny_model(drafts=2)
    with torch.no_grad():  # every parameter distinct, as in a trained model (the exporter merges equal constants)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, _Files(model, out)


def ids(samples):
    return [s.ids for s in samples]


def same(a, b):
    return float(np.mean([x == y for x, y in zip(ids(a), ids(b))]))


def test_decode_files_give_the_left_to_right_molecules(files):
    model, paths = files
    want = Generator(paths["step"]).generate(300, seed=7, batch_size=64, drafts=0)
    loop = Generator(paths["step"]).generate(300, seed=7, batch_size=64)
    dv = Generator(paths["dv"]).generate(300, seed=7, batch_size=64)
    l2r = Generator(paths["l2r"]).generate(300, seed=7, batch_size=64)
    gqa = Generator(paths["gqa"]).generate(300, seed=7, batch_size=64)
    assert same(dv, want) >= 0.99 and same(l2r, want) >= 0.99 and same(loop, want) >= 0.99
    assert same(gqa, l2r) == 1.0  # GroupQueryAttention: the same attention, fused
    calls = {name: np.mean([s.steps for s in s_]) for name, s_ in (("dv", dv), ("l2r", l2r), ("loop", loop))}
    # the same draft-and-verify, call for call, but for the BOS call, which a decode file starts after
    assert calls["dv"] == pytest.approx(calls["loop"] - 1, abs=0.05)
    assert calls["dv"] < 0.8 * calls["l2r"]
    assert calls["l2r"] == pytest.approx(np.mean([len(s.ids) for s in want]) - 1, abs=0.05)  # a token per call


@pytest.mark.slow  # the fp16 export (~7 s): CI's slow pass runs it (README command < 5 minutes)
def test_fp16_decode_files_get_the_gpu_fusions(files):
    """onnxruntime's transformer optimizer fuses every residual Add with its LayerNormalization in fp16 files
    (SkipLayerNormalization: fewer kernels and passes over the activations on a GPU). It needs its symbolic
    shape inference to succeed on the graph, which the cache writes' broadcast indices once broke for
    draft-and-verify files (dv16: 0 fusions of 13 in the bundled model; its one-token file fused all)."""
    import onnx

    model, paths = files
    ops = [node.op_type for node in onnx.load(str(paths["dv16"])).graph.node]
    assert "LayerNormalization" not in ops
    assert ops.count("SkipLayerNormalization") >= 2 * model.config.num_layers


@pytest.mark.parametrize("name", ["dv", "l2r", pytest.param("dv8", marks=pytest.mark.slow), "gqa"])
def test_caches_written_in_place_give_the_molecules_of_session_run(files, monkeypatch, name):
    """The CPU loop binds each KV cache as its own output (formats/decode.py: HostDecoding): the ScatterND
    nodes that write a call's slots then update the buffer instead of copying it; nothing else changes."""
    import onnx
    from imadarem.runtime.formats.decode import HostDecoding

    _, paths = files
    ops = [node.op_type for node in onnx.load(str(paths[name])).graph.node]
    # one ScatterND a cache, each index a head_dim vector (ScatterElements, an index per float, cost a quarter
    # of a CPU call at batch 64)
    if name == "gqa":  # GroupQueryAttention writes the caches itself: past and present are one buffer
        assert ops.count("GroupQueryAttention") == 2 and "ScatterND" not in ops
    else:
        assert ops.count("ScatterND") == 2 * 2 and "ScatterElements" not in ops
    gen = Generator(paths[name])
    bound = gen.generate(40, seed=5, batch_size=16)
    monkeypatch.setattr(HostDecoding, "in_place", False)
    plain = gen.generate(40, seed=5, batch_size=16)
    assert ids(bound) == ids(plain)
    assert [s.steps for s in bound] == [s.steps for s in plain]


def test_group_query_attention_is_for_one_token_cpu_files(files, tmp_path):
    """onnxruntime's CPU GroupQueryAttention takes one new token a row with a past, and CUDA's no float32: a
    file it could not run is refused when exported, in one line."""
    model, _ = files
    for drafts, variant in ((None, "fp32"), (2, "int8"), (0, "fp16")):
        with pytest.raises(ImadaremError, match="gqa"):
            export_decode(model, tmp_path / "x.onnx", drafts, variant, attention="gqa")
    with pytest.raises(ImadaremError, match="unknown attention"):
        export_decode(model, tmp_path / "x.onnx", 0, "fp32", attention="flash")
    assert not (tmp_path / "x.onnx").exists()


def test_seeds_batches_and_temperature(files):
    _, paths = files
    gen = Generator(paths["dv"])
    whole = ids(gen.generate(10, seed=3, batch_size=10))
    assert ids(gen.generate(10, seed=3, batch_size=3)) == whole
    assert ids(gen.generate(4, seed=3)) == whole[:4]
    greedy = ids(gen.generate(6, seed=1, temperature=0.0))
    assert greedy == ids(gen.generate(6, seed=2, temperature=0.0))  # argmax: the seed does not matter
    assert greedy == ids(Generator(paths["step"]).generate(6, seed=9, temperature=0.0, drafts=0))


def test_starting_from_bos_in_the_graph_gives_the_same_molecules_one_call_later(files):
    """What a GPU does for large batches: the graph runs BOS's call itself instead of the host drawing
    the first tokens from the file's start outputs."""
    _, paths = files
    for name in ("dv", "l2r"):
        host = Generator(paths[name])
        graph = Generator(paths[name])
        graph.model.graph_start_rows = 1
        want, got = host.generate(60, seed=2, batch_size=30), graph.generate(60, seed=2, batch_size=30)
        assert same(got, want) >= 0.99, name
        assert [s.steps for s in got] == [s.steps + 1 for s in want]


def run_counted(gen, in_flight: bool, n: int, batch: int, seed: int = 4):
    """The samples and the number of sequential model calls, batching in flight or whole batches."""
    gen.in_flight = in_flight
    timings = LoopTimings()
    return gen.generate(n, seed=seed, batch_size=batch, timings=timings), len(timings.step_seconds)


@pytest.mark.parametrize("name", ["dv", "l2r", "gqa"])
def test_in_flight_batching_gives_the_same_molecules_in_fewer_calls(files, name):
    """A row whose molecule ended takes the next requested one at once: the same molecules (each draws only
    from its own key) and calls per molecule, yielded in order, with far fewer calls than whole batches,
    each of which lasts as long as its longest molecule."""
    _, paths = files
    gen = Generator(paths[name])
    whole, whole_calls = run_counted(gen, False, 400, 25)
    flight, flight_calls = run_counted(gen, True, 400, 25)
    assert ids(flight) == ids(whole) and [s.steps for s in flight] == [s.steps for s in whole]
    assert flight_calls < 0.9 * whole_calls
    # the sequential calls of the run per batch of molecules: close to one molecule's calls (the tail is
    # the last molecules' wait for the longest of them)
    assert flight_calls * 25 / 400 <= 1.15 * np.mean([s.steps for s in flight])
    assert ids(gen.generate(7, seed=4, batch_size=25)) == ids(whole)[:7]  # fewer samples than rows: one batch


def device_start(self, size, streams):
    """DecodePlan.start as on CUDA, on the CPU: the bucket's two buffer sets bound alternately."""
    from imadarem.runtime.formats import decode

    bucket = self.batch if size == self.batch else _bucket(size)
    graphs = self.model.cuda_buckets.get((bucket, False))
    if graphs is None:
        graphs = self.model.cuda_buckets[(bucket, False)] = decode._CudaGraphs(self.model, bucket, None, False, "cpu")
    return graphs.decoding(streams.keys(), self.temperature)


@pytest.mark.parametrize("look_every", [0.0, 1 / 8, 1 / 2])
def test_the_device_loop_refills_rows_in_flight(files, monkeypatch, look_every):
    """The CUDA loop's in-flight batching (the state read back only every few calls, rows restarted in the
    bound buffers, padding rows idle), run on the CPU: the host loop's molecules, from host-drawn first
    tokens and from BOS in the graph (one call more each)."""
    from imadarem.runtime.formats import decode

    _, paths = files
    want = Generator(paths["dv"]).generate(150, seed=6, batch_size=20)
    monkeypatch.setattr(decode.DecodePlan, "start", device_start)
    monkeypatch.setattr(decode.CudaDecoding, "look_every", look_every)
    for from_bos in (False, True):
        gen = Generator(paths["dv"])
        if from_bos:
            gen.model.graph_start_rows = 1
        whole, whole_calls = run_counted(gen, False, 150, 20, seed=6)
        flight, flight_calls = run_counted(gen, True, 150, 20, seed=6)
        assert ids(whole) == ids(want) and ids(flight) == ids(want), from_bos
        assert [s.steps for s in flight] == [s.steps + from_bos for s in want]
        assert flight_calls < 0.9 * whole_calls


@pytest.mark.parametrize("in_place", [True, False])
def test_the_device_loop_binds_one_buffer_per_cache(files, monkeypatch, in_place):
    """The CUDA loop binds each cache as both input and output of both graphs (ScatterND then writes only the
    new slots); two buffers per cache (``in_place`` off) give the same molecules."""
    from imadarem.runtime.formats import decode

    _, paths = files
    want = Generator(paths["dv"]).generate(60, seed=3, batch_size=20)
    monkeypatch.setattr(decode.DecodePlan, "start", device_start)
    monkeypatch.setattr(decode._CudaGraphs, "in_place", in_place)
    gen = Generator(paths["dv"])
    assert ids(gen.generate(60, seed=3, batch_size=20)) == ids(want)
    (graphs,) = gen.model.cuda_buckets.values()
    a, b = graphs.buffers
    assert (a["cache_k0"] is b["cache_k0"]) == in_place and a["ids"] is not b["ids"]


@pytest.mark.slow  # the int8 and fp16 exports (~15 s): CI's slow pass runs it (README command < 5 minutes)
def test_int8_and_fp16_decode_files_sample_nearly_the_same_molecules(files):
    _, paths = files
    want = Generator(paths["dv"]).generate(200, seed=5)
    for name in ("dv8", "dv16"):
        got = Generator(paths[name]).generate(200, seed=5)
        assert same(got, want) >= 0.8, name  # rounding flips a near tie now and then; the rest follows


def test_the_pytorch_loop_is_the_same_decoder(files):
    model, paths = files
    want = Generator(paths["dv"]).generate(40, seed=2, decode=False)
    for drafts, ref in ((None, want), (0, Generator(paths["l2r"]).generate(40, seed=2, decode=False))):
        got, calls = torch_decode(model, 40, drafts, seed=2, batch_size=16)  # in flight, as on the GPU
        rows = [list(r[: len(s.ids)]) for r, s in zip(got, ref)]
        assert rows == ids(ref)
        assert list(calls) == [s.steps for s in ref]
    timed = {}
    for in_flight in (False, True):  # in flight, fewer calls
        timings = LoopTimings()
        gen = Generator(TorchDecode(model))
        gen.in_flight = in_flight
        timed[in_flight] = (ids(gen.generate(120, seed=2, batch_size=12, timings=timings)), len(timings.step_seconds))
    assert timed[True][0] == timed[False][0] and timed[True][1] < 0.9 * timed[False][1]


def test_generator_runs_a_decode_file_and_refuses_what_it_cannot_do(files):
    _, paths = files
    gen = Generator(paths["dv"])
    for kwargs, word in (({"selector": "maskgit"}, "--selector maskgit"), ({"steps": 3}, "--steps"),
                         ({"drafts": 1}, "--drafts 1"),
                         ({"prompt": "[C]<mask:3>"}, "--prompt"), ({"trajectory": True}, "--trajectory"),
                         ({"threshold": 0.3}, "selector options")):
        with pytest.raises(ImadaremError, match=word):
            gen.generate(2, **kwargs)
    timings = LoopTimings()
    gen.generate(8, seed=0, timings=timings, batch_size=8)
    assert timings.active_rows[0] <= 8 and min(timings.active_rows) < 8 and timings.total_seconds > 0


@pytest.mark.slow
def test_the_command_line_runs_inspects_and_exports_decode_files(files, tmp_path):
    _, paths = files
    cli = [sys.executable, "-c", "from imadarem.runtime.cli import main; import sys; main(sys.argv[1:])"]
    r = subprocess.run(cli + ["run", str(paths["dv"]), "-n", "3", "--seed", "0"], capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3, r.stderr
    r = subprocess.run(cli + ["run", str(paths["dv"]), "--prompt", "[C]"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "decode file" in r.stderr
    info = json.loads(subprocess.run(cli + ["inspect", str(paths["dv"]), "--json"], capture_output=True,
                                     text=True).stdout)
    assert info["config"]["graph"] == "decode" and info["config"]["cache_len"] == 12 + 1 + 2
    out = tmp_path / "from-step.onnx"
    r = subprocess.run(cli + ["export", str(paths["step"]), "--decode", "--drafts", "1", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["drafts"] == 1, r.stderr
    one = Generator(out).generate(50, seed=1)
    assert same(one, Generator(paths["step"]).generate(50, seed=1, drafts=0)) >= 0.98
    gqa = tmp_path / "gqa.onnx"
    r = subprocess.run(cli + ["export", str(paths["step"]), "--decode", "--drafts", "0", "--attention", "gqa", "-o",
                              str(gqa)], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["attention"] == "gqa", r.stderr
    assert same(Generator(gqa).generate(50, seed=1), Generator(paths["l2r"]).generate(50, seed=1)) == 1.0
    for args, message in ((["--dtype", "fp16"], "add --decode"), (["--decode", "--drafts", "5"], "has 2 draft heads"),
                          (["--decode", "--dtype", "int4"], "int8 or fp16"), (["--sampling"], "for refine models"),
                          (["--drafts", "3"], "has 2 draft heads"), (["--attention", "gqa"], "for --decode files"),
                          (["--decode", "--attention", "gqa"], "one-token CPU decode files")):
        r = subprocess.run(cli + ["export", str(paths["step"]), "-o", str(tmp_path / "x.onnx"), *args],
                           capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("change,message", [
    ({"cache_len": 20}, "cache_len 20 is not max_seq_len"),
    ({"num_drafts": 1}, "cache_len 15 is not max_seq_len"),
    ({"num_layers": 3}, "needs the inputs"),
])
def test_bad_decode_files_are_refused(files, tmp_path, change, message):
    def edit(meta):
        meta[KEY_CONFIG] = json.dumps(dict(json.loads(meta[KEY_CONFIG]), **change))

    path = rewrite_metadata(files[1]["dv"], tmp_path / "bad.onnx", edit)
    with pytest.raises(ModelFileError, match=message):
        Generator(path)


def test_a_decode_file_without_its_start_outputs_is_refused(files, tmp_path):
    def drop(meta):
        meta[KEY_START] = json.dumps({"logits": [0.0] * 3, "drafts": [], "kv": []})

    path = rewrite_metadata(files[1]["dv"], tmp_path / "bad.onnx", drop)
    with pytest.raises(ModelFileError, match="imadarem.decode_start"):
        Generator(path)


def test_buckets_are_powers_of_two():
    assert [_bucket(n) for n in (1, 2, 3, 5, 64, 65, 1000)] == [1, 2, 4, 8, 64, 128, 1024]


# -- CUDA (skipped without onnxruntime-gpu and a GPU) -------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dv", "l2r", "dv16"])
def test_cuda_graphs_give_the_cpu_molecules(files, name):
    _, paths = files
    want = Generator(paths[name]).generate(300, seed=4, batch_size=128)
    graphs = Generator(paths[name], provider="cuda")
    timings = LoopTimings()
    got = graphs.generate(300, seed=4, batch_size=128, timings=timings)  # in flight: one bucket of 128 rows
    assert same(got, want) >= 0.95, name
    assert sorted(graphs.model.cuda_buckets) == [(128, True)]
    again = graphs.generate(300, seed=4, batch_size=128)  # replays of the captured graphs
    assert ids(again) == ids(got)
    plain = Generator(paths[name], provider="cuda")
    plain.model.cuda_graphs, plain.in_flight = False, False
    plain = plain.generate(300, seed=4, batch_size=128)  # whole batches: 128, 128, then 44 in a bucket of 64
    assert same(plain, got) >= 0.99
    assert max(timings.active_rows) <= 128 and timings.outside_run_fraction() < 0.9  # (first-token EOS rows start done)


@pytest.mark.cuda
def test_cuda_caches_written_in_place_give_the_two_buffer_molecules(files, monkeypatch):
    """One buffer per cache bound as input and output (ScatterND skips its copy) against two buffers bound
    alternately: the same kernels on the same values, so the same molecules token for token, from the host's
    first tokens and from BOS on the GPU."""
    from imadarem.runtime.formats import decode

    _, paths = files
    for rows in (128, GPU_START_ROWS):
        got = {}
        for in_place in (True, False):
            monkeypatch.setattr(decode._CudaGraphs, "in_place", in_place)
            got[in_place] = Generator(paths["dv16"], provider="cuda").generate(2 * rows, seed=9, batch_size=rows)
        assert ids(got[True]) == ids(got[False]), rows


@pytest.mark.cuda
def test_large_cuda_batches_start_from_bos_on_the_gpu(files):
    _, paths = files
    for name in ("dv", "l2r"):
        want = Generator(paths[name]).generate(GPU_START_ROWS, seed=8, batch_size=GPU_START_ROWS)
        got = Generator(paths[name], provider="cuda").generate(GPU_START_ROWS, seed=8, batch_size=GPU_START_ROWS)
        assert same(got, want) >= 0.97, name  # the first token from the graph's own BOS call
        assert np.mean([s.steps for s in got]) == pytest.approx(np.mean([s.steps for s in want]) + 1, abs=0.05)
        # in flight: rows restarted from BOS in the bound buffers
        want = Generator(paths[name]).generate(3 * GPU_START_ROWS, seed=8, batch_size=GPU_START_ROWS)
        got = Generator(paths[name], provider="cuda").generate(3 * GPU_START_ROWS, seed=8, batch_size=GPU_START_ROWS)
        assert same(got, want) >= 0.97, name
        assert np.mean([s.steps for s in got]) == pytest.approx(np.mean([s.steps for s in want]) + 1, abs=0.05)


@pytest.mark.cuda
def test_cuda_generator_dispatches_to_the_decode_graphs(files):
    _, paths = files
    gen = Generator(paths["dv16"], provider="cuda")
    assert same(gen.generate(20, seed=1), Generator(paths["dv16"]).generate(20, seed=1)) >= 0.9
