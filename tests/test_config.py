import json

import pytest

from cifar10ds.config import DEEPSPEED_GRADIENT_CLIPPING_DEFAULT, apply_override, load_config
from cifar10ds.errors import ConfigError
from tests.helpers import ROOT

BASE = {
    "train_batch_size": 64,
    "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}},
    "trainer": {"model": "bn_cnn", "epochs": 2},
}


def write(tmp_path, cfg):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return p


SHIPPED = ["ds_config.json", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.json"))]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    import models

    cfg = load_config(ROOT / name)
    assert cfg.trainer.model in models.list_models()


def test_presets_carry_the_seed_recipes():
    stable = load_config(ROOT / "configs/bn_cnn_stable.json")
    assert (stable.trainer.model, stable.trainer.epochs, stable.trainer.warmup_epochs) == ("bn_cnn", 50, 5)
    assert stable.ds["train_batch_size"] == 32 and stable.ds["gradient_clipping"] == 1.0
    assert stable.ds["optimizer"] == {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}
    assert stable.trainer.early_stopping.patience == 15 and stable.precision == "fp32"
    speed = load_config(ROOT / "configs/resnet18_speedrun10.json")
    assert (speed.trainer.model, speed.trainer.epochs, speed.ds["train_batch_size"]) == ("resnet18", 10, 64)
    assert speed.ds["optimizer"]["params"] == {"lr": 0.04, "momentum": 0.9} and speed.precision == "bf16"
    assert speed.autocast  # the log's AMP: fp32 weights, bf16 compute (DeepSpeed's bf16 optimizer syncs per tensor)
    # the speedrun log's run 1: its table says SGD lr 0.01, its run 8c says momentum 0.9 too, and its curve needs it
    base = load_config(ROOT / "configs/speedrun_log/run1_baseline.json")
    assert (base.trainer.model, base.ds["train_batch_size"], base.ds["optimizer"]["params"]) == (
        "simple_cnn", 512, {"lr": 0.01, "momentum": 0.9})
    assert base.trainer.data.augmentation.model_dump() == {"crop_padding": 0, "flip": False, "cutout": 0}


@pytest.mark.parametrize(
    "item, path, value",
    [
        ("trainer.epochs=3", ("trainer", "epochs"), 3),
        ("optimizer.params.lr=0.05", ("optimizer", "params", "lr"), 0.05),
        ("bf16.enabled=true", ("bf16", "enabled"), True),
        ("trainer.model=resnet18", ("trainer", "model"), "resnet18"),  # not JSON: kept as a string
        ("trainer.early_stopping.target=null", ("trainer", "early_stopping", "target"), None),
        ("new.section.key=[1, 2]", ("new", "section", "key"), [1, 2]),
    ],
)
def test_override_sets_dotted_path_parsing_json(item, path, value):
    cfg = json.loads(json.dumps(BASE))
    apply_override(cfg, item)
    node = cfg
    for p in path:
        node = node[p]
    assert node == value


@pytest.mark.parametrize("item, message", [
    ("trainer.epochs", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("train_batch_size.x=1", "train_batch_size is a int, not an object"),
])
def test_bad_override(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(json.loads(json.dumps(BASE)), item)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"trainer": {"epoch": 3}}, "trainer.epoch: unknown key; allowed keys: model, epochs, seed"),
        ({"trainer": {"data": {"augmentaton": {}}}}, "trainer.data.augmentaton: unknown key; allowed keys: dir, download"),
        ({"trainer": {"data": {"augmentation": {"flip": "yes"}}}}, "trainer.data.augmentation.flip: Input should be true, false or \"alternate\""),
        ({"trainer": {"epochs": "ten"}}, "trainer.epochs: Input should be a valid number"),
        ({"trainer": {"epochs": -1}}, "trainer.epochs: Input should be greater than 0"),
        ({"trainer": {"model": "vgg"}}, "unknown model 'vgg'; valid names: airbench94, bn_cnn, cnn3, cnn3_bn, cnn3_fanin, resnet18, resnet9, simple_cnn"),
        ({"trainer": {"early_stopping": {"monitor": "acc"}}}, "monitor: Input should be 'val_acc', 'val_loss' or 'train_loss'"),
        ({"trainer": {"warmup_epochs": 1, "warmup_fraction": 0.1}}, "set at most one of warmup_epochs and warmup_fraction"),
        ({"trainer": {"label_smoothing": 1.0}}, "label_smoothing: Input should be less than 1"),
        ({"trainer": []}, '"trainer" must be an object'),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled and bf16.enabled are both true"),
        ({"fp16": {"enabled": "yes"}}, 'fp16 must be an object like {"enabled": true}'),
        ({"train_batch_size": 0}, 'train_batch_size must be a positive integer or "auto"'),
        ({"train_batch_size": "auto"}, "set train_batch_size or train_micro_batch_size_per_gpu"),
        ({"gradient_clipping": -1}, "gradient_clipping must be a number >= 0"),
        ({"optimizer": "SGD"}, 'optimizer must be an object like {"type": "SGD"'),
        ({"scheduler": {"type": "Cosine"}}, "scheduler.type must be one of WarmupLR, WarmupDecayLR, WarmupCosineLR"),
    ],
)
def test_invalid_config_names_key_and_allowed_values(tmp_path, change, message):
    cfg = json.loads(json.dumps(BASE))
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_json_gives_line_and_column(tmp_path):
    p = write(tmp_path, '{\n  "train_batch_size": 32,\n  "optimizer": {"type": "SGD",}\n}')
    with pytest.raises(ConfigError, match=r"invalid JSON at line 3 column 31: Expecting property name"):
        load_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found: pass --deepspeed_config PATH"):
        load_config(tmp_path / "nope.json")


