"""sweeps/cluster.py against real Ray processes: a `ray start --head` with token auth, a stale recorded cluster,
and a two-node ray.cluster_utils.Cluster running Tune trials on both nodes.

Every Ray here runs in a private, short temp dir (RAY_TMPDIR) with a private HOME (~/.ray/auth_token), so nothing
touches the machine's shared /tmp/ray/ray_current_cluster or ~/.ray; drivers run in subprocesses (one ray.init per
process) and every head is stopped through its own process group, never with a blanket `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from common.config import run_defaults
from sweeps.cluster import start_ray

DEVICE = run_defaults()["device"]  # the schema's device= (auto)
REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).with_name("ray"))
TOKEN = "akds-test-token-0123456789abcdef0123456789abcdef"
try:
    import grpc  # noqa: F401  (Ray Client, ray://, needs `ray[client]`)

    HAS_RAY_CLIENT = True
except ImportError:
    HAS_RAY_CLIENT = False

DRIVER = r"""
import json, sys, time
t0 = time.time()
import ray
from sweeps.cluster import start_ray
try:
    start_ray(sys.argv[1], None)
except ValueError as err:
    print("RESULT " + json.dumps({"error": str(err), "s": time.time() - t0}))
    sys.exit(0)
out = {"resources": ray.cluster_resources(), "s": time.time() - t0}
if not sys.argv[1].startswith("ray://"):
    out["gcs"] = ray.get_runtime_context().gcs_address
    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()
    out["task_node"] = ray.get(where.remote())
    out["nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env(tmp: Path, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS / RAY_AUTH_* leaks
    env.update(
        HOME=str(home),
        RAY_TMPDIR=str(tmp),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    )
    env.update(extra)
    return env


def run_py(code: str, args: list[str], env: dict[str, str], timeout: float = 90) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def sandbox():
    path = Path(tempfile.mkdtemp(prefix="akc", dir="/tmp"))  # short: Ray's unix sockets live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def head(sandbox):
    """A plain `ray start --head` on a machine with ~/.ray/auth_token (which any local ray.init() writes): Ray 2.60
    then turns token authentication on by itself (the missing-token test below proves the head enforces it)."""
    home, tmp = sandbox / "home", sandbox / "head"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(TOKEN)
    tmp.mkdir()
    port, marker = free_port(), f"akds_head_{os.getpid()}"
    cmd = [
        RAY_CLI,
        "start",
        "--head",
        "--block",
        "--port",
        str(port),
        "--num-cpus",
        "1",
        "--include-dashboard=false",
        "--disable-usage-stats",
        "--resources",
        json.dumps({marker: 1}),
        "--dashboard-agent-listen-port",
        str(free_port()),
    ]
    client_port = None
    if HAS_RAY_CLIENT:
        client_port = free_port()
        cmd += ["--ray-client-server-port", str(client_port)]
    log = open(sandbox / "head.log", "w")
    proc = subprocess.Popen(cmd, env=ray_env(tmp, home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    recorded = tmp / "ray" / "ray_current_cluster"
    try:
        deadline = time.time() + 90
        while not recorded.exists() or not recorded.read_text().strip():
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{(sandbox / 'head.log').read_text()}"
            assert time.time() < deadline, f"ray start not up in 90 s:\n{(sandbox / 'head.log').read_text()}"
            time.sleep(0.5)
        yield {
            "port": port,
            "client_port": client_port,
            "marker": marker,
            "home": home,
            "tmp": tmp,
            "recorded": recorded.read_text().strip(),
        }
    finally:
        stop_group(proc)
        log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` stops its Ray processes; SIGKILL whatever of its group is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


def assert_joined(result: dict, head: dict, client: bool = False) -> None:
    assert "error" not in result, result["error"]
    assert result["resources"].get(head["marker"]) == 1, result  # the test head's own custom resource
    assert result["resources"].get("CPU") == 1, result
    if not client:
        assert result["gcs"].rpartition(":")[2] == str(head["port"])
        assert result["task_node"] in result["nodes"]


@pytest.mark.parametrize("form", ["auto", "host:port"])
@pytest.mark.slow
def test_auto_and_host_port_join_a_token_auth_head(head, form):
    # The head's machine: its ~/.ray/auth_token, RAY_AUTH_MODE unset in the driver (Ray itself only turns token
    # mode on for address=auto; host:port used to retry "Unauthenticated" for 20 s and fail).
    address = "auto" if form == "auto" else f"127.0.0.1:{head['port']}"
    result = run_py(DRIVER, [address], ray_env(head["tmp"], head["home"]))
    assert_joined(result, head)


@pytest.mark.skipif(
    not HAS_RAY_CLIENT,
    reason="ray:// needs the Ray Client (`pip install ray[client]`: grpcio), "
    "which this venv does not have; `ray start` then starts no client "
    "server (see test_ray_client_without_extras_says_so)",
)
@pytest.mark.slow
def test_ray_client_address_joins_a_token_auth_head(head, sandbox):
    address = f"ray://127.0.0.1:{head['client_port']}"
    result = run_py(DRIVER, [address], ray_env(head["tmp"], head["home"]))
    assert_joined(result, head, client=True)
    (sandbox / "client_home").mkdir(exist_ok=True)
    missing = run_py(DRIVER, [address], ray_env(head["tmp"], sandbox / "client_home"))
    assert "no token was found" in missing.get("error", "") and "RAY_AUTH_TOKEN=" in missing["error"], missing
    assert missing["s"] < 15 and "\n" not in missing["error"], missing


@pytest.mark.skipif(HAS_RAY_CLIENT, reason="ray[client] is installed: test_ray_client_address_joins... runs")
def test_ray_client_without_extras_says_so():
    with pytest.raises(ValueError, match=r"ray\[client\]") as err:
        start_ray("ray://127.0.0.1:10001", None)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_missing_and_wrong_token_say_how_to_provide_it(head, sandbox):
    # Another machine: no ~/.ray/auth_token, no RAY_AUTH_TOKEN.
    empty_home = sandbox / "empty_home"
    empty_home.mkdir(exist_ok=True)
    (sandbox / "nohead").mkdir(exist_ok=True)
    address = f"127.0.0.1:{head['port']}"
    missing = run_py(DRIVER, [address], ray_env(sandbox / "nohead", empty_home))
    wrong = run_py(DRIVER, [address], ray_env(sandbox / "nohead", empty_home, RAY_AUTH_TOKEN="not-the-token"))
    for result, says in ((missing, "no token was found"), (wrong, "rejected the Ray auth token from RAY_AUTH_TOKEN")):
        msg = result.get("error", "")
        assert says in msg and f"ray.address={address}" in msg, result
        assert "~/.ray/auth_token" in msg and "RAY_AUTH_TOKEN=" in msg and "RAY_AUTH_TOKEN_PATH=" in msg
        assert "ray get-auth-token" in msg and "\n" not in msg
        assert result["s"] < 15, result  # an answer, not Ray's 20 s of retries


STALE = r"""
import json, sys, time
import ray
from ray._private.services import canonicalize_bootstrap_address
from sweeps.cluster import start_ray
out = {"ray_init_would_join": canonicalize_bootstrap_address(None)}  # what a bare ray.init() would dial
t0 = time.time()
try:
    start_ray("auto", None)
except ValueError as err:
    out["auto_error"], out["auto_s"] = str(err), time.time() - t0
t0 = time.time()
start_ray(None, 1)
out["null_s"] = time.time() - t0
out["gcs"] = ray.get_runtime_context().gcs_address
out["cpus"] = ray.cluster_resources().get("CPU")
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_null_starts_a_fresh_local_ray_despite_a_dead_recorded_cluster(sandbox):
    # What a head killed without `ray stop` leaves: ray_current_cluster naming an address nobody listens on.
    tmp, home = sandbox / "stale", sandbox / "stale_home"
    (tmp / "ray").mkdir(parents=True)
    home.mkdir()
    dead = f"127.0.0.1:{free_port()}"
    (tmp / "ray" / "ray_current_cluster").write_text(dead)
    result = run_py(STALE, [], ray_env(tmp, home), timeout=120)
    # The precondition of the bug: a plain ray.init() would dial the dead head (Ray maps 127.0.0.1 to the node IP).
    assert result["ray_init_would_join"].rpartition(":")[2] == dead.rpartition(":")[2], result
    assert result["auto_s"] < 10 and "\n" not in result["auto_error"], result
    assert "ray.address=auto" in result["auto_error"] and "ray_current_cluster" in result["auto_error"], result
    assert "unreachable" in result["auto_error"], result
    assert result["gcs"] != dead and result["cpus"] == 1, result
    assert result["null_s"] < 45, result  # a local start, not minutes of "Failed to get cluster ID"


def test_unreachable_or_wrong_port_fails_in_seconds():
    t0 = time.time()
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match=rf"ray\.address={dead} is unreachable") as err:
        start_ray(dead, None)
    assert "ray start --head" in str(err.value) and "ray.address=null" in str(err.value)
    with pytest.raises(ValueError, match="is not host:port"):
        start_ray("headnode", None)

    # Something that is not Ray on the port (an HTTP server, the dashboard): ray.init would retry for minutes.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]

    def answer_http() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer_http, daemon=True)
    thread.start()
    try:
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            if address.startswith("ray://") and not HAS_RAY_CLIENT:
                continue
            with pytest.raises(ValueError, match="is not a Ray GCS or Ray Client port") as err:
                start_ray(address, None)
            assert "\n" not in str(err.value)
    finally:
        server.close()
    assert time.time() - t0 < 10


TWO_NODES = r"""
import json, time
import ray
from ray import tune
from ray.cluster_utils import Cluster
from sweeps.cluster import start_ray

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"akds_head": 1}})
try:
    cluster.add_node(num_cpus=1, resources={"akds_worker": 1})
    cluster.wait_for_nodes()
    start_ray(cluster.address, None)

    def trial(config):
        time.sleep(3)  # both 1-CPU trials run at once, so one must be on each 1-CPU node
        tune.report({"node": ray.get_runtime_context().get_node_id(), "x": config["x"]})

    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 1}),
        param_space={"x": tune.grid_search([0, 1])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=__import__("sys").argv[1], verbose=0),
    )
    results = tuner.fit()
    out = {
        "trial_nodes": sorted(r.metrics["node"] for r in results),
        "errors": [str(r.error) for r in results if r.error],
        "cluster_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        "resources": ray.cluster_resources(),
    }
    ray.shutdown()
finally:
    cluster.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_nodes(sandbox):
    tmp, home = sandbox / "two", sandbox / "two_home"
    tmp.mkdir()
    home.mkdir()
    result = run_py(TWO_NODES, [str(sandbox / "two_results")], ray_env(tmp, home), timeout=180)
    assert not result["errors"], result
    assert result["resources"].get("akds_head") == 1 and result["resources"].get("akds_worker") == 1
    assert len(result["cluster_nodes"]) == 2
    assert len(set(result["trial_nodes"])) == 2 and set(result["trial_nodes"]) == set(result["cluster_nodes"])


# --- resources from the cluster, shared folders, the teacher task, node loss ------------------------------------


def test_cpu_only_head_with_gpu_workers_gets_gpu_trials():
    from sweeps.cluster import Node, plan_resources

    head, workers = Node(cpus=8, gpus=0), [Node(cpus=16, gpus=4), Node(cpus=16, gpus=4)]
    plan = plan_resources("auto", "auto", [head, *workers], DEVICE)
    assert plan.gpus_per_trial == 0.25 and plan.cpus_per_trial == 1 and plan.concurrent == 32
    assert plan.summary.startswith("3 nodes, 40 CPUs, 8 GPUs: 0.25 GPU per trial (4 per card), 1 CPU per trial")
    assert (plan.teacher_gpus, plan.teacher_cpus) == (1, 4)  # a whole card, and that card's share of its node
    # a GPU node with few CPUs gets fewer trials per card, each with a CPU
    assert plan_resources("auto", "auto", [head, Node(cpus=2, gpus=1)], DEVICE).gpus_per_trial == 0.5
    # device=cpu: no GPU trials and no GPU for the teacher, whatever the cluster has
    on_cpu = plan_resources("auto", "auto", [head, *workers], device="cpu")
    assert on_cpu.gpus_per_trial == 0 and on_cpu.teacher_gpus == 0 and on_cpu.teacher_cpus == 16
    # the CPU default follows the GPU share: half-card trials put 8 trials on a 16-CPU, 4-GPU node
    assert plan_resources("auto", 0.5, [head, *workers], DEVICE).cpus_per_trial == 2
    assert plan_resources("auto", "auto", [Node(cpus=2, gpus=0)], DEVICE).summary == (
        "1 node, 2 CPUs, no GPU: CPU trials, 1 CPU per trial, up to 2 trials at once"
    )


@pytest.mark.parametrize(
    "cpus, gpus, nodes, message",
    [
        (1, 1, [(8, 0)], "has no CUDA GPU"),  # asked for GPUs the cluster lacks
        (1, 0.3, [(8, 4)], "does not divide a card"),  # 0.3: a tenth of every card idle
        (1, 1.5, [(8, 4)], "is not a whole number of GPUs"),
        (1, 2, [(0, 0), (8, 1), (8, 1)], "No node of the Ray cluster holds one trial"),  # 2 GPUs, but 1 per node
        (32, 0, [(16, 0), (16, 0)], "No node of the Ray cluster holds one trial"),
        ("many", "auto", [(8, 0)], "resources.cpus_per_trial='many' must be auto or a number > 0"),
        (0, "auto", [(8, 0)], "must be auto or a number > 0"),
        (1, -1, [(8, 0)], "resources.gpus_per_trial=-1 must be auto or a number >= 0"),
    ],
)
def test_resources_the_cluster_cannot_hold_are_one_line_errors(cpus, gpus, nodes, message):
    from sweeps.cluster import Node, plan_resources

    with pytest.raises(ValueError, match=message) as err:
        plan_resources(cpus, gpus, [Node(c, g) for c, g in nodes], DEVICE)
    assert "\n" not in str(err.value)


def test_fractions_that_fill_cards_are_accepted():
    from sweeps.cluster import Node, plan_resources

    for gpus, per_card in ((0.5, 2), (0.25, 4), (0.33, 3), (1 / 3, 3), (0.2, 5)):
        assert plan_resources(1, gpus, [Node(16, 1)], DEVICE).concurrent == per_card, gpus
    assert plan_resources(1, 2, [Node(16, 4)], DEVICE).concurrent == 2


def test_multi_node_cluster_refuses_folders_only_this_machine_sees(tmp_path):
    from sweeps.cluster import check_shared_folders, mount_type

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nnas:/export /mnt/shared\\040data nfs4 rw 0 0\n")
    assert mount_type("/mnt/shared data/sweeps", mounts) == "nfs4" and mount_type("/home/x", mounts) == "ext4"
    local = str(tmp_path / "ray_results")
    with pytest.raises(
        ValueError,
        match=r"storage_path=.* is a folder on this machine .* the Ray cluster has 2 "
        r"nodes.*ray\.shared_storage=true.*s3://",
    ) as err:
        check_shared_folders(2, {"storage_path": local}, shared=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="workdir=.*read the data caches"):
        check_shared_folders(3, {"storage_path": "s3://bucket/sweeps", "workdir": str(tmp_path)}, shared=False)
    check_shared_folders(1, {"storage_path": local, "workdir": str(tmp_path)}, shared=False)  # one node: its own disk
    check_shared_folders(2, {"storage_path": local, "workdir": str(tmp_path)}, shared=True)  # vouched for


def test_storage_uri_without_its_pyarrow_filesystem_is_one_line(monkeypatch, tmp_path):
    import pyarrow.fs as pafs

    from common.sweep_layout import check_storage

    assert check_storage(str(tmp_path / "x" / "..")) == str(tmp_path)
    assert check_storage(f"file://{tmp_path}/") == f"file://{tmp_path}"
    monkeypatch.delattr(pafs, "S3FileSystem")  # what a pyarrow built without S3 looks like
    for uri, says in (
        ("s3://bucket/sweeps", "needs pyarrow.fs.S3FileSystem"),
        ("foo://bucket/sweeps", "has no foo:// filesystem"),
    ):
        with pytest.raises(ValueError, match=says) as err:
            check_storage(uri)
        assert "\n" not in str(err.value) and f"storage_path={uri}" in str(err.value)


def test_code_ships_without_data_or_environments(tmp_path):
    from sweeps.cluster import PROJECT_ROOT, code_runtime_env

    env = code_runtime_env([str(PROJECT_ROOT / "work"), "s3://bucket/sweeps", str(tmp_path)])
    assert env["working_dir"] == str(PROJECT_ROOT)
    assert {"/.git/", "/.venv/", "/runs/", "/work/"} <= set(env["excludes"])  # a workdir inside the project too
    assert not any(str(tmp_path) in e for e in env["excludes"])

    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(PROJECT_ROOT, env["excludes"])  # Ray's own matcher
    assert excluded(PROJECT_ROOT / ".venv" / "bin") and excluded(PROJECT_ROOT / "work" / "cache")
    assert not excluded(PROJECT_ROOT / "sweeps" / "run.py") and not excluded(PROJECT_ROOT / "data_prep" / "build.py")


HIDE_PROJECT = """set -e
mount --make-rprivate /
mkdir -p {keep}
mount --bind {root}/.venv {keep}
mount -t tmpfs tmpfs {root}
mkdir {root}/.venv
mount --bind {keep} {root}/.venv
if [ -e {root}/sweeps/run.py ]; then echo visible > {marker}; else echo hidden > {marker}; fi
exec "$@"
"""


def can_hide_folders() -> bool:
    """Whether `unshare -m` (a private mount namespace, root only) works here."""
    return (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    )


class RayNode:
    """One `ray start --block` node in its own session (optionally in a mount namespace hiding the project),
    stopped by killing exactly the processes it started (a node lost, not shut down)."""

    def __init__(self, sandbox: Path, name: str, args: list[str], env: dict[str, str], hide_project: bool = False):
        self.log = open(sandbox / f"{name}.log", "w")
        cmd = [
            RAY_CLI,
            "start",
            "--block",
            "--disable-usage-stats",
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            *args,
        ]
        self.marker = sandbox / f"{name}.sees"
        if hide_project:
            script = HIDE_PROJECT.format(root=REPO, keep=sandbox / f"{name}-venv", marker=self.marker)
            cmd = ["unshare", "-m", "sh", "-c", script, "sh", *cmd]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=sandbox, start_new_session=True
        )

    def descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, rest = stat.read_text().split(" (", 1)
                children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
            except (OSError, IndexError, ValueError):
                continue
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def kill(self) -> None:
        """SIGKILL the node's processes (raylet, its workers and agents), as when its machine dies."""
        for pid in self.descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.log.close()


def wait_for_nodes(address: str, env: dict[str, str], count: int, timeout_s: float = 90) -> None:
    code = (
        "import ray, sys, time\nray.init(address=sys.argv[1], logging_level='ERROR')\n"
        "deadline = time.time() + float(sys.argv[3])\n"
        "while sum(n['Alive'] and n['Resources'].get('CPU', 0) > 0 for n in ray.nodes()) < int(sys.argv[2]):\n"
        "    assert time.time() < deadline, ray.nodes()\n    time.sleep(0.5)\nprint('RESULT {}')\n"
    )
    run_py(code, [address, str(count), str(timeout_s)], env, timeout=timeout_s + 30)


def checkpointed_epochs(exp_dir: Path) -> dict[str, int]:
    """trial id -> the epoch of its latest checkpoint as Tune recorded it (newest experiment state file); {} while
    there is none or it is being written."""
    import ray.cloudpickle as cloudpickle

    try:
        newest = max(exp_dir.glob("experiment_state-*.json"))
        state = json.loads(newest.read_text())
    except (ValueError, OSError):
        return {}
    out = {}
    for trial_json, runtime_json in state["trial_data"]:
        manager = cloudpickle.loads(bytes.fromhex(json.loads(runtime_json)["checkpoint_manager"]["value"]))
        if manager.latest_checkpoint_result is not None:
            out[json.loads(trial_json)["trial_id"]] = manager.latest_checkpoint_result.metrics["epoch"]
    return out


def settled_mid_sweep(exp_dir: Path, last_epoch: int) -> bool:
    """Every trial's last reported epoch (result.json) has its checkpoint recorded, and some trial is mid-way."""
    reported = {}
    for result in exp_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            reported[lines[-1]["trial_id"]] = lines[-1]["epoch"]
    saved = checkpointed_epochs(exp_dir)
    return (
        bool(reported)
        and all(saved.get(t) == e for t, e in reported.items())
        and any(1 <= e < last_epoch for e in reported.values())
    )


def trial_states(exp_dir: Path) -> dict[str, dict]:
    """Tune's record of each trial (status, num_failures) from its newest experiment state file."""
    newest = max(exp_dir.glob("experiment_state-*.json"))
    out = {}
    for trial_json, runtime_json in json.loads(newest.read_text())["trial_data"]:
        runtime = json.loads(runtime_json)
        out[json.loads(trial_json)["trial_id"]] = {
            "status": json.loads(trial_json)["status"],
            "num_failures": runtime["num_failures"],
        }
    return out


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sweep_on_a_cluster_survives_losing_a_worker_node(sandbox):
    """The real CLI joins a head that offers trials nothing (0 CPUs, no GPU) by address; its worker has a GPU (declared
    to Ray: no CUDA here, so trials hold a GPU share but train on the CPU). The worker dies mid-sweep and another one
    joins: every trial ends once, none restarted from epoch 1, one FINISHED MLflow run each, and the default
    scheduler's rungs and the Optuna study hold each trial once. The workers run in a mount namespace where the
    project folder is empty: the code reaches them with the job."""
    import optuna

    from tests.test_sweep import ROOT, last_results, mlflow_runs, rung_records, searcher_study, sweep_cmd, trial_epochs

    tmp, home, work = sandbox / "mn", sandbox / "mn_home", sandbox / "mn_work"
    for folder in (tmp, home, work):
        folder.mkdir()
    # Ray's own switches for a faster verdict on a dead node (default: 5 missed checks 3 s apart).
    env = ray_env(tmp, home, RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    port = free_port()
    hide = can_hide_folders()
    head = RayNode(
        sandbox,
        "mn_head",
        ["--head", "--port", str(port), "--num-cpus", "0", "--num-gpus", "0", "--include-dashboard=false"],
        env,
    )
    worker_args = ["--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--num-gpus", "1"]
    nodes, driver = [head], None
    address = f"127.0.0.1:{port}"
    try:
        nodes.append(RayNode(sandbox, "mn_worker_a", worker_args, env, hide_project=hide))
        wait_for_nodes(address, env, 1)
        args = [
            "space=quick",
            "num_samples=3",
            "name=mn",
            f"ray.address={address}",
            "resources.max_concurrent_trials=2",
            "train.batch_size=4",
        ]
        started = time.monotonic()
        refused = subprocess.run(sweep_cmd(work, *args), capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        assert refused.returncode == 2 and "ray.shared_storage=true" in refused.stderr, refused.stderr[-2000:]
        assert "storage_path=" in refused.stderr and "Traceback" not in refused.stderr
        assert time.monotonic() - started < 60 and not (work / "data").exists()  # refused before any data work

        driver = subprocess.Popen(
            sweep_cmd(work, *args, "ray.shared_storage=true"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True).start()
        exp_dir = work / "ray_results" / "mn"
        deadline = time.time() + 240
        # Kill when every trial's last reported epoch has its checkpoint recorded by Tune and one trial is mid-way.
        # Ray Tune registers a reported checkpoint in a second round trip to the trial (a save task); a node lost in
        # between restarts that trial from its previous checkpoint, by Ray's design: not what this test is about.
        while not (exp_dir.is_dir() and settled_mid_sweep(exp_dir, last_epoch=3)):
            assert driver.poll() is None and time.time() < deadline, "".join(lines[-40:])
            time.sleep(0.05)
        nodes[1].kill()  # the worker node is lost mid-trial
        before = checkpointed_epochs(exp_dir)
        nodes.append(RayNode(sandbox, "mn_worker_b", worker_args, env, hide_project=hide))
        driver.wait(timeout=300)
        output = "".join(lines)
        assert driver.returncode == 0, output[-4000:]
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        for node in reversed(nodes):
            if node.proc.poll() is None:
                node.kill()
    # resources came from the cluster (a CPU-only head with a GPU worker: GPU trials), not from this machine
    assert "Ray: 2 nodes, 2 CPUs, 1 GPU: 0.5 GPU per trial (2 per card), 1 CPU per trial" in output, output[:3000]
    epochs = trial_epochs(exp_dir)
    assert len(epochs) == 3, (epochs, output[-6000:])
    # none restarted from epoch 1: a trial on the lost node went on after the checkpoint Tune had recorded for it (to
    # the end, or until the rungs stopped it); an epoch it reported in the instant between the check above and the
    # kill, before Tune had saved it, is trained and reported again
    by_id = {
        json.loads((exp_dir / k / "result.json").read_text().splitlines()[0])["trial_id"]: e for k, e in epochs.items()
    }
    for trial_id, e in by_id.items():
        restarts = [e[i] for i in range(1, len(e)) if e[i] <= e[i - 1]]
        assert all(r == before.get(trial_id, 0) + 1 > 1 for r in restarts), (before, by_id, output[-6000:])
        assert sorted(set(e)) == list(range(1, e[-1] + 1)), (before, by_id)
    states = trial_states(exp_dir)
    assert all(s["status"] == "TERMINATED" for s in states.values()), states
    restarted = [t for t, s in states.items() if s["num_failures"] > 0]
    assert restarted, states  # the trials running on the lost node were restarted from their checkpoints
    runs = mlflow_runs(work, "mn")
    assert len(runs) == 3 and all(status == "FINISHED" for _, status in runs), runs
    ids = {json.loads((exp_dir / k / "result.json").read_text().splitlines()[0])["trial_id"] for k in epochs}
    assert set(rung_records(exp_dir)[1]) == ids  # ParetoASHA recorded every trial at its first rung, once
    study = searcher_study(exp_dir).get_trials(deepcopy=False)
    finished = [r for r in last_results(exp_dir).values() if r["epoch"] == 3]
    assert len(study) == 3 and not [t for t in study if t.state == optuna.trial.TrialState.RUNNING], study
    assert sorted(t.values for t in study if t.state == optuna.trial.TrialState.COMPLETE) == sorted(
        [r["val_acc"], r["target_macs"]] for r in finished
    )  # the study learned each final result once
    assert list((work / "teachers").rglob("checkpoint.pt"))  # trained by a task on the worker (the head has no CPU)
    if hide:
        assert {(sandbox / f"{n}.sees").read_text().strip() for n in ("mn_worker_a", "mn_worker_b")} == {"hidden"}
    print(
        f"trials {len(epochs)}, restarted from a checkpoint {len(restarted)}, epochs {sorted(epochs.values())}, "
        f"MLflow runs {len(runs)} FINISHED"
    )


SPIED_DRIVER = r"""
import json, runpy, sys
import torch
import trainable.loop

# Installed before anything imports `train`, so every `from trainable.loop import train` in the driver gets the spy.
record = {"train": 0, "cuda": []}
def no_training(*args, **kwargs):
    record["train"] += 1
    raise AssertionError("the driver process trained a model")
trainable.loop.train = no_training
for name in ("is_available", "init", "_lazy_init", "device_count", "current_device", "set_device",
             "is_bf16_supported", "get_device_name", "mem_get_info"):
    def spy(*args, _name=name, _original=getattr(torch.cuda, name), **kwargs):
        record["cuda"].append(_name)
        return _original(*args, **kwargs)
    setattr(torch.cuda, name, spy)
sys.argv = ["sweeps/run.py", *sys.argv[1:]]
code = 0
try:
    runpy.run_path("sweeps/run.py", run_name="__main__")
except SystemExit as exit:
    code = exit.code
record["cuda_initialized"] = torch.cuda.is_initialized()
print("DRIVER " + json.dumps(record), flush=True)
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_teacher_trains_in_a_ray_task_and_the_driver_never_touches_cuda(tmp_path):
    """The real CLI with spies in the driver process only (Ray's workers are other processes): no call of
    trainable.loop.train and no torch.cuda call there, while the teacher's folder gets its checkpoint and logits; a
    second sweep on the same workdir reuses them."""
    from tests.test_sweep import ROOT, Driver, stage_started, sweep_cmd, trial_epochs

    args = sweep_cmd(tmp_path, "space=quick", "num_samples=1", "name=tt", "scheduler.name=fifo")[2:]
    out = subprocess.run(
        [sys.executable, "-c", SPIED_DRIVER, *args], capture_output=True, text=True, timeout=360, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads(out.stdout.rsplit("DRIVER ", 1)[1].splitlines()[0])
    assert record == {"train": 0, "cuda": [], "cuda_initialized": False}, record
    teacher = tmp_path / "teachers"  # trainable/teacher.py's layout: a checkpoint and train-split logits in it
    assert list(teacher.rglob("checkpoint.pt")) and list(teacher.rglob("logits-train.*"))
    (epochs,) = trial_epochs(tmp_path / "ray_results" / "tt").values()
    assert epochs == [1, 2, 3]  # the trial trained with the task's logits
    stamps = {path: path.stat().st_mtime_ns for path in teacher.rglob("*") if path.is_file()}
    # A second sweep on the same workdir: the teacher task finds everything cached (stopped once its search starts).
    Driver(*sweep_cmd(tmp_path, "space=quick", "num_samples=1", "name=tt2")).kill_when(
        lambda d: stage_started(d, "search"), timeout_s=240
    )
    assert {path: path.stat().st_mtime_ns for path in teacher.rglob("*") if path.is_file()} == stamps


def test_resume_takes_where_to_run_from_its_command_line():
    """resume=true ray.address=<another head>: the saved sweep continues on the cluster named now; the ray.* and
    resources.* keys not given keep their saved values, and keys a saved sweep predates get today's defaults."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from common import cli
    from common.config import upgrade_saved_settings
    from sweeps.run import runtime_settings
    from tests.conftest import CONF_DIR

    overrides = ["resume=true", "name=old", "ray.address=newhead:6379"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = cli.compose("sweep", overrides)
        with_hydra = compose("sweep", overrides=overrides, return_hydra_config=True)  # what @hydra.main records
    saved = {
        "space": "quick",
        "ray": {"address": "oldhead:6379", "num_cpus": None},
        "resources": {"cpus_per_trial": 2, "gpus_per_trial": 0.5, "max_concurrent_trials": None},
    }
    HydraConfig.instance().set_config(with_hydra)
    try:
        sweep = runtime_settings(config, upgrade_saved_settings(saved))  # as sweeps/run.py's main calls it
    finally:
        HydraConfig.instance().cfg = None
    assert sweep["space"] == "quick"
    assert sweep["ray"] == {"address": "newhead:6379", "num_cpus": None, "shared_storage": False}
    assert sweep["resources"] == {
        "cpus_per_trial": 2,
        "gpus_per_trial": 0.5,
        "max_concurrent_trials": None,
        "max_failures": 3,
    }
