"""Benchmarks, experiments and the GPU check. Each script runs from the repository root as a module,
`python -m bench.NAME` (for example `python -m bench.overfit --preset heldout-quick`), so it imports the
project's modules as they are, with nothing added to sys.path."""
