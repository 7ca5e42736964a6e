"""``imadarem bench``: the runtime's engines timed side by side with the alternatives a user would pick.

Its own part (neither export nor training): it takes a model file (or a training run), builds the
variants it needs with the exporter, rebuilds the PyTorch model from the file, and times every engine on
the same weights through the runtime's one Generator, PyTorch strategies included. ``runner.py`` benches
a refinement model (format 1), ``causal.py`` a causal model (the bundled one), ``baselines.py`` holds the
x-transformers baselines, ``cli.py`` the command.
"""
