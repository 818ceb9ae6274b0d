"""Batch runs of the notebook suite: the runner (:mod:`papermill_runs.runner`, started as ``papermill_runs/run.py``),
its parameter files (``params/``) and the stand-alone scripts beside it."""
