"""Sweeps over the global batch size: ``python -m sweeps run|status|report``."""
