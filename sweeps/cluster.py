"""Where the sweep runs: a fresh local Ray, or a cluster a user started with `ray start`; GPUs per trial.

ray.address:
  null (or "local")   always a fresh local Ray, whatever an earlier `ray start` recorded on this machine
                      (Ray's own `ray.init()` would join the cluster named in <ray tmp>/ray_current_cluster,
                      and hang for minutes when that head is dead).
  auto                RAY_ADDRESS, else the cluster that `ray start` recorded on this machine.
  <host>:<port>       the GCS of a head started with `ray start --head --port <port>`.
  ray://<host>:<port> the Ray Client server of a head (`--ray-client-server-port`, needs `ray[client]`).

Token authentication (Ray >= 2.52; the pinned 2.60 turns it on for every local `ray.init()`, which writes
~/.ray/auth_token, and `ray start --head` turns it on whenever a token exists on the head or RAY_AUTH_MODE=token).
A driver sends the token only when RAY_AUTH_MODE=token in its environment; Ray sets that itself for address=auto
when a token is found, never for an explicit address. So here: when RAY_AUTH_MODE is unset, the cluster is asked
without a token first, and only if it answers "unauthenticated" is token mode switched on, with the token Ray
finds in its documented order (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token). An explicit RAY_AUTH_MODE
is respected as it is.

Resources come from the cluster, never from the driver's own hardware: a CPU-only head with GPU workers gets GPU
trials, and the driver process never touches CUDA (the teacher is a Ray task with a GPU of its own). On a cluster,
the project's code travels with the job (runtime_env working_dir), and folders that trials read or write must be
shared by every node.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TOKEN_HELP = (
    "put the head's token (`ray get-auth-token` on the head prints it) in ~/.ray/auth_token here, "
    "or set RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file>"
)
LOCAL_HELP = "or use ray.address=null for a local Ray"
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def one_line(err: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_address(address: str, label: str | None = None) -> tuple[str, int]:
    label = label or f"ray.address={address}"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"{label} is not host:port, ray://host:port, auto or null.")
    return host, int(port)


def check_reachable(address: str, timeout_s: float = 5.0, label: str | None = None) -> None:
    """Ray retries an unreachable GCS for minutes; a TCP connect plus an HTTP/2 hello answers in seconds.

    Both the GCS and the Ray Client server speak gRPC, so they answer the HTTP/2 preface with a SETTINGS frame;
    anything else on that port (the dashboard, a wrong service) would make ray.init retry for minutes too.
    """
    label = label or f"ray.address={address}"
    host, port = split_address(address, label)
    try:
        conn = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as err:
        raise ValueError(
            f"{label} is unreachable ({one_line(err)}). Start the cluster (`ray start --head "
            f"--port {port}` on {host}) {LOCAL_HELP}."
        ) from err
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # TLS in front of gRPC: no plain HTTP/2 preface to check
        try:
            conn.sendall(HTTP2_PREFACE)
            reply = b""
            while len(reply) < 9:  # an HTTP/2 frame header: 3 length, 1 type (4 = SETTINGS), 1 flags, 4 stream
                chunk = conn.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
        except OSError as err:
            reply = b""
            why = one_line(err)
        else:
            why = "no HTTP/2 SETTINGS in its answer"
        if len(reply) < 9 or reply[3] != 0x04:
            raise ValueError(
                f"{label} answers but is not a Ray GCS or Ray Client port ({why}); use the head's "
                "`ray start --port` (or ray://<head>:<ray-client-server-port>), not the dashboard "
                "port."
            )


def token_source() -> str | None:
    """Where Ray will read the auth token from, in Ray's documented order; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            readable = bool(Path(path).expanduser().read_text().strip())
        except OSError:
            readable = False
        if not readable:  # Ray aborts the whole process on this; say it in one line instead
            raise ValueError(
                f"RAY_AUTH_TOKEN_PATH={path} is not a readable file holding the token; fix it, "
                "or unset it and use ~/.ray/auth_token or RAY_AUTH_TOKEN."
            )
        return f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    try:
        if default.read_text().strip():
            return str(default)
    except OSError:
        pass
    return None


