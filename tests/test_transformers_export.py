"""`imadarem export --to transformers`: a causal model's trunk as a Hugging Face GPT-2 folder (issue #26)."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # importing transformers and three CLI subprocesses: CI's slow pass runs them


def test_the_gpt2_folder_gives_our_logits(tmp_path):
    from imadarem.export.transformers_export import save_transformers
    from imadarem.plugins.tokenizers.selfies import SelfiesTokenizer
    from imadarem.runtime.formats.causal import CausalConfig
    from imadarem.training.causal import CausalLM
    from transformers import GPT2LMHeadModel

    tok = SelfiesTokenizer(["[C]", "[N]", "[O]", "[=C]", "[=O]", "[Branch1]", "[Ring1]", "[F]"])
    torch.manual_seed(0)
    model = CausalLM(CausalConfig(vocab_size=tok.vocab_size, max_seq_len=20, hidden_size=32, num_layers=2,
                                  num_heads=4, num_drafts=2), tok).eval()
    with torch.no_grad():  # LayerNorms and biases away from their init, so a swapped name would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    summary = save_transformers(model, tmp_path / "hf")
    assert summary["max_abs_diff_logits"] < 1e-4, summary
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, tok.vocab_size, (3, 21))
    tokens[:, 0] = model.special.mask  # our BOS
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model.teacher_forcing(tokens)[0], atol=1e-4)
    vocab = json.loads((tmp_path / "hf" / "imadarem_vocab.json").read_text())
    assert vocab["bos_id"] == model.special.mask and vocab["tokens"][model.special.eos] == "[EOS]"
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "[C][=C][O][Branch1][C][F]"
    assert fast(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert fast.decode(tok.encode(text)) == text
    assert fast.bos_token_id == model.special.mask and fast.eos_token_id == model.special.eos
    with pytest.raises(Exception, match="not an empty folder"):
        save_transformers(model, tmp_path / "hf")  # never written over


def test_the_cli_refuses_a_refine_model_and_onnx_options_in_one_line(tmp_path):
    from conftest import FIXTURES

    PINNED = FIXTURES / "pinned"
    cli = [sys.executable, "-c", "from imadarem.runtime.cli import main; main()", "export"]
    refine = PINNED / "refine.onnx"
    r = subprocess.run(cli + [str(refine), "--to", "transformers", "-o", str(tmp_path / "x")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "exports a causal model" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    causal = PINNED / "causal.onnx"
    r = subprocess.run(cli + [str(causal), "--to", "transformers", "--dtype", "int8", "-o", str(tmp_path / "y")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "takes no --dtype" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
