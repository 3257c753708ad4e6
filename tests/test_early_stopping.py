import pytest

from cifar10ds.config import EarlyStoppingConfig
from cifar10ds.early_stopping import should_stop


def hist(values, key="val_acc"):
    return [{"val_acc": 0.0, "val_loss": 0.0, "train_loss": 0.0, key: v} for v in values]


@pytest.mark.parametrize(
    "cfg, values, elapsed, expected",
    [
        ({}, [0.1, 0.2, 0.1, 0.1], 0, (False, None)),  # nothing configured: never stops
        ({"patience": 2}, [0.5, 0.6, 0.6, 0.59], 0, (True, "patience")),
        ({"patience": 2}, [0.5, 0.6, 0.6, 0.61], 0, (False, None)),
        ({"patience": 2, "min_delta": 0.05}, [0.5, 0.6, 0.62, 0.64], 0, (True, "patience")),  # too small to count
        ({"patience": 1}, [0.5], 0, (False, None)),
        ({"target": 0.94}, [0.90, 0.9401], 0, (True, "target")),
        ({"target": 0.94}, [0.90, 0.9399], 0, (False, None)),
        ({"time_budget_s": 10}, [0.1, 0.2], 10.0, (True, "time_budget")),
        ({"time_budget_s": 10}, [0.1, 0.2], 9.9, (False, None)),
        ({"target": 0.5, "time_budget_s": 1}, [0.6], 5, (True, "target")),  # target is checked first
        ({"monitor": "val_loss", "patience": 2}, [1.0, 0.9, 0.95, 0.91], 0, (True, "patience")),  # auto: min
        ({"monitor": "val_loss", "patience": 2}, [1.0, 0.9, 0.95, 0.85], 0, (False, None)),
        ({"monitor": "val_loss", "target": 0.3}, [0.5, 0.29], 0, (True, "target")),
        ({"monitor": "train_loss", "mode": "max", "patience": 1}, [1.0, 0.9], 0, (True, "patience")),
    ],
)
def test_should_stop_table(cfg, values, elapsed, expected):
    es = EarlyStoppingConfig(**cfg)
    assert should_stop(hist(values, es.monitor), es, elapsed) == expected


def test_should_stop_on_empty_history():
    assert should_stop([], EarlyStoppingConfig(patience=1, target=0.1), 1e9) == (False, None)
