import os
import sys

from train.launch import ONEDNN_DEFAULT, quiet_tensorflow_start

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Before TensorFlow's import, which reads it (train/launch.py says why).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", ONEDNN_DEFAULT)

quiet_tensorflow_start()

from train.run import main  # noqa: E402

sys.exit(main())
