"""Model zoo. Every builder returns a Keras model that outputs logits.

``norm`` selects the normalisation of the convolutional nets: ``batch``
(BatchNorm; under GradAlign its moving statistics come from the first,
undisplaced pass, see the README), ``group`` (GroupNorm: no batch statistics,
so both passes are identical functions of their inputs) or ``none``.
"""

from __future__ import annotations

import keras
from keras import layers

from hvd_gradalign_base.settings import MODEL_NAMES, NORMS  # noqa: F401 (the names, TF-free)




def _norm(kind, channels):
    if kind == "batch":
        return layers.BatchNormalization()
    if kind == "group":
        return layers.GroupNormalization(groups=min(8, channels))
    return layers.Identity()


def mlp(input_shape, num_classes, hidden=(256, 256), norm="none"):
    x = inputs = keras.Input(input_shape)
    x = layers.Flatten()(x)
    for width in hidden:
        x = layers.Dense(width, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x), name="mlp")


def _conv5_pool(x, filters_list, norm):
    for filters in filters_list:
        x = layers.Conv2D(filters, 5, use_bias=norm == "none")(x)
        x = layers.ReLU()(_norm(norm, filters)(x))
        x = layers.MaxPooling2D()(x)
    return x


def cnn2(input_shape, num_classes, norm="none"):
    """The reference code's 2-conv EMNIST network: conv5(32)-pool-conv5(64)-pool-fc512."""
    inputs = keras.Input(input_shape)
    x = _conv5_pool(inputs, (32, 64), norm)
    x = layers.Dense(512, activation="relu")(layers.Flatten()(x))
    return keras.Model(inputs, layers.Dense(num_classes)(x), name="cnn2")


def lenet(input_shape, num_classes, norm="none"):
    """LeNet-5 style net for 32x32 colour images."""
    inputs = keras.Input(input_shape)
    x = layers.Flatten()(_conv5_pool(inputs, (6, 16), norm))
    x = layers.Dense(120, activation="relu")(x)
    x = layers.Dense(84, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x), name="lenet")


def _basic_block(x, filters, stride, norm):
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = layers.ReLU()(_norm(norm, filters)(y))
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = _norm(norm, filters)(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = _norm(norm, filters)(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def resnet20(input_shape, num_classes, norm="batch"):
    """ResNet-20 for 32x32 inputs (He et al. 2016, 3 stages of 3 basic blocks)."""
    x = inputs = keras.Input(input_shape)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = layers.ReLU()(_norm(norm, 16)(x))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            x = _basic_block(x, filters, 2 if stage > 0 and block == 0 else 1, norm)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x), name="resnet20")


def _wide_block(x, filters, stride, norm):
    y = layers.ReLU()(_norm(norm, x.shape[-1])(x))
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(y)
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(y)
    y = layers.ReLU()(_norm(norm, filters)(y))
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    return layers.Add()([y, shortcut])


def wrn16_4(input_shape, num_classes, norm="batch"):
    """Wide ResNet 16-4 (Zagoruyko & Komodakis 2016), pre-activation blocks."""
    x = inputs = keras.Input(input_shape)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    for stage, filters in enumerate((64, 128, 256)):
        for block in range(2):
            x = _wide_block(x, filters, 2 if stage > 0 and block == 0 else 1, norm)
    x = layers.ReLU()(_norm(norm, x.shape[-1])(x))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x), name="wrn16_4")


MODELS = {"mlp": mlp, "cnn2": cnn2, "lenet": lenet, "resnet20": resnet20, "wrn16_4": wrn16_4}


def build_model(name, input_shape, num_classes, norm=None):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if norm is not None and norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    kwargs = {} if norm is None else {"norm": norm}
    return MODELS[name](tuple(input_shape), num_classes, **kwargs)
