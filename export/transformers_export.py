"""A causal model's trunk in Hugging Face Transformers' GPT-2 layout (``imadarem export --to transformers``).

Why: so a user can take a model trained here into the Transformers ecosystem (generation utilities,
CTranslate2's converter, serving engines) and so peers can be benchmarked on the same weights (issue #26).
``CausalLM`` is GPT-2's architecture (learned positions, pre-LayerNorm blocks with a fused QKV projection, a
4x MLP with exact GELU, a final LayerNorm, the output tied to the token embedding), so the mapping is exact;
GPT-2's ``Conv1D`` stores its weights transposed. The draft heads are not part of GPT-2 and are left out: the
folder decodes one token per call. Token ids are ours: the folder's tokenizer (``AutoTokenizer``) gives them,
its BOS being our mask id, and ``imadarem_vocab.json`` names them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from imadarem.runtime.errors import ImadaremError


def gpt2_config(model) -> Any:
    from transformers import GPT2Config

    cfg, sp = model.config, model.special
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len + 1, n_embd=cfg.hidden_size,
                      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=4 * cfg.hidden_size,
                      activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=sp.mask,
                      eos_token_id=sp.eos, pad_token_id=sp.pad)


def gpt2_state_dict(model) -> dict[str, torch.Tensor]:
    """CausalLM's weights under GPT-2's names (``Conv1D`` weights are [in, out]: ours transposed)."""
    sd = {"transformer.wte.weight": model.tok.weight, "transformer.wpe.weight": model.pos.weight,
          "transformer.ln_f.weight": model.ln.weight, "transformer.ln_f.bias": model.ln.bias}
    for i, blk in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": blk.ln1.weight, p + "ln_1.bias": blk.ln1.bias,
                   p + "ln_2.weight": blk.ln2.weight, p + "ln_2.bias": blk.ln2.bias,
                   p + "attn.c_attn.weight": blk.qkv.weight.t(), p + "attn.c_attn.bias": blk.qkv.bias,
                   p + "attn.c_proj.weight": blk.proj.weight.t(), p + "attn.c_proj.bias": blk.proj.bias,
                   p + "mlp.c_fc.weight": blk.mlp[0].weight.t(), p + "mlp.c_fc.bias": blk.mlp[0].bias,
                   p + "mlp.c_proj.weight": blk.mlp[2].weight.t(), p + "mlp.c_proj.bias": blk.mlp[2].bias})
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


def to_gpt2(model):
    """A ``GPT2LMHeadModel`` with the trunk of ``model`` (a CausalLM), in eval mode."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise ImadaremError("--to transformers needs transformers: pip install 'imadarem[hf]'") from None
    hf = GPT2LMHeadModel(gpt2_config(model))
    missing, unexpected = hf.load_state_dict(gpt2_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and k != "lm_head.weight"]  # buffers; tied
    if missing or unexpected:
        raise ImadaremError(f"GPT-2 mapping incomplete: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def hf_tokenizer(tok, special):
    """Our tokenizer as a ``PreTrainedTokenizerFast`` with the same ids, or None where we cannot say it:
    an ``hf`` adapter is its own tokenizer.json; ``selfies`` and ``char`` vocabularies become a WordLevel
    model that splits on SELFIES brackets or on characters and joins tokens back without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {"bos_token": tok.id_to_token(special.mask), "eos_token": tok.id_to_token(special.eos),
             "pad_token": tok.id_to_token(special.pad)}
    if getattr(tok, "unk_token_id", None) is not None:  # named, so consumers (CTranslate2's converter) find it
        names["unk_token"] = tok.id_to_token(tok.unk_token_id)
    if tok.name == "hf":
        backend = Tokenizer.from_str(tok.to_spec()["tokenizer_json"])
    elif tok.name in ("selfies", "char") and hasattr(tok, "tokens"):
        pattern = r"\[[^\]]*\]" if tok.name == "selfies" else r"."
        backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tok.tokens)}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens([t for t in tok.SPECIALS if t in tok.tokens])
    else:
        return None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **names)


def save_transformers(model, out_dir: str | Path) -> dict[str, Any]:
    """Write the folder (``config.json``, ``model.safetensors``, ``imadarem_vocab.json``) and return a
    summary with the largest logits difference from ``model`` on a random batch."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImadaremError(f"{out} exists and is not an empty folder: choose a new one")
    hf = to_gpt2(model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (4, model.config.max_seq_len + 1), generator=gen)
    with torch.no_grad():
        ours = model.eval().teacher_forcing(tokens)[0]
        theirs = hf(tokens).logits
    diff = float((ours - theirs).abs().max())
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    tok, sp = model.tokenizer, model.special
    vocab = {"tokens": [tok.id_to_token(i) for i in range(model.config.vocab_size)] if tok is not None else None,
             "bos_id": sp.mask, "eos_id": sp.eos, "pad_id": sp.pad, "tokenizer": getattr(tok, "name", None),
             "note": "Imadarem's token ids; start every sequence with bos_id (Imadarem's mask id), stop at eos_id. "
                     "Trunk only: the draft heads are not exported."}
    (out / "imadarem_vocab.json").write_text(json.dumps(vocab, indent=1))
    fast = hf_tokenizer(tok, sp) if tok is not None else None
    if fast is not None:  # AutoTokenizer.from_pretrained(out) then gives our ids
        fast.save_pretrained(out)
    return {"output": str(out), "to": "transformers", "architecture": "GPT2LMHeadModel", "max_abs_diff_logits": diff,
            "tokenizer": fast is not None}
