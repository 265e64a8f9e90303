"""What the launch decides: how many processes started (the launcher's ``WORLD_SIZE``) and what
``--sharding auto`` means for them. Read from the environment before any process group exists, so a
run validates its options for the world it is about to join."""

from __future__ import annotations

import os

LAUNCH_FSDP = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` under a distributed_type: FSDP config


def launch_world_size() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_sharding(requested: str, world_size: int) -> str:
    """--sharding as it applies to this launch: auto follows the launch (an FSDP config, else the count)."""
    if requested == "auto":
        if os.environ.get(LAUNCH_FSDP, "false").lower() in ("true", "1"):
            return "fsdp"
        return "ddp" if world_size > 1 else "none"
    return requested
