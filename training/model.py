"""The seed's Keras network (and an optional small CNN) with the same flat 784-float input."""

from __future__ import annotations

import keras

from training.data import IMAGE_SHAPE, INPUT_DIM, NUM_CLASSES

ARCHES = ("mlp", "cnn")
HIDDEN_LAYER = "hidden"  # the first Dense layer, whose activations TensorBoard shows
OUTPUT_LAYER = "probabilities"


def build_model(arch: str = "mlp", learning_rate: float | None = None) -> keras.Model:
    """Build, compile; mlp: Input(784) -> Dense(512, relu) -> Dense(10, softmax), rmsprop (seed)."""
    inputs = keras.Input(shape=(INPUT_DIM,), name="input")
    if arch == "mlp":
        layers = [
            keras.layers.Dense(512, activation="relu", name=HIDDEN_LAYER),
            keras.layers.Dense(NUM_CLASSES, activation="softmax", name=OUTPUT_LAYER),
        ]
    elif arch == "cnn":
        layers = [
            keras.layers.Reshape((*IMAGE_SHAPE, 1), name="image"),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(2, name="pool1"),
            keras.layers.Conv2D(64, 3, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(2, name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dropout(0.25, name="dropout1"),
            keras.layers.Dense(128, activation="relu", name=HIDDEN_LAYER),
            keras.layers.Dropout(0.5, name="dropout2"),
            keras.layers.Dense(NUM_CLASSES, activation="softmax", name=OUTPUT_LAYER),
        ]
    else:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHES}")
    model = keras.Sequential([inputs, *layers], name=f"mnist_{arch}")
    optimizer = keras.optimizers.RMSprop() if learning_rate is None else keras.optimizers.RMSprop(learning_rate)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
    return model
