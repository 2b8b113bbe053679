"""Where the sweep runs: a fresh local Ray, or a cluster a user started with `ray start`; GPUs per trial."""

from __future__ import annotations

import logging
from typing import Any


def resolve_gpus(requested: Any, address: str | None) -> float:
    import torch

    if requested in (None, "auto"):
        return 0.25 if torch.cuda.is_available() else 0.0
    gpus = float(requested)
    if gpus > 0 and address is None and not torch.cuda.is_available():
        raise ValueError(f"resources.gpus_per_trial={gpus} but this machine has no CUDA GPU (trials would wait "
                         "forever); use resources.gpus_per_trial=0 or join a GPU cluster with ray.address.")
    return gpus


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an unreachable GCS for minutes; a plain TCP connect answers in seconds."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray.address={address!r} is not host:port, ray://host:port, auto or null.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ValueError(f"ray.address={address} is unreachable ({err}). Start the cluster (`ray start --head`) "
                         "or use ray.address=null for a local Ray.") from err


def start_ray(address: str | None, num_cpus: int | None, gpus: float) -> None:
    import ray

    if address not in (None, "auto"):
        check_reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ValueError(f"Could not connect to Ray at ray.address={address}: {err}. Start the cluster "
                         "(`ray start --head`) or use ray.address=null for a local Ray.") from err
    if gpus > 0 and ray.cluster_resources().get("GPU", 0) < gpus:
        raise ValueError(f"resources.gpus_per_trial={gpus} but the Ray cluster has no GPUs; "
                         "use resources.gpus_per_trial=0 or add GPU nodes.")
