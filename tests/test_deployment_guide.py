"""docs/deployment.md, run as written: the bash blocks of its one-host section (§2.2,
between ``<!-- one-host:begin`` and ``<!-- one-host:end -->``) and the credentials script.

The section's blocks run in order in one ``bash`` (with ``set -euo pipefail``), as a user
pasting them would, except the first block (the settings), which the test replaces with
its own: a temporary ``$TRIAL``, free ports, a tiny model's config (1 round, 1 step). The
shell starts outside the checkout, with the environment's ``bin`` off ``PATH``, no
``FLWR_DISABLE_UPDATE_CHECK`` and a temporary ``HOME``: the guide's own commands must
activate the environment, set what Flower needs, and use absolute paths.

Every process the guide starts inherits a marker variable: the test finds them all by it
(``/proc/PID/environ``; ``flower-superexec`` runs in a session of its own) and stops them,
failures included. Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from fedit.config import config_from_dict
from fedit.runtimes.flower.local import REPO, free_port, make_credentials
from tests.conftest import make_rows, write_config, write_jsonl

if not (shutil.which("openssl") and shutil.which("ssh-keygen")):  # pragma: no cover
    pytest.skip("needs openssl and ssh-keygen for TLS and node keys", allow_module_level=True)

GUIDE = REPO / "docs" / "deployment.md"
BEGIN, END = "<!-- one-host:begin", "<!-- one-host:end -->"
SETTINGS = ["FEDIT", "VENV", "TRIAL", "CONFIG", "LINK_PORT", "PORT_A", "PORT_B"]
RUN_TIMEOUT = 480  # seconds the whole section may take here (2 busy cores)
EXIT_TIMEOUT = 60  # seconds the trial's processes have to exit after the guide's `kill`


def one_host_blocks() -> list[str]:
    """The ```bash blocks of the guide's one-host section, in order."""
    text = GUIDE.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "one-host markers missing"
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S)
    assert len(blocks) >= 2, "no bash blocks in the one-host section"
    return blocks


def settings_keys(block: str) -> list[str]:
    lines = [x.split("#", 1)[0].strip() for x in block.splitlines()]
    return [x.split("=", 1)[0] for x in lines if x]


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def trial_pids(marker: str) -> list[int]:
    """Every live process that inherited ``FEDIT_GUIDE_TEST=marker`` (zombies excluded)."""
    needle = f"FEDIT_GUIDE_TEST={marker}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid() or needle not in _environ(pid).split(b"\0"):
            continue
        with contextlib.suppress(OSError, IndexError):
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(pid)
    return pids


def stop_trial(shell: subprocess.Popen[bytes], marker: str) -> None:
    """SIGTERM to the shell's process group and every marked process, SIGKILL after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(shell.pid, sig)
        for pid in trial_pids(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while trial_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        shell.wait(timeout=5)


def _logs(trial: Path, shell_log: Path) -> str:
    parts = [f"--- {shell_log.name}\n{shell_log.read_text(errors='replace')[-4000:]}"]
    for log in sorted(trial.rglob("*.log")):
        parts.append(f"--- {log.relative_to(trial)}\n{log.read_text(errors='replace')[-2000:]}")
    return "\n".join(parts)


def test_credentials_script_with_zero_node_keys(tmp_path):
    # Execute: no node keys (each party makes its own), then two more in the same folder
    creds = make_credentials(tmp_path / "creds", 0, "DNS:fl.example.org")
    # Assert: CA and server certificate, no node key, public files readable by all only
    assert (creds / "ca.crt").is_file() and (creds / "server.pem").resolve().is_file()
    assert not list(creds.glob("node-*"))
    assert (creds / "ca.crt").stat().st_mode & 0o777 == 0o644
    assert (creds / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (creds / "server.key").resolve().stat().st_mode & 0o777 == 0o600
    make_credentials(creds, 2)
    assert sorted(p.name for p in creds.glob("node-*")) == [
        "node-0", "node-0.pub", "node-1", "node-1.pub"]
    assert (creds / "node-1.pub").stat().st_mode & 0o777 == 0o644
    assert (creds / "node-1").stat().st_mode & 0o777 == 0o600
    # A NODES that is not a number is refused, not taken as 0
    bad = subprocess.run(["bash", str(REPO / "scripts" / "flower-credentials.sh"),
                          str(tmp_path / "bad"), "two"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "NODES" in bad.stderr


def test_one_host_section_gives_each_node_its_own_port():
    # The settings block is the one the test replaces: its keys must be the ones it sets
    blocks = one_host_blocks()
    assert settings_keys(blocks[0]) == SETTINGS
    body = "\n".join(blocks[1:])
    # Each SuperNode's --port is the port its own worker's --runtime-api-address names
    node_ports = re.findall(r"flower-supernode .*?--port \"\$(\w+)\"", body, flags=re.S)
    worker_ports = re.findall(r"--runtime-api-address \"127\.0\.0\.1:\$(\w+)\"", body)
    assert node_ports == worker_ports == ["PORT_A", "PORT_B"]
    # The environment is activated before the first Flower component starts
    first = min(body.index(c) for c in ("flower-superlink", "flower-supernode", "flwr "))
    assert 0 <= body.index('source "$VENV/bin/activate"') < first


def test_the_guides_server_run_config_is_valid():
    # The run config of §3.2, as the ServerApp would read it
    text = GUIDE.read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```toml\n(.*?)^```", text, flags=re.M | re.S)
              if b.startswith("# /etc/fedit/run.toml")]
    assert len(blocks) == 1
    cfg = config_from_dict(tomllib.loads(blocks[0]))
    assert cfg.partition.clients == 2 and cfg.output_dir.startswith("/")


def test_one_host_section_runs_as_written(tmp_path, tiny_model_dir):
    # Prepare: a tiny job, the settings block replaced, a shell outside the checkout
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(40, seed=3))
    config = write_config(tmp_path / "job.toml", tiny_model_dir, data, rounds=1,
                          train={"max_steps": 1},
                          flower={"round_timeout": 180, "node_timeout": 180})
    trial = tmp_path / "trial"
    ports = {"LINK_PORT": free_port(), "PORT_A": free_port(), "PORT_B": free_port()}
    assert len(set(ports.values())) == 3
    settings = {"FEDIT": REPO, "VENV": Path(sys.prefix), "TRIAL": trial, "CONFIG": config,
                **ports}
    assert (Path(sys.prefix) / "bin" / "activate").is_file(), "run the tests in a venv"
    blocks = one_host_blocks()
    assert settings_keys(blocks[0]) == SETTINGS
    script = tmp_path / "guide.sh"
    script.write_text("set -euo pipefail\n"
                      + "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in settings.items())
                      + "\n".join(blocks[1:]), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "home").mkdir(parents=True)
    venv_bin = str(Path(sys.prefix) / "bin")
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "FLWR_DISABLE_UPDATE_CHECK", "FLWR_HOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and p != venv_bin)
    env.update(HOME=str(elsewhere / "home"), FEDIT_GUIDE_TEST=marker, PYTHONUNBUFFERED="1")
    shell_log = tmp_path / "guide.log"
    # Execute: the guide's commands, in one shell
    with open(shell_log, "wb") as out:
        shell = subprocess.Popen(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=elsewhere, env=env,
                                 start_new_session=True)
    try:
        try:
            code = shell.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the guide's commands did not finish in {RUN_TIMEOUT} s\n"
                        f"{_logs(trial, shell_log)}")
        # Assert: the credentials came without node keys, the run finished with both
        # parties, and the guide's own `kill` stopped everything it started
        assert code == 0, _logs(trial, shell_log)
        creds = trial / "server" / "creds"
        assert (creds / "ca.crt").is_file() and not list(creds.glob("node-*"))
        run_dir = trial / "runs" / "trial"
        assert (run_dir / "summary.json").is_file(), _logs(trial, shell_log)
        assert '"final_eval_loss"' in shell_log.read_text()  # the guide's `cat summary.json`
        line = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
        assert line["clients"] == [0, 1] and line["dropped"] == [], line
        deadline = time.monotonic() + EXIT_TIMEOUT
        while (left := trial_pids(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        names = [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left
                 if Path(f"/proc/{p}/cmdline").exists()]
        assert not left, f"still running {EXIT_TIMEOUT} s after the guide's kill: {names}"
    finally:
        stop_trial(shell, marker)