def enable_token_mode() -> None:
    """What Ray does for address=auto when it finds a token: RAY_AUTH_MODE=token for this process (and its children)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # RayConfig caches the mode; re-read it from the environment
    AuthenticationTokenLoader.instance().reset_cache()


def authenticate(label: str, accepted: Callable[[], bool]) -> None:
    """accepted() asks the cluster once (True: let in, False: "unauthenticated"); switch on token mode if needed."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "token" and token_source() is None:
        raise ValueError(f"{label}: RAY_AUTH_MODE=token but no Ray auth token was found; {TOKEN_HELP}.")
    if accepted():
        return
    if mode == "token":
        raise ValueError(f"{label}: the cluster rejected the Ray auth token from {token_source()}; {TOKEN_HELP}.")
    if mode:
        raise ValueError(
            f"{label}: the cluster requires Ray token authentication but RAY_AUTH_MODE={mode} here; "
            f"unset it and {TOKEN_HELP}."
        )
    source = token_source()
    if source is None:
        raise ValueError(
            f"{label}: the cluster requires Ray token authentication and no token was found on this "
            f"machine; {TOKEN_HELP}."
        )
    enable_token_mode()
    if not accepted():
        raise ValueError(f"{label}: the cluster rejected the Ray auth token from {source}; {TOKEN_HELP}.")
    logger.info("%s: token authentication with the token from %s", label, source)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Ray's C++ GCS client logs every refused probe to fd 2 ("Failed to get cluster ID ... Unauthenticated");
    the outcome is reported here in one line instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def gcs_accepts(gcs_address: str, label: str) -> Callable[[], bool]:
    def accepted() -> bool:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError

        try:
            with quiet_native_stderr():
                GcsClient(address=gcs_address)
        except AuthenticationError:
            return False
        except Exception as err:  # ray.init would retry this for minutes
            raise ValueError(
                f"{label}: the Ray GCS at {gcs_address} did not answer ({one_line(err)}); is the "
                f"head up and the same Ray version (`ray --version`)? {LOCAL_HELP}."
            ) from err
        return True

    return accepted


def client_accepts(address: str, label: str) -> Callable[[], bool]:
    def accepted() -> bool:
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

        channel = init_grpc_channel(address.removeprefix("ray://"))  # adds the token when token mode is on
        try:
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=10
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                return False
            raise ValueError(
                f"{label}: the Ray Client server did not answer ({err.code().name}: "
                f"{one_line(err.details() or '')}); {LOCAL_HELP}."
            ) from err
        finally:
            channel.close()
        return True

    return accepted


def resolve_auto(label: str) -> str:
    """What ray.address=auto means here: RAY_ADDRESS, else the cluster `ray start` recorded on this machine.

    Unlike Ray's own "auto", no fallback to whatever GCS process happens to run on the machine (on a shared box
    that is someone else's private `ray.init()`).
    """
    from ray._common.utils import get_ray_address_file

    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env not in ("auto", "local"):
        if env.startswith("ray://"):
            raise ValueError(f"{label} with RAY_ADDRESS={env}: pass ray.address={env} instead.")
        check_reachable(env, label=f"{label} (RAY_ADDRESS={env})")
        return env
    recorded = get_ray_address_file(None)
    try:
        resolved = Path(recorded).read_text().strip()
    except OSError:
        resolved = ""
    if not resolved:
        raise ValueError(
            f"{label} found no cluster started with `ray start` on this machine (no {recorded}); "
            f"start one, pass ray.address=<head>:<port>, {LOCAL_HELP}."
        )
    check_reachable(
        resolved,
        label=f"{label} (the cluster {resolved} recorded in {recorded}; if that head is gone, delete the file)",
    )
    return resolved


def is_local_address(address: str | None) -> bool:
    """ray.address values that start a private local Ray instead of joining a cluster."""
    return address in (None, "", "local")


