"""Raw columns -> table rows: spec.py (the contract), hashing.py, transform.py, stats.py.

Import the submodules directly; this package imports nothing so `import ravfm` stays light.
"""

__all__: list[str] = []
