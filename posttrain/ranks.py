"""Who this process is in a distributed launch: its rank, whether it is the main one, and waiting for the others.

Ranks come from torchrun's environment (RANK, WORLD_SIZE), which `accelerate launch` sets for DDP, FSDP and
DeepSpeed alike. Waiting uses accelerate's process group (gloo on CPU, nccl on GPU); its timeout is
POSTTRAIN_DIST_TIMEOUT_S (default 4 h: the other ranks wait through the main process's evals). The distributed
pipeline (who trains, who writes) is `posttrain.distributed`; stages need only these.
"""
from __future__ import annotations

import datetime as _dt
import os
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True in a process started by a distributed launcher with more than one process."""
    return world_size() > 1


def _state():
    import torch
    from accelerate.state import PartialState

    timeout = _dt.timedelta(seconds=float(os.environ.get("POSTTRAIN_DIST_TIMEOUT_S", 4 * 3600)))
    # cpu= as transformers' TrainingArguments asks (use_cpu when CUDA is absent), so the Trainer reuses this state.
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)


def barrier() -> None:
    if launched():
        _state().wait_for_everyone()


def agree(value: Any) -> Any:
    """The main process's `value` on every rank (e.g. a timestamped run directory name)."""
    if not launched():
        return value
    from accelerate.utils import broadcast_object_list

    _state()
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
