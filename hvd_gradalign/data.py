"""Datasets: the embedded Fashion-MNIST (a local tfds builder), any prepared tfds
dataset, and per-worker input pipelines."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from hvd_gradalign_base.settings import EMBEDDED_DATASET, EMBEDDED_TRAIN_SAMPLES  # noqa: F401

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not), the format of (Fashion-)MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def fashion_mnist_arrays(split: str, data_dir=None):
    """(images uint8 [N, 28, 28], labels int64 [N]) from the IDX files."""
    data_dir = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(FASHION_MNIST_FILES)}")
    images_file, labels_file = (data_dir / name for name in FASHION_MNIST_FILES[split])
    for f in (images_file, labels_file):
        if not f.exists():
            raise FileNotFoundError(
                f"{f} is missing. The embedded Fashion-MNIST comes from Debian's package "
                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist, or run "
                "scripts/setup.sh); or point FASHION_MNIST_DIR at a folder with the four IDX files."
            )
    return read_idx(images_file), read_idx(labels_file).astype(np.int64)


# ---------------------------------------------------------------------------
# tensorflow-datasets: the embedded Fashion-MNIST builder and any tfds dataset
# ---------------------------------------------------------------------------

DEFAULT_DATA_DIR = Path(os.environ.get(
    "HVD_GRADALIGN_DATA_DIR", Path.home() / ".cache" / "hvd_gradalign" / "tensorflow_datasets"))
# Datasets whose usual augmentation is a padded random crop and a horizontal flip.
CIFAR_FAMILY = ("cifar10", "cifar100", "svhn_cropped", "cinic10")


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST read from local IDX files (Debian's dataset-fashion-mnist).

    tfds' own fashion_mnist builder downloads and checks the original archives;
    Debian re-compresses them, so this builder reads the files it is given in
    ``manual_dir`` instead and never touches the network."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist), "
        "or any folder holding the four Fashion-MNIST IDX files."
    )

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao et al. 2017) from local IDX files.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(dl_manager.manual_dir, split)
                for split in FASHION_MNIST_FILES}

    def _generate_examples(self, manual_dir, split):
        images, labels = fashion_mnist_arrays(split, manual_dir)
        for i in range(len(labels)):
            yield i, {"image": images[i][..., None], "label": int(labels[i])}


@contextlib.contextmanager
def _absl_warnings_off():
    # tfds warns that a not yet prepared folder "has no dataset_info.json": true, and
    # about to be fixed.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _prepare_embedded(data_dir: Path):
    with _absl_warnings_off():
        return _prepare_embedded_once(data_dir)


def _prepare_embedded_once(data_dir: Path):
    """Prepare the embedded dataset once; concurrent workers wait on a file lock."""
    data_dir.mkdir(parents=True, exist_ok=True)
    builder = FashionMnistLocal(data_dir=str(data_dir))
    if builder.is_prepared():
        return builder
    fashion_mnist_arrays("test")  # a clear error if the files are missing
    with open(data_dir / ".fashion_mnist_local.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = FashionMnistLocal(data_dir=str(data_dir))
        if not builder.is_prepared():
            # tfds announces "Downloading and preparing dataset Unknown size": nothing
            # is downloaded here, so say what happens instead.
            print(f"hvd_gradalign: preparing the embedded Fashion-MNIST from {FASHION_MNIST_DIR} "
                  f"into {data_dir} (once)", file=sys.stderr, flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                tfds.disable_progress_bar()
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(manual_dir=str(FASHION_MNIST_DIR)))
    return builder


def get_builder(name: str, data_dir=None):
    """The tfds builder of ``name``, prepared; never downloads anything."""
    if name == EMBEDDED_DATASET:
        return _prepare_embedded(Path(data_dir) if data_dir else DEFAULT_DATA_DIR)
    try:
        tfds.builder_cls(name.split(":")[0].split("/")[0])
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown dataset {name!r}: no tensorflow-datasets builder has that name "
                         f"(the embedded default is {EMBEDDED_DATASET!r}).") from None
    if not data_dir:
        raise ValueError(
            f"dataset {name!r} needs data_dir: the folder where it was prepared with "
            f"tensorflow-datasets (`tfds build {name} --data_dir DIR` on a machine with "
            "internet access, then copy DIR here)."
        )
    try:
        builder = tfds.builder(name, data_dir=str(data_dir))
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(f"unknown dataset {name!r}: no tensorflow-datasets builder has that name "
                         f"(the embedded default is {EMBEDDED_DATASET!r}).") from err
    if not builder.is_prepared() and not _readable(builder):
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in {data_dir}. This machine reads data only "
            f"from local files: run `tfds build {name} --data_dir {data_dir}` where a network "
            f"is available (or put its files in the manual dir and build there) and copy the "
            f"folder here."
        )
    return builder


def _readable(builder) -> bool:
    # is_prepared() looks for files; a mocked builder (tfds.testing.mock_data) has
    # none but still reads, and that is what matters here.
    try:
        next(iter(builder.as_dataset(split="train[:1]")))
    except Exception:  # tfds raises AssertionError or a variety of IO errors
        return False
    return True


@dataclass
class DatasetInfo:
    name: str
    input_shape: tuple
    num_classes: int
    num_train: int
    num_test: int


def dataset_info(builder) -> DatasetInfo:
    info = builder.info
    image_key, label_key = info.supervised_keys
    return DatasetInfo(
        name=builder.name,
        input_shape=tuple(info.features[image_key].shape),
        num_classes=info.features[label_key].num_classes,
        num_train=_num_examples(builder, "train"),
        num_test=_num_examples(builder, "test"),
    )


def _num_examples(builder, split) -> int:
    try:
        return builder.info.splits[split].num_examples
    except KeyError:  # a mocked builder records no split sizes: count
        return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))


def _decode(image, label):
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int64)


def _augment_cifar(image, seed):
    """Pad by 4, random 32x32 crop, random horizontal flip; a stateless draw per
    (epoch seed, sample), so the draw is reproducible and fixed within a batch."""
    h, w = image.shape[0], image.shape[1]
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode="REFLECT")
    image = tf.image.stateless_random_crop(padded, [h, w, image.shape[2]], seed=seed)
    return tf.image.stateless_random_flip_left_right(image, seed=seed + [0, 1 << 40])


def _split_range(builder, split, start, stop):
    return builder.as_dataset(split=f"{split}[{start}:{stop}]", as_supervised=True, shuffle_files=False)


def shard(ds, count: int, rank: int, size: int):
    """Worker ``rank``'s share of a dataset of ``count`` elements: every worker gets
    count // size elements (disjoint; the remainder is dropped)."""
    per = count // size
    if per == 0:
        raise ValueError(f"{count} samples cannot be shared among {size} workers")
    return ds.shard(size, rank).take(per), per


