"""The farm's version, defined in the engine so that the engine needs nothing from outside it
(``farm.__version__`` re-exports it)."""

__version__ = "0.1.0"