def test_absent_gradient_clipping_is_deepspeeds_default(tmp_path):
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    from cifar10ds.config import DEEPSPEED_GRADIENT_CLIPPING_DEFAULT

    assert DEEPSPEED_GRADIENT_CLIPPING_DEFAULT == GRADIENT_CLIPPING_DEFAULT == 1.0
    cfg = json.loads(json.dumps(BASE))
    assert load_config(write(tmp_path, cfg)).ds["gradient_clipping"] == 1.0  # written into the resolved config
    cfg["gradient_clipping"] = 0
    assert load_config(write(tmp_path, cfg)).ds["gradient_clipping"] == 0


@pytest.mark.parametrize("change, message", [
    ({"optimizer": None}, 'an "optimizer" is required'),
    ({"zero_optimization": 2}, "zero_optimization must be an object"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage must be 0, 1, 2 or 3"),
])
def test_deepspeed_sections_the_trainer_reads(tmp_path, change, message):
    cfg = json.loads(json.dumps(BASE))
    cfg.update(change)
    if change.get("optimizer", 1) is None:
        del cfg["optimizer"]
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, cfg))


def test_a_null_deepspeed_key_is_left_out(tmp_path):
    """DeepSpeed fails inside its own config code on a null section ("'NoneType' object has no attribute 'keys'")."""
    cfg = {**json.loads(json.dumps(BASE)), "scheduler": {"type": "WarmupLR", "params": {}}}
    loaded = load_config(write(tmp_path, cfg), ["scheduler=null", "gradient_clipping=null"])
    assert "scheduler" not in loaded.ds and loaded.ds["gradient_clipping"] == DEEPSPEED_GRADIENT_CLIPPING_DEFAULT
    with pytest.raises(ConfigError, match='an "optimizer" is required'):
        load_config(write(tmp_path, cfg), ["optimizer=null"])


def test_a_deepspeed_key_with_a_typo_is_named():
    """DeepSpeed ignores keys it does not know; one that looks like a key it knows is most likely a typo."""
    from cifar10ds.config import deepspeed_key_typos

    ds = {"train_batch_sizee": 64, "zero_optimisation": {"stage": 1}, "bfloat16": {"enabled": True},
          "gradient_clipping": 1.0, "trainer": {}, "a_key_from_a_newer_deepspeed": 1}
    assert deepspeed_key_typos(ds) == [
        "warning: train_batch_sizee: not a DeepSpeed key (did you mean train_batch_size?); DeepSpeed ignores it",
        "warning: zero_optimisation: not a DeepSpeed key (did you mean zero_optimization?); DeepSpeed ignores it",
    ]
    for preset in SHIPPED:
        assert deepspeed_key_typos(json.loads((ROOT / preset).read_text())) == [], preset
