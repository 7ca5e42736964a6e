"""Imadarem's training side (PyTorch): the Imadarem V model, its objective and the trainer.

Quick start::

    from imadarem.training import ImplicitRefinementConfig, ImplicitRefinementModel

    config = ImplicitRefinementConfig(vocab_size=32, hidden_size=128, num_layers=4, num_heads=4)
    model = ImplicitRefinementModel(config)            # or (config, tokenizer) to export it later
    logits, gate, cond_next = model(tokens, step, model.zero_cond(tokens))

and ``train(TrainArgs(data="names.txt", out_dir="runs/names"))`` trains one from a file. The names are
imported on first use, so ``imadarem.training.cli`` (loaded with every ``imadarem`` command) stays free
of torch. docs/ARCHITECTURE.md has the contract.
"""

from imadarem.runtime.lazy import lazy_getattr

_LAZY = {
    "ImplicitRefinementConfig": "imadarem.training.config",
    "ImplicitRefinementModel": "imadarem.training.model",
    "TrainArgs": "imadarem.training.args",
    "Trainer": "imadarem.training.trainer",
    "train": "imadarem.training.trainer",
    "torch_refine": "imadarem.training.reference",
    "torch_decode": "imadarem.training.reference",
    "TorchRefinement": "imadarem.training.reference",
    "TorchDecode": "imadarem.training.reference",
    "load_checkpoint": "imadarem.training.checkpoint",
    "build_model": "imadarem.training.checkpoint",
    # the causal family (a left-to-right model with draft heads; exported as model format 2)
    "CausalConfig": "imadarem.runtime.formats.causal",
    "CausalLM": "imadarem.training.causal",
    "get_family": "imadarem.training.families",
    "PRESETS": "imadarem.training.presets",
    # the tokenizer contract, shared with the runtime
    "TokenizerAdapter": "imadarem.runtime.tokenizer",
    "VocabularyTokenizer": "imadarem.runtime.tokenizer",
    "SpecialIds": "imadarem.runtime.tokenizer",
    "resolve_special_ids": "imadarem.runtime.tokenizer",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
