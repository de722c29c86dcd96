"""Make tests/fixtures/digits.tflite and the same weights for torch (digits-tflite.safetensors).

Converting to TFLite needs TensorFlow, which the project does not depend on,
so the converted model is committed and this script says how it was made:

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu==2.21.0 scikit-learn safetensors
    /tmp/tf/bin/python scripts/make_tflite_fixture.py

It trains the zoo's digits CNN (same layers as `edgespeed.engine.zoo.DigitsCNN`)
in Keras on scikit-learn's digits, converts it to TFLite (float32, NHWC input
1x8x8x1 with a dynamic batch), and writes the weights in torch's layout, so the
tests can load them into the torch model, export that to ONNX, and check that
TFLite and ONNX Runtime agree on the same weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from safetensors.numpy import save_file
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC
    y = digits.target
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        tf.keras.layers.MaxPool2D(2),
        tf.keras.layers.Permute((3, 1, 2)),  # NHWC -> NCHW before flattening, as torch flattens
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(10),
    ])
    model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x[:1500], y[:1500], epochs=15, batch_size=100, verbose=0)
    print("keras test accuracy", model.evaluate(x[1500:], y[1500:], verbose=0)[1])

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "digits.tflite").write_bytes(converter.convert())

    conv1, conv2, dense1, dense2 = (layer for layer in model.layers if layer.weights)
    state = {
        "features.0.weight": conv1.kernel.numpy().transpose(3, 2, 0, 1),  # HWIO -> OIHW
        "features.0.bias": conv1.bias.numpy(),
        "features.2.weight": conv2.kernel.numpy().transpose(3, 2, 0, 1),
        "features.2.bias": conv2.bias.numpy(),
        "head.1.weight": dense1.kernel.numpy().T,  # (in, out) -> (out, in)
        "head.1.bias": dense1.bias.numpy(),
        "head.3.weight": dense2.kernel.numpy().T,
        "head.3.bias": dense2.bias.numpy(),
    }
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
              str(OUT / "digits-tflite.safetensors"))
    for path in sorted(OUT.iterdir()):
        print(path, path.stat().st_size)


if __name__ == "__main__":
    main()
