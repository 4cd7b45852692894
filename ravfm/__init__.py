"""ravfm: distributed FM, Variational FM and Rank-Aware FM training on Ray.

Importing the package has no side effects; the submodules are imported where used.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
