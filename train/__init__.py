"""The training entry point: ``python -m train`` (under horovodrun, srun, or alone)."""
