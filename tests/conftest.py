import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    skip = pytest.mark.skip(reason="needs onnxruntime-gpu and a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture
def python_exe():
    return sys.executable


MOSES_SAMPLE = FIXTURES / "moses_test_sample.csv"  # 400 molecules of the MOSES test split (MIT)


def tiny_args(out_dir, data=MOSES_SAMPLE, steps=120, **model):
    from imadarem.training.trainer import TrainArgs

    cfg = dict(hidden_size=32, num_layers=2, num_heads=2, max_seq_len=64, dropout=0.0, use_critic=True,
               ema_decay=0.9)
    cfg.update(model)
    return TrainArgs(family="refine", data=str(data), out_dir=str(out_dir), steps=steps, batch_size=32, lr=3e-3,
                     warmup_steps=10,
                     val_fraction=0.1, eval_interval=10_000, checkpoint_interval=10_000, log_interval=1,
                     progress=False, cache_dir=str(Path(out_dir).parent / "cache"), model=cfg)


def tiny_selfies_refine(**config):
    """A one-off ImplicitRefinementModel over eight SELFIES symbols (16 positions, seed 0, eval mode);
    ``config`` sets its ImplicitRefinementConfig fields beside the small sizes."""
    import torch
    from imadarem.plugins.tokenizers.selfies import SelfiesTokenizer
    from imadarem.training.config import ImplicitRefinementConfig
    from imadarem.training.model import ImplicitRefinementModel

    tok = SelfiesTokenizer(["[C]", "[N]", "[O]", "[=C]", "[=O]", "[Branch1]", "[Ring1]", "[F]"])
    sizes = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_seq_len": 16, "block_size": 4,
             "max_refinement_steps": 16}
    cfg = ImplicitRefinementConfig(vocab_size=tok.vocab_size, **{**sizes, **config})
    torch.manual_seed(0)
    return ImplicitRefinementModel(cfg, tok).eval()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny Imadarem V model (with critic) trained for a few seconds on MOSES molecules."""
    from imadarem.training.trainer import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    train(tiny_args(out))
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run):
    from imadarem.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_run, tiny_run.parent / "tiny.onnx")


def rewrite_metadata(src, dst, change):
    """Copy the model file ``src`` to ``dst`` with ``change(meta)`` applied to its metadata_props."""
    import onnx

    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    change(meta)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(dst))
    return dst


def tiny_block_file(tmp, steps: int, **model):
    """The tiny-refine preset (a block model) trained ``steps`` steps on the MOSES sample, hidden 32, 40
    positions, ``model`` overriding its config fields, and exported: (run directory, model file)."""
    from imadarem.export.onnx_export import export_checkpoint
    from imadarem.training.args import TrainArgs
    from imadarem.training.presets import PRESETS
    from imadarem.training.trainer import train

    preset = PRESETS["tiny-refine"]
    args = TrainArgs(**{**preset["args"], "steps": steps, "eval_interval": steps, "checkpoint_interval": steps},
                     data=str(MOSES_SAMPLE), out_dir=str(tmp / "run"), cache_dir=str(tmp / "c"), progress=False,
                     model={**preset["model"], "hidden_size": 32, "max_seq_len": 40, **model})
    train(args)
    return tmp / "run", export_checkpoint(tmp / "run", tmp / "m.onnx")