def train_subset(builder, info, validation_samples=0, train_samples=0, subset_seed=-1):
    """(n, dataset) of the training samples a run uses: the train split less the
    ``validation_samples`` held out at its end; of those, ``train_samples`` (0 = all),
    the first ones, or with ``subset_seed >= 0`` a seeded uniform draw (kept in the
    split's order), so that a result can be checked on more than one subset."""
    available = info.num_train - validation_samples
    if available <= 0:
        raise ValueError(f"validation_samples={validation_samples} leaves no training data "
                         f"({info.name} has {info.num_train} training samples)")
    n = train_samples or available
    if n > available:
        raise ValueError(f"train_samples={train_samples} exceeds the {available} training samples "
                         f"available in {info.name} (after validation_samples={validation_samples})")
    if subset_seed < 0:
        return n, _split_range(builder, "train", 0, n)
    if not train_samples:
        raise ValueError("subset_seed draws train_samples samples at random; set train_samples")
    chosen = np.sort(np.random.default_rng(subset_seed).choice(available, n, replace=False))
    images, labels = next(iter(_split_range(builder, "train", 0, available).batch(available)))
    return n, tf.data.Dataset.from_tensor_slices((tf.gather(images, chosen), tf.gather(labels, chosen)))


@dataclass
class Pipelines:
    train_stream: object         # (start_epoch, skip_batches) -> endless stream of epochs
    steps_per_epoch: int
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    train_eval: tf.data.Dataset  # the training samples, unaugmented, for clean train metrics
    info: DatasetInfo
    train_samples: int           # over all workers, per epoch


