"""Real models for the tests: a CNN trained here on scikit-learn's digits, exported to ONNX and safetensors."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DigitsModel:
    onnx: Path
    safetensors: Path
    x_test: np.ndarray  # (N, 1, 8, 8) float32 in [0, 1]
    y_test: np.ndarray
    reference: np.ndarray  # the trained torch model's logits on x_test


def train_digits(directory: Path, *, epochs: int = 15, seed: int = 0) -> DigitsModel:
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from edgespeed.engine.zoo import DigitsCNN

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(epochs):
        for i in range(0, len(xt), 100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i : i + 100]), yt[i : i + 100]).backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        reference = model(torch.from_numpy(x_test)).numpy()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(directory / "digits.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(directory / "digits.onnx"),
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            external_data=False,
            verbose=False,
        )
    return DigitsModel(directory / "digits.onnx", directory / "digits.safetensors", x_test, y_test, reference)
