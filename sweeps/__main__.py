import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from train.launch import quiet_tensorflow_start  # noqa: E402

quiet_tensorflow_start()

from sweeps.cli import main  # noqa: E402

sys.exit(main())
