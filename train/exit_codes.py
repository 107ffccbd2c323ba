"""Exit codes of ``python -m train``, shared with the sweep launchers.

Under horovodrun the launcher's own code is 1 whenever a worker exits non-zero;
``srun`` and plain python pass these through.
"""

EXIT_OK = 0
EXIT_CONFIG = 2        # bad configuration or input, found before training
EXIT_DIVERGED = 3      # the loss became NaN/inf; nothing was checkpointed from that state
EXIT_SAVE_FAILED = 74  # a checkpoint or a result file could not be written (a full disk): the last good
#                        checkpoint is untouched; free space and re-run to resume (74 is sysexits' EX_IOERR)
EXIT_INTERRUPTED = 75  # stopped by SIGTERM/SIGUSR1/SIGINT after a checkpoint: re-run to resume
