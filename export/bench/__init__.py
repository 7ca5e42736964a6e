"""``imadarem bench``: the runtime loop timed side by side with PyTorch eager, x-transformers and a
KV-cache autoregressive decoder (development side: needs the ``train`` and ``bench`` extras).

It sits in ``export`` because it compares a model file with its PyTorch origin, as the export's parity
check does: it builds the file's fp32/int8/fp16 variants with the exporter and rebuilds the PyTorch model
from the file (``onnx_import``). ``runner.py`` holds the engines and the table, ``baselines.py`` the
x-transformers baselines.
"""