def start_ray(address: str | None, num_cpus: int | None, runtime_env: dict[str, Any] | None = None) -> None:
    """ray.init for ray.address (module docstring), refusing in one line in seconds what Ray would retry for minutes.

    `runtime_env` (joining a cluster: `code_runtime_env`) ships the project's code to every node with the job.
    """
    import ray
    from ray.exceptions import AuthenticationError

    label = f"ray.address={address}"
    if is_local_address(address):
        try:
            # "local", not None: ray.init() would join the cluster an earlier `ray start` recorded on this machine.
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                runtime_env=runtime_env,
            )
        except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as err:
            raise ValueError(f"Could not start a local Ray (ray.address=null): {one_line(err)}") from err
        return
    address = str(address).strip()
    if address.startswith("ray://"):
        from ray._private.utils import get_ray_client_dependency_error

        if get_ray_client_dependency_error() is not None:
            raise ValueError(
                f'{label} needs the Ray Client (`pip install "ray[client]=={ray.__version__}"`), '
                "or pass the head's GCS address ray.address=<head>:<port> instead."
            )
        check_reachable(address, label=label)
        authenticate(label, client_accepts(address, label))
        target = address
    else:
        target = resolve_auto(label) if address == "auto" else address
        if address != "auto":
            check_reachable(target, label=label)
        authenticate(label, gcs_accepts(target, label))
    try:
        ray.init(address=target, logging_level=logging.WARNING, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as err:
        raise ValueError(f"Could not connect to Ray at {label}: {one_line(err)}; {LOCAL_HELP}.") from err


# --- the project's code on every node ---------------------------------------------------------------------------

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Never uploaded with the code (gitignore syntax, relative to the project root): environments, data, results.
CODE_EXCLUDES = (
    "/.git/",
    "/.venv/",
    "/venv/",
    "/runs/",
    "/outputs/",
    "/multirun/",
    "/mlruns/",
    "/data/",
    "/.whl/",
    "__pycache__/",
    "*.pyc",
    "/.pytest_cache/",
    "*.egg-info/",
    "*.onnx",
    "*.npy",
    "*.pt",
    "*.db",
)


def code_runtime_env(local_paths: Iterable[str]) -> dict[str, Any]:
    """The job's runtime_env on a cluster: the project folder as `working_dir`, so nodes need only the same Python
    environment, not the code at the same path. Local folders of the run (workdir, storage_path, data.root) that sit
    inside the project are left out too: they are data, and Ray refuses packages over its GCS limit."""
    excludes = list(CODE_EXCLUDES)
    for path in local_paths:
        if "://" in str(path):
            continue
        try:
            inside = Path(path).resolve().relative_to(PROJECT_ROOT)
        except ValueError:
            continue
        if inside.parts:
            excludes.append(f"/{inside.as_posix()}/")
    return {"working_dir": str(PROJECT_ROOT), "excludes": excludes}


# --- resources, from the cluster --------------------------------------------------------------------------------

TRIALS_PER_GPU = 4  # gpus_per_trial=auto: trials sharing one card, when its node has the CPUs for them
GPU_SHARE_TOLERANCE = 0.01  # 0.33 is taken as a third of a card (Ray counts resources to 1e-4)


@dataclass(frozen=True)
class Node:
    """An alive Ray node's CPUs and GPUs, as Ray advertises them to tasks."""

    cpus: float
    gpus: float


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected cluster (ray.nodes())."""
    import ray

    return [
        Node(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
        for n in ray.nodes()
        if n["Alive"]
    ]


def requested_share(key: str, value: Any) -> float | None:
    """A resources.* value as a number, None for auto; checked before Ray starts (the cluster decides auto)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    positive = key == "resources.cpus_per_trial"
    if not math.isfinite(number) or number < 0 or (positive and number == 0) or isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be auto or a number {'> 0' if positive else '>= 0'}.")
    if key == "resources.gpus_per_trial":
        check_gpu_share(number)
    return number


def check_gpu_share(gpus: float) -> None:
    """Trials must fill cards exactly: a fraction of a card is 1/k (k trials per card), more than one is whole cards.

    Ray places a fractional request on one card, so 0.3 leaves a tenth of every card idle, and 1.5 cards per trial
    strands half a card per trial.
    """
    if gpus >= 1:
        if gpus != int(gpus):
            raise ValueError(
                f"resources.gpus_per_trial={gpus:g} is not a whole number of GPUs; use 1, 2, ... GPUs "
                "per trial, or 1/k of a card (0.5, 0.25, ...) for k trials per card."
            )
        return
    if gpus > 0:
        per_card = round(1 / gpus)
        if round(abs(gpus * per_card - 1), 9) > GPU_SHARE_TOLERANCE:
            raise ValueError(
                f"resources.gpus_per_trial={gpus:g} does not divide a card (1/{gpus:g} = {1 / gpus:.2f} "
                f"trials per GPU); use 1/k for k trials per card: {1 / per_card:.4g} or "
                f"{1 / (per_card + 1):.4g}."
            )


def fits(node: Node, cpus: float, gpus: float) -> int:
    """How many trials of (cpus, gpus) the node holds at once."""
    by_cpu = math.floor(node.cpus / cpus + 1e-9)
    return min(by_cpu, math.floor(node.gpus / gpus + 1e-9)) if gpus > 0 else by_cpu


def count(n: float, noun: str) -> str:
    return f"{n:g} {noun}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class TrialResources:
    """What each trial and the teacher's Ray task ask for, decided from the cluster's nodes."""

    cpus_per_trial: float
    gpus_per_trial: float
    concurrent: int  # trials the cluster holds at once
    teacher_cpus: float
    teacher_gpus: int
    summary: str  # e.g. "2 nodes, 16 CPUs, 4 GPUs: 0.25 GPU per trial, ..."


def plan_resources(cpus_per_trial: Any, gpus_per_trial: Any, nodes: list[Node], device: str) -> TrialResources:
    """resources.* resolved against the cluster's nodes: auto values decided, and requests no node can hold refused.

    gpus_per_trial=auto: 1/TRIALS_PER_GPU of a card on a cluster with GPUs (fewer trials per card when a GPU node has
    too few CPUs for them), 0 without GPUs or with device=cpu. cpus_per_trial=auto: 1 for CPU trials; for GPU trials
    the CPUs of the poorest GPU node split among the trials its cards hold (at least 1).
    """
    cpus = requested_share("resources.cpus_per_trial", cpus_per_trial)
    gpus = requested_share("resources.gpus_per_trial", gpus_per_trial)
    gpu_nodes = [n for n in nodes if n.gpus >= 1]
    total_cpus, total_gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    found = f"{count(len(nodes), 'node')}, {count(total_cpus, 'CPU')}, " + (
        count(total_gpus, "GPU") if total_gpus else "no GPU"
    )
    if gpus is None:
        if not gpu_nodes or device == "cpu":
            gpus = 0.0
        else:
            per_card = min([TRIALS_PER_GPU] + [max(1, math.floor(n.cpus / ((cpus or 1) * n.gpus))) for n in gpu_nodes])
            gpus = 1 / per_card
    if cpus is None:
        slots = [(n.cpus, math.floor(n.gpus / gpus + 1e-9)) for n in gpu_nodes] if gpus > 0 else []
        shares = [node_cpus / trials for node_cpus, trials in slots if trials >= 1]
        cpus = float(max(1, math.floor(min(shares)))) if shares else 1.0
    if gpus > 0 and total_gpus == 0:
        raise ValueError(
            f"resources.gpus_per_trial={gpus:g} but the Ray cluster ({found}) has no CUDA GPU, so trials "
            "would wait forever; use resources.gpus_per_trial=0 (or auto), or join a GPU cluster with "
            "ray.address=<head>:<port>."
        )
    concurrent = sum(fits(n, cpus, gpus) for n in nodes)
    if concurrent == 0:
        have = ", ".join(sorted({f"{n.cpus:g} CPUs/{n.gpus:g} GPUs" for n in nodes}))
        raise ValueError(
            f"No node of the Ray cluster holds one trial of resources.cpus_per_trial={cpus:g} and "
            f"resources.gpus_per_trial={gpus:g} (nodes: {have}), so trials would wait forever; lower "
            "them or add a larger node."
        )
    teacher_gpus = 1 if gpu_nodes and device != "cpu" else 0
    # The teacher runs before any trial: a card's share of its node's CPUs (at least a trial's), or on a CPU-only
    # cluster a whole node.
    teacher_cpus = float(
        max(max(math.floor(n.cpus / n.gpus), min(cpus, n.cpus)) for n in gpu_nodes)
        if teacher_gpus
        else max(n.cpus for n in nodes)
    )
    per_trial = (
        f"{gpus:g} GPU per trial ({round(1 / gpus)} per card)"
        if 0 < gpus < 1
        else f"{count(gpus, 'GPU')} per trial"
        if gpus
        else "CPU trials"
    )
    summary = f"{found}: {per_trial}, {count(cpus, 'CPU')} per trial, up to {count(concurrent, 'trial')} at once"
    return TrialResources(cpus, gpus, concurrent, teacher_cpus, teacher_gpus, summary)


# --- folders every node must see --------------------------------------------------------------------------------

# Filesystem types (as /proc/mounts names them) that other machines can mount too: accepted without
# ray.shared_storage=true.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "fuse.ceph",
        "fuse.cephfs",
        "glusterfs",
        "fuse.glusterfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.juicefs",
        "fuse.mountpoint-s3",
        "fuse.rclone",
        "fuse.sshfs",
        "wekafs",
        "panfs",
        "fuse.weka",
        "afs",
    }
)


