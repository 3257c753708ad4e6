"""Write docs/configuration.md from the config schema (a test fails when the two disagree).

    python scripts/gen_config_doc.py          # rewrite docs/configuration.md
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cifar10ds.config import TrainerConfig  # noqa: E402
from cifar10ds.schedules import SCHEDULES  # noqa: E402

HEADER = """# Configuration reference

One file, `ds_config.json` (or any file passed with `--deepspeed_config`), steers a run. Its top-level
keys are DeepSpeed's own and go to `deepspeed.initialize` unchanged except for `"auto"` values, which the
trainer fills in first; the `"trainer"` section holds what DeepSpeed has no key for. Any key can be
overridden from the command line by its dotted path: `--set trainer.epochs=3 --set optimizer.params.lr=0.05`.
The resolved file is saved as `config.json` in the run's output folder.

*The trainer tables below are generated from the schema in `cifar10ds/config.py` by
`python scripts/gen_config_doc.py`; `tests/test_docs.py` fails when they disagree.*

## DeepSpeed keys the trainer reads or fills

| key | type | meaning |
|---|---|---|
| `train_batch_size` | int or `"auto"` | images per optimizer step across all ranks (= micro batch x accumulation x world size) |
| `train_micro_batch_size_per_gpu` | int or `"auto"` | images per forward pass on each rank; `"auto"`: from the other two and the world size |
| `gradient_accumulation_steps` | int or `"auto"` | micro batches per optimizer step (`"auto"`: 1, or what the other two imply) |
| `optimizer` | object | `{"type": ..., "params": {...}}`: DeepSpeed's optimizers or any `torch.optim` class (`SGD`, `AdamW`, ...) |
| `scheduler` | object | `{"type": ..., "params": {...}}`, type one of {schedulers}; `"auto"` step counts are filled from epochs, warmup and steps per epoch |
| `gradient_clipping` | number >= 0 | clip the global gradient norm to this value (0 = off); absent: DeepSpeed's default, 1.0, written into the resolved config |
| `fp16` / `bf16` | `{"enabled": bool, ...}` | precision; at most one enabled; neither = fp32. BatchNorm always computes in fp32 |
| `wandb` | `{"enabled", "project", "group", "team"}` | read by the trainer, which logs to wandb from rank 0 (not passed to DeepSpeed's monitor) |
| `zero_optimization`, `steps_per_print`, ... | | passed to DeepSpeed as they are: see DeepSpeed's configuration documentation |

A batch size that does not divide across the ranks, fp16 and bf16 together, a warmup not shorter than the
run, or a precision the device cannot run stop the run before any work with one line naming the key.
"""


def _type_name(annotation: typing.Any) -> str:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)  # 0 stays 0, "auto" stays "auto"
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    return getattr(annotation, "__name__", str(annotation))


def _default(value: typing.Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _rows(model: type[BaseModel], prefix: str, sections: list[tuple[str, type[BaseModel]]]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sections.append((key, ann))
            rows.append(f"| `{key}` | object | | see [{key}](#{key.replace('.', '')}) |")
            continue
        limits = ", ".join(
            f"{sym} {getattr(m, attr)}"
            for m in field.metadata
            for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
            if getattr(m, attr, None) is not None
        )
        type_text = _type_name(ann) + (f" ({limits})" if limits else "")
        default = _default(field.get_default(call_default_factory=True))
        rows.append(f"| `{key}` | {type_text} | `{default}` | {field.description or ''} |")
    return rows


def render() -> str:
    out = [HEADER.replace("{schedulers}", ", ".join(f"`{s}`" for s in SCHEDULES))]
    sections: list[tuple[str, type[BaseModel]]] = [("trainer", TrainerConfig)]
    while sections:
        key, model = sections.pop(0)
        out.append(f"\n## {key}\n\n| key | type | default | meaning |\n|---|---|---|---|")
        out.extend(_rows(model, key, sections))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    (ROOT / "docs" / "configuration.md").write_text(render())
    print("wrote docs/configuration.md")
