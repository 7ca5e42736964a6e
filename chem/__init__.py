"""Chemistry helpers that need RDKit (an optional dependency): fragment prompts and their checks."""
