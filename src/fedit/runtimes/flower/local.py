"""A local Flower federation on 127.0.0.1: a SuperLink, N SuperNodes, ``flwr run``.

For a one-machine trial (``fedit flower local``) and for the tests. Every process is
started in a session of its own and stopped by process group on exit, so the
``flower-superexec``/``flwr-clientapp`` children of a node go with it. Each component
gets its own ``FLWR_HOME`` under the work folder, and its log file there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedit.config import RunConfig, load_config
from fedit.data.clients import with_client_count
from fedit.errors import FeditError
from fedit.federation.rundir import named

Log = Callable[[str], None]

REPO = Path(__file__).resolve().parents[4]  # a fedit checkout (editable install)
APP_DIR = REPO / "flower-app"
CREDENTIALS_SCRIPT = REPO / "scripts" / "flower-credentials.sh"
ISOLATIONS = ("subprocess", "process")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once something listens on 127.0.0.1:``port``; FeditError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FeditError(f"the process for port {port} exited with {proc.returncode}")
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(0.5)
            s.connect(("127.0.0.1", port))
            return
        time.sleep(0.2)
    raise FeditError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def make_credentials(out: Path, nodes: int, extra_sans: str = "") -> Path:
    """Run ``scripts/flower-credentials.sh``: CA, server certificate, node keys in ``out``."""
    if not CREDENTIALS_SCRIPT.is_file():
        raise FeditError(f"{CREDENTIALS_SCRIPT} not found: run from a fedit checkout")
    subprocess.run(["bash", str(CREDENTIALS_SCRIPT), str(out), str(nodes), extra_sans],
                   check=True, capture_output=True, timeout=60)
    return out


def _exe(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FeditError(f"{name} not found: pip install -e '.[flower]'")
    return found


@dataclasses.dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None


class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1 (a context manager: ``stop()`` on exit).

    Parameters
    ----------
    workdir : Path
        Logs, FLWR_HOMEs, credentials and the run-config file go here.
    tls : bool
        TLS with a private CA made by ``scripts/flower-credentials.sh``.
    auth : bool
        SuperNode authentication: only the nodes whose public key was registered join.
    isolation : str
        ``process`` (the default: one long-lived ``fedit flower worker`` per node keeps
        the model and the tokenised data between rounds) or ``subprocess`` (Flower's own
        default: a new ClientApp process per message loads them again every round).
    """

    def __init__(self, workdir: Path, *, tls: bool = False, auth: bool = False,
                 isolation: str = "process", log: Log = print) -> None:
        if isolation not in ISOLATIONS:
            raise FeditError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.workdir, self.tls, self.auth, self.isolation = workdir, tls, auth, isolation
        self.log = log
        self.procs: list[Proc] = []
        self.nodes: dict[int, list[Proc]] = {}
        self.runtime_ports: dict[int, int] = {}  # node index -> its runtime API's port
        self.port = 0
        self.node_threads = 0  # torch threads a node's ClientApp uses; 0 = torch decides
        self.creds = workdir / "credentials"
        workdir.mkdir(parents=True, exist_ok=True)

    # -- processes -----------------------------------------------------------------------
    def _env(self, home: str) -> dict[str, str]:
        env = dict(os.environ, FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
        if home.startswith("node-") and self.node_threads:
            # N nodes on one machine: N x all-cores torch threads would oversubscribe it
            env.setdefault("OMP_NUM_THREADS", str(self.node_threads))
        env["FLWR_HOME"] = str(self.workdir / f"home-{home}")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
        return env

    def _start(self, name: str, cmd: Sequence[str], home: str) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self._env(home),
                                     cwd=self.workdir, start_new_session=True)
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def _tls_args(self, server: bool) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        c = self.creds
        if server:
            return ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile",
                    str(c / "server.pem"), "--ssl-keyfile", str(c / "server.key")]
        return ["--root-certificates", str(c / "ca.crt")]

    def start_superlink(self, nodes: int) -> None:
        """Credentials when asked, then the SuperLink; returns once it listens."""
        if self.tls or self.auth:
            make_credentials(self.creds, nodes)
        self.node_threads = max(1, (os.cpu_count() or 1) // max(1, nodes))
        self.port = free_port()
        cmd = [_exe("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation", *self._tls_args(server=True)]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        link = self._start("superlink", cmd, "superlink")
        wait_for_port(self.port, 60, link.popen)
        self._write_connection()
        self.log(f"SuperLink on 127.0.0.1:{self.port} (tls={self.tls}, auth={self.auth})")

    def _write_connection(self) -> None:
        conn = [f'address = "127.0.0.1:{self.port}"']
        conn.append(f"root-certificates = {json.dumps(str(self.creds / 'ca.crt'))}"
                    if self.tls else "insecure = true")
        text = '[superlink]\ndefault = "local"\n\n[superlink.local]\n' + "\n".join(conn) + "\n"
        (self.workdir / "home-cli").mkdir(exist_ok=True)
        (self.workdir / "home-cli" / "config.toml").write_text(text, encoding="utf-8")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this federation's SuperLink."""
        return subprocess.run([_exe("flwr"), *args], env=self._env("cli"), cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout)

    def register(self, key: int | Path) -> None:
        """Register a SuperNode's public key (``node-K.pub`` or a path) with the SuperLink."""
        pub = self.creds / f"node-{key}.pub" if isinstance(key, int) else key
        res = self.flwr("supernode", "register", str(pub), "local")
        if res.returncode != 0:
            raise FeditError(f"flwr supernode register {pub} failed: "
                             f"{(res.stdout + res.stderr).strip()[-500:]}")

    def start_node(self, index: int, node_config: str,
                   key: Path | str | None = "auto") -> list[Proc]:
        """SuperNode ``index`` (and its worker with ``isolation="process"``).

        ``key``: the private key to authenticate with; ``"auto"``: ``node-<index>`` of the
        credentials when auth is on; None: none."""
        runtime_port = free_port()
        cmd = [_exe("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
               "--port", str(runtime_port), "--node-config", node_config,
               "--isolation", self.isolation, "--max-wait-time", "120",
               *self._tls_args(server=False)]
        if key == "auto":
            key = self.creds / f"node-{index}" if self.auth else None
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        self.nodes[index] = [self._start(f"node-{index}", cmd, f"node-{index}")]
        self.runtime_ports[index] = runtime_port
        if self.isolation == "process":
            self.start_worker(index)
        return self.nodes[index]

    def start_worker(self, index: int, max_tasks: int | None = None) -> Proc:
        """A ``fedit flower worker`` that takes SuperNode ``index``'s ClientApp tasks
        (``isolation="process"``), stopped with the node; ``max_tasks``: it exits after
        that many tasks."""
        procs = self.nodes[index]
        cmd = [sys.executable, "-m", "fedit.runtimes.flower.worker",
               "--runtime-api-address", f"127.0.0.1:{self.runtime_ports[index]}",
               "--parent-pid", str(procs[0].popen.pid)]
        if max_tasks is not None:
            cmd += ["--max-tasks", str(max_tasks)]
        name = f"worker-{index}" + (f"-{len(procs)}" if len(procs) > 1 else "")
        procs.append(self._start(name, cmd, f"node-{index}"))
        return procs[-1]

    def kill_node(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill node ``index`` and everything it started (a crashed machine)."""
        procs = self.nodes.get(index, [])
        family = [pid for proc in procs for pid in _descendants(proc.popen.pid)]
        for proc in procs:
            _signal_group(proc.popen, sig)
        _signal_pids(family, sig)
        for proc in self.nodes.get(index, []):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)

    def stop(self) -> None:
        """Stop every process started here and all their descendants (the SuperLink's
        ``flower-superexec`` runs in a session of its own): SIGTERM, SIGKILL after 5 s."""
        family = [pid for proc in self.procs for pid in _descendants(proc.popen.pid)]
        for proc in reversed(self.procs):
            _signal_group(proc.popen, signal.SIGTERM)
        _signal_pids(family, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            _signal_group(proc.popen, signal.SIGKILL)  # the group: orphans too
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
        _signal_pids(family, signal.SIGKILL)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the job -------------------------------------------------------------------------
    def submit(self, config: Path, overrides: Sequence[str] = (),
               app: Path = APP_DIR) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``flwr run`` of the fedit app (streaming its log); returns it and the run
        folder its ServerApp will write."""
        cfg, sets = resolve_run(config, overrides)
        run_config = self.workdir / "run-config.toml"
        run_config.write_text(f"config = {json.dumps(str(config.resolve()))}\n"
                              f"set = {json.dumps(shlex.join(sets))}\n", encoding="utf-8")
        cmd = [_exe("flwr"), "run", str(app), "local", "-c", str(run_config), "--stream"]
        proc = self._start("flwr-run", cmd, "cli")
        return proc.popen, Path(cfg.output_dir) / cfg.name


def resolve_run(config: Path, overrides: Sequence[str]) -> tuple[RunConfig, list[str]]:
    """The checked config, and overrides that also pin the run folder (absolute path)."""
    cfg = with_client_count(load_config(config, list(overrides)))  # a client folder counts
    sets = list(overrides)
    if not cfg.name:
        cfg = named(cfg, config.stem)
        sets.append(f"name={json.dumps(cfg.name)}")
    cfg = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()))
    sets.append(f"output_dir={json.dumps(cfg.output_dir)}")
    return cfg, sets


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _signal_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)  # start_new_session: its group id is its pid


@contextlib.contextmanager
def _exit_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit meanwhile, so that the processes get stopped (they
    run in sessions of their own: a signal to this one does not reach them)."""
    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, leave) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _follow(proc: subprocess.Popen[bytes], path: Path, timeout: float, log: Log) -> int | None:
    """Wait for ``proc``, passing on the ServerApp's own lines ("fedit: ...") of its log;
    its exit code, or None after ``timeout`` seconds."""
    deadline, pos, rest = time.monotonic() + timeout, 0, ""
    while True:
        code = proc.poll()
        with contextlib.suppress(OSError), open(path, "rb") as f:
            f.seek(pos)
            chunk = f.read()
            pos += len(chunk)
            *lines, rest = (rest + chunk.decode("utf-8", errors="replace")).split("\n")
            for line in lines:
                if "fedit: " in line:
                    log(line.split("fedit: ", 1)[1].rstrip())
        if code is not None:
            return code
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def run_local(
    config: Path, *, nodes: int = 2, overrides: Sequence[str] = (), tls: bool = False,
    auth: bool = False, isolation: str = "process", workdir: Path | None = None,
    timeout: float = 3600, log: Log = print,
) -> dict[str, Any]:
    """Start a SuperLink and ``nodes`` SuperNodes (partition-id 0..N-1), run the config
    with ``flwr run``, stop everything; returns the run's summary.json."""
    cfg, _ = resolve_run(config, overrides)
    if cfg.partition.clients != nodes:
        raise FeditError(f"--nodes {nodes} but partition.clients = {cfg.partition.clients}: "
                         f"each node trains one partition (--set partition.clients={nodes})")
    workdir = workdir or Path(cfg.output_dir) / ".flower" / datetime.now().strftime("%H%M%S")
    fed = LocalFederation(workdir, tls=tls, auth=auth, isolation=isolation, log=log)
    with _exit_on_signals(), fed:
        fed.start_superlink(nodes)
        for k in range(nodes):
            if auth:
                fed.register(k)
            fed.start_node(k, f"partition-id={k} num-partitions={nodes}")
        log(f"{nodes} SuperNodes started ({isolation} isolation); logs in {workdir}")
        run, run_dir = fed.submit(config, overrides)
        code = _follow(run, workdir / "flwr-run.log", timeout, log)
        if code is None:
            raise FeditError(f"the run did not finish in {timeout:g} s; logs in {workdir}")
    summary = run_dir / "summary.json"
    if code != 0 or not summary.is_file():
        tail = (workdir / "flwr-run.log").read_text(errors="replace").strip()[-1500:]
        raise FeditError(f"the Flower run failed (flwr run exit {code}); logs in {workdir}"
                         f"\n{tail}")
    return dict(json.loads(summary.read_text()))
