"""Imadarem's built-in plugins: selectors and tokenizer adapters.

They are registered through this distribution's own ``imadarem`` entry points (see pyproject.toml),
exactly the way a third-party package registers its plugins.
"""
