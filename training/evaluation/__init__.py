"""Evaluation of generated molecules (development side: RDKit, and the ``fcd`` package for FCD/Test).

``imadarem eval molecules`` runs a model file through the runtime and scores what comes out with
MOSES's metrics (``molecules.py``).
"""
