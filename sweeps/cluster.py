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
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)

TOKEN_HELP = ("put the head's token (`ray get-auth-token` on the head prints it) in ~/.ray/auth_token here, "
              "or set RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file>")
LOCAL_HELP = "or use ray.address=null for a local Ray"
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def resolve_gpus(requested: Any, address: str | None) -> float:
    import torch

    if requested in (None, "auto"):
        return 0.25 if torch.cuda.is_available() else 0.0
    gpus = float(requested)
    if gpus > 0 and address in (None, "", "local") and not torch.cuda.is_available():
        raise ValueError(f"resources.gpus_per_trial={gpus} but this machine has no CUDA GPU (trials would wait "
                         "forever); use resources.gpus_per_trial=0 or join a GPU cluster with ray.address.")
    return gpus


def one_line(err: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
        raise ValueError(f"{label} is unreachable ({one_line(err)}). Start the cluster (`ray start --head "
                         f"--port {port}` on {host}) {LOCAL_HELP}.") from err
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
            raise ValueError(f"{label} answers but is not a Ray GCS or Ray Client port ({why}); use the head's "
                             "`ray start --port` (or ray://<head>:<ray-client-server-port>), not the dashboard "
                             "port.")


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
            raise ValueError(f"RAY_AUTH_TOKEN_PATH={path} is not a readable file holding the token; fix it, "
                             "or unset it and use ~/.ray/auth_token or RAY_AUTH_TOKEN.")
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
        raise ValueError(f"{label}: the cluster rejected the Ray auth token from {token_source()}; "
                         f"{TOKEN_HELP}.")
    if mode:
        raise ValueError(f"{label}: the cluster requires Ray token authentication but RAY_AUTH_MODE={mode} here; "
                         f"unset it and {TOKEN_HELP}.")
    source = token_source()
    if source is None:
        raise ValueError(f"{label}: the cluster requires Ray token authentication and no token was found on this "
                         f"machine; {TOKEN_HELP}.")
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
            raise ValueError(f"{label}: the Ray GCS at {gcs_address} did not answer ({one_line(err)}); is the "
                             f"head up and the same Ray version (`ray --version`)? {LOCAL_HELP}.") from err
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
                ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=10)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                return False
            raise ValueError(f"{label}: the Ray Client server did not answer ({err.code().name}: "
                             f"{one_line(err.details() or '')}); {LOCAL_HELP}.") from err
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
        raise ValueError(f"{label} found no cluster started with `ray start` on this machine (no {recorded}); "
                         f"start one, pass ray.address=<head>:<port>, {LOCAL_HELP}.")
    check_reachable(resolved, label=f"{label} (the cluster {resolved} recorded in {recorded}; if that head is "
                                        "gone, delete the file)")
    return resolved


def start_ray(address: str | None, num_cpus: int | None, gpus: float) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    label = f"ray.address={address}"
    if address in (None, "", "local"):
        try:
            # "local", not None: ray.init() would join the cluster an earlier `ray start` recorded on this machine.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as err:
            raise ValueError(f"Could not start a local Ray (ray.address=null): {one_line(err)}") from err
    else:
        address = str(address).strip()
        if address.startswith("ray://"):
            from ray._private.utils import get_ray_client_dependency_error

            if get_ray_client_dependency_error() is not None:
                raise ValueError(f"{label} needs the Ray Client (`pip install \"ray[client]=={ray.__version__}\"`), "
                                 "or pass the head's GCS address ray.address=<head>:<port> instead.")
            check_reachable(address, label=label)
            authenticate(label, client_accepts(address, label))
            target = address
        else:
            target = resolve_auto(label) if address == "auto" else address
            if address != "auto":
                check_reachable(target, label=label)
            authenticate(label, gcs_accepts(target, label))
        try:
            ray.init(address=target, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as err:
            raise ValueError(f"Could not connect to Ray at {label}: {one_line(err)}; {LOCAL_HELP}.") from err
    if gpus > 0 and ray.cluster_resources().get("GPU", 0) < gpus:
        raise ValueError(f"resources.gpus_per_trial={gpus} but the Ray cluster has fewer GPUs; "
                         "use resources.gpus_per_trial=0 or add GPU nodes.")
