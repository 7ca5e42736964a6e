"""Imadarem's export side: a trained PyTorch model -> one self-describing ONNX refinement step.

``export_checkpoint`` is what ``imadarem export`` runs; ``export_model`` exports an in-memory model;
``quantize_int8``, ``convert_fp16`` and ``add_sampling_head`` make the file's variants; ``parity_report``
checks a file against its checkpoint and ``model_from_onnx`` rebuilds the PyTorch model from a file.
The development tools that compare a file with its PyTorch origin live here too (``bench``). Names are
imported on first use (torch and onnx come with them). docs/ARCHITECTURE.md has the contract.
"""

from imadarem.runtime.lazy import lazy_getattr

_LAZY = {
    "export_causal": "imadarem.export.causal_export",
    "causal_parity": "imadarem.export.causal_export",
    "export_checkpoint": "imadarem.export.onnx_export",
    "export_model": "imadarem.export.onnx_export",
    "quantize_int8": "imadarem.export.onnx_export",
    "convert_fp16": "imadarem.export.onnx_export",
    "add_sampling_head": "imadarem.export.onnx_export",
    "model_from_onnx": "imadarem.export.onnx_import",
    "parity_report": "imadarem.export.parity",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
