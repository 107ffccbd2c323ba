import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow reads this once, at import. On x86 CPUs without AVX-512 it leaves its oneDNN
# kernels off, and cnn2 then trains 1.4x (two-pass step) to 2x (data-parallel step)
# slower on a core (benchmarks/onednn_throughput.py). Set it to 0 to keep the Eigen
# kernels; each run records which it had (sessions.json).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from train.launch import quiet_tensorflow_start  # noqa: E402

quiet_tensorflow_start()

from train.run import main  # noqa: E402

sys.exit(main())