def mount_type(path: str | Path, mounts: str = "/proc/self/mounts") -> str | None:
    """The filesystem type of the mount holding `path` (the longest matching mount point); None if unknown."""
    target = Path(path).resolve()
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    best, kind = -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].encode().decode("unicode_escape"))  # /proc/mounts escapes spaces as \040
        if (target == point or point in target.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind


def check_shared_folders(nodes: int, folders: Mapping[str, str], shared: bool) -> None:
    """Refuse, before any work, a multi-node cluster with a run folder only this machine sees.

    `folders`: key -> value (storage_path, workdir); URIs are shared by nature, network mounts are known to be, and
    `ray.shared_storage=true` vouches for the rest.
    """
    if nodes <= 1 or shared:
        return
    uses = {"storage_path": "write their checkpoints", "workdir": "read the data caches and the teacher"}
    for key, value in folders.items():
        kind = mount_type(value) if "://" not in value else None
        if "://" in value or kind in NETWORK_FILESYSTEMS:
            continue
        fix = (
            "or use a URI every node reaches (storage_path=s3://<bucket>/sweeps)"
            if key == "storage_path"
            else "or run on one node"
        )
        raise ValueError(
            f"{key}={value} is a folder on this machine ({kind or 'filesystem unknown'}, not a network "
            f"mount) but the Ray cluster has {nodes} nodes, whose trials {uses[key]} there. Put it on "
            f"a filesystem every node mounts at the same path and pass ray.shared_storage=true, {fix}."
        )


# --- the teacher, as a Ray task ---------------------------------------------------------------------------------


def _teacher_task(config: dict[str, Any], data: Any) -> dict[str, Any]:
    """trainable.teacher.teacher_inputs in a Ray worker, with the run's log level (a worker logs WARNING only)."""
    from trainable.teacher import teacher_inputs

    logging.basicConfig(level=config["log_level"], format="%(levelname)s %(name)s: %(message)s")
    return teacher_inputs(config, data)


def run_teacher(config: dict[str, Any], data: Any, resources: TrialResources) -> dict[str, Any]:
    """Train or load the teacher and cache its logits in a Ray task (a whole GPU when the cluster has one), so the
    driver never trains and never touches CUDA. The caches under the workdir make a resume or a second sweep reuse
    it; a task whose node dies is retried by Ray and resumes the teacher from its last epoch."""
    import ray
    from ray.exceptions import RayTaskError

    task = ray.remote(_teacher_task).options(
        num_cpus=resources.teacher_cpus, num_gpus=resources.teacher_gpus, name="teacher", max_retries=3
    )
    logger.info("Teacher task: %g CPUs, %d GPU", resources.teacher_cpus, resources.teacher_gpus)
    try:
        return ray.get(task.remote(config, data))
    except RayTaskError as err:
        from common.cli import USER_ERRORS

        if isinstance(err.cause, USER_ERRORS):  # a setting the teacher refused: its one line, not a remote traceback
            raise err.cause from None
        raise