def make_pipelines(name, data_dir, *, rank, size, global_batch, seed, train_samples=0,
                   validation_samples=0, test_samples=0, augment=False, subset_seed=-1,
                   eval_batch=1000) -> Pipelines:
    """Per-worker input pipelines. Train: per-epoch shuffles that differ across
    epochs and ranks and are reproducible from ``seed`` (so a resumed run sees the
    data an uninterrupted one would have seen), full batches only."""
    builder = get_builder(name, data_dir)
    info = dataset_info(builder)
    n_train, train_ds = train_subset(builder, info, validation_samples, train_samples, subset_seed)
    if global_batch % size:
        raise ValueError(f"global batch {global_batch} does not split into {size} workers")
    local_batch = global_batch // size
    train, per_worker = shard(train_ds, n_train, rank, size)
    # The shard is held in memory as stored (uint8 images): an epoch is then a
    # stateless permutation of indices, seeded by (seed, rank, epoch), which
    # tf.data can compute inside the pipeline and a resumed run can recompute.
    images, labels = next(iter(train.batch(per_worker)))
    per_worker = int(labels.shape[0])
    steps = per_worker // local_batch
    if steps == 0:
        raise ValueError(
            f"{n_train} training samples give each of {size} workers {per_worker} samples, fewer "
            f"than one local batch of {local_batch} (global batch {global_batch}); lower the "
            "batch size or use more samples")
    do_augment = augment and len(info.input_shape) == 3 and info.input_shape[0] >= 16

    def one_epoch(epoch):
        epoch_seed = tf.cast(seed, tf.int64) * 1_000_003 + rank * 7919 + epoch
        order = tf.argsort(tf.random.stateless_uniform([per_worker], tf.stack([epoch_seed, 0])))
        ds = tf.data.Dataset.from_tensor_slices(order).map(
            lambda i: (i,) + _decode(tf.gather(images, i), tf.gather(labels, i)))
        if do_augment:
            ds = ds.map(lambda i, x, y: (i, _augment_cifar(x, tf.stack([epoch_seed, tf.cast(i, tf.int64)])), y),
                        num_parallel_calls=tf.data.AUTOTUNE)
        return ds.map(lambda i, x, y: (x, y)).batch(local_batch, drop_remainder=True)

    def train_stream(start_epoch=0, skip_batches=0):
        stream = tf.data.Dataset.range(start_epoch, 2**31).flat_map(one_epoch)
        if skip_batches:
            stream = stream.skip(skip_batches)
        return stream.prefetch(tf.data.AUTOTUNE)

    def evaluated(ds, count):
        ds, _ = shard(ds, count, rank, size)
        return ds.map(_decode).batch(eval_batch).cache().prefetch(tf.data.AUTOTUNE)

    def eval_split(split, start, stop):
        return evaluated(_split_range(builder, split, start, stop), stop - start)

    validation = (eval_split("train", info.num_train - validation_samples, info.num_train)
                  if validation_samples else None)
    n_test = min(test_samples, info.num_test) if test_samples else info.num_test
    return Pipelines(train_stream, steps, validation, eval_split("test", 0, n_test),
                     evaluated(train_ds, n_train), info, per_worker * size)


def load_arrays(name, data_dir, *, validation_samples=0, train_samples=0, test_samples=0, subset_seed=-1):
    """Whole splits as float arrays in memory (every worker holds all of them): what
    federated training needs, where clients, not workers, own the samples.
    Returns (info, (x_train, y_train), validation or None, (x_test, y_test))."""
    builder = get_builder(name, data_dir)
    info = dataset_info(builder)
    n_train, train_ds = train_subset(builder, info, validation_samples, train_samples, subset_seed)
    n_test = min(test_samples, info.num_test) if test_samples else info.num_test

    def arrays(ds, count):
        x, y = next(iter(ds.map(_decode).batch(count)))
        return x.numpy(), y.numpy()

    validation = (arrays(_split_range(builder, "train", info.num_train - validation_samples, info.num_train),
                         validation_samples) if validation_samples else None)
    return info, arrays(train_ds, n_train), validation, arrays(_split_range(builder, "test", 0, n_test), n_test)
