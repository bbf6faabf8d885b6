"""One source for the user tower's Triton model configuration, CPU and GPU.

CPU (this machine): the Python backend runs the exported TorchScript (``model.pt``) through
``model.py``. GPU (docker-compose, NVIDIA's Triton image): the libtorch backend runs the same
``model.pt`` directly on ``KIND_GPU``. Input and output names follow libtorch's
``<name>__<index>`` convention so both backends accept the same request.

:func:`model_config` returns the JSON form the repository API takes as a load-time override
(``version_policy`` decides which version folders are live); :func:`to_pbtxt` renders the
same dict as ``config.pbtxt``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

MODEL_NAME = "user_tower"
INPUT_NAME = "USER_ID__0"
OUTPUT_NAME = "EMBEDDING__0"
DEFAULT_MAX_BATCH = 256
# Requests are single users; a short queue delay lets the batcher merge concurrent ones
# without adding visible latency.
DEFAULT_QUEUE_DELAY_US = 200

Kind = Literal["cpu", "gpu"]


def model_config(
    kind: Kind = "cpu",
    versions: Iterable[int] | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    instances: int = 1,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> dict[str, Any]:
    """The user tower's model config.

    Default ``version_policy: all``: the version folders in the repository are the live set
    (see :mod:`serving.triton.repository`). ``versions`` gives a specific policy instead.
    """
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"kind must be 'cpu' or 'gpu', got {kind!r}")
    if max_batch_size < 1 or instances < 1 or queue_delay_us < 0:
        raise ValueError("max_batch_size and instances must be >= 1, queue_delay_us >= 0")
    cfg: dict[str, Any] = {
        "name": MODEL_NAME,
        "max_batch_size": max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_INT64", "dims": [1]}],
        # -1: the embedding width belongs to the version, not to the model name
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [-1]}],
        "dynamic_batching": {"max_queue_delay_microseconds": queue_delay_us},
    }
    if kind == "cpu":
        cfg["backend"] = "python"
        cfg["instance_group"] = [{"kind": "KIND_CPU", "count": instances}]
    else:
        cfg["backend"] = "pytorch"
        cfg["default_model_filename"] = "model.pt"
        cfg["instance_group"] = [{"kind": "KIND_GPU", "count": instances}]
        cfg["parameters"] = {"INFERENCE_MODE": {"string_value": "true"}}
    if versions is not None:
        vs = sorted({int(v) for v in versions})
        if not vs or vs[0] < 1:
            raise ValueError(f"versions must be positive integers, got {vs}")
        cfg["version_policy"] = {"specific": {"versions": vs}}
    else:
        cfg["version_policy"] = {"all": {}}
    return cfg


# Fields whose values are protobuf enums: bare words in text format, everything else quoted.
_ENUM_FIELDS = {"data_type", "kind", "format"}


def _scalar(value: Any, key: str = "") -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    if key in _ENUM_FIELDS:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render(obj: dict[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for key, value in obj.items():
        if key == "parameters" and isinstance(value, dict):
            # protobuf map<string, ModelParameter>: one entry block per key
            for pkey, pval in value.items():
                lines.append(f"{pad}parameters {{")
                lines.append(f'{pad}  key: "{pkey}"')
                lines.append(f"{pad}  value {{")
                lines.extend(_render(pval, indent + 2))
                lines.append(f"{pad}  }}")
                lines.append(f"{pad}}}")
        elif isinstance(value, dict):
            lines.append(f"{pad}{key} {{")
            lines.extend(_render(value, indent + 1))
            lines.append(f"{pad}}}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"{pad}{key} {{")
                lines.extend(_render(item, indent + 1))
                lines.append(f"{pad}}}")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value, key)}")
    return lines


def to_pbtxt(cfg: dict[str, Any]) -> str:
    """Render a model config dict as protobuf text (``config.pbtxt``)."""
    return "\n".join(_render(cfg, 0)) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.triton.model_config --kind gpu``: print a config.pbtxt."""
    import argparse

    ap = argparse.ArgumentParser(description="print the user tower's config.pbtxt")
    ap.add_argument("--kind", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH)
    ap.add_argument("--instances", type=int, default=1)
    args = ap.parse_args(argv)
    print(to_pbtxt(model_config(args.kind, None, args.max_batch_size, args.instances)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
