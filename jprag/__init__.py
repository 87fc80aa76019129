"""jprag: parametric retrieval-augmented generation (PRAG, Poly-PRAG, DyPRAG) in JAX.

Importing the top-level package is cheap on purpose: it does not import JAX. Import the
sub-packages (``jprag.model``, ...) for the library itself.
"""

__version__ = "0.1.0"
