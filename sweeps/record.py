"""Called by the SLURM array script: ``python -m sweeps.record POINT_DIR JOB running|exited [RC]``."""

import sys

from sweeps import state


def main(argv):
    point_dir, job, what = argv[:3]
    if what == "running":
        state.record(point_dir, state="running", launcher="slurm", slurm_job=job)
    else:
        state.record(point_dir, state="exited", launcher="slurm", slurm_job=job, returncode=int(argv[3]))


if __name__ == "__main__":
    main(sys.argv[1:])
