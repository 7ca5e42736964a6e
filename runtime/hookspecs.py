"""The plugin hooks of Imadarem (pluggy project and entry-point group: ``imadarem``).

A plugin is any importable object (usually a module) with functions marked ``@hookimpl``. It is found
through an entry point in the ``imadarem`` group, the same way for the built-ins and for third parties::

    [project.entry-points.imadarem]
    my_plugin = "my_package.my_module"
"""

import pluggy

PROJECT = "imadarem"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def imadarem_selectors():
    """Return a list of selector classes (subclasses of :class:`imadarem.runtime.Selector`).

    A selector decides, at each refinement step, which positions take their proposal and which go
    back to ``[MASK]``. Each class has a unique ``name``.
    """


@hookspec
def imadarem_tokenizers():
    """Return a list of tokenizer adapter classes (subclasses of :class:`imadarem.runtime.TokenizerAdapter`).

    An adapter turns text into ids and back, names its special ids, and round-trips through a JSON spec
    stored inside the model file. Each class has a unique ``name``.
    """


@hookspec
def imadarem_prompt_readers():
    """Return a list of prompt reader classes (subclasses of :class:`imadarem.runtime.prompt.PromptReader`).

    A reader takes prompts in its own syntax (e.g. SMILES fragments with attachment points), gives each
    sample its own layout (fixed ids, blanks, the ids a blank may hold) and checks finished samples against
    the prompt. A reader's module must import nothing heavy at import time (RDKit only inside its methods).
    """


@hookspec
def imadarem_sample_drawers():
    """Return a list of sample drawer classes (subclasses of :class:`imadarem.runtime.drawer.SampleDrawer`).

    A drawer writes a picture of finished samples (``imadarem-run --grid FILE``): e.g. molecules in a grid,
    a prompt's fragments highlighted. Like a reader, its module imports nothing heavy at import time.
    """


@hookspec
def imadarem_commands():
    """Return a list of click commands to add to the ``imadarem`` command group.

    This is how the development side (``imadarem train``, ``export``, ``bench``, ``eval``, ``data``)
    joins the command line without the runtime importing it: ``imadarem.training`` and
    ``imadarem.export`` register their commands through this package's entry points, as a third party
    would. A command module must import nothing heavy at import time (the registry loads it for every
    command, ``imadarem-run`` included); its command bodies import what they need.
    """
