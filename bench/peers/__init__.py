"""The peers of the benchmarks (xLearn, TorchRec, plain PyTorch, myFM): README.md here.

prepare.py and procmem.py run in ravfm's venv; the runners (*_fm.py, myfm_runner.py) run as
scripts in .peers-venv and import only their sibling modules (peer_io, fm_torch).
"""
