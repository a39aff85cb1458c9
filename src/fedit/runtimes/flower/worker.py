"""A long-lived ClientApp process for a SuperNode started with ``--isolation process``.

With Flower's default isolation, a SuperNode starts a new ``flwr-clientapp`` process for
every message: for an LLM that means importing torch and transformers and loading the
base model each round. With ``--isolation process`` the SuperNode waits for an outside
process to take its tasks; this is one, that lives as long as the node and runs every
ClientApp task in-process, so ``fedit.runtimes.flower.client`` keeps the base model and the
tokenised data in memory between rounds.

It does per task what ``flwr-clientapp`` does (``flwr.supernode.runtime.run_clientapp``:
pull the message, context and app bundle from the SuperNode's runtime API, call the
ClientApp, push the reply and the context back), with Flower's own functions, but does
not exit afterwards. Built against flwr 1.42 (pinned in fedit's ``flower`` extra).

    fedit flower worker --runtime-api-address 127.0.0.1:9094
"""

from __future__ import annotations

import os
import threading
import time
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common import log
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # type: ignore[attr-defined]
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

POLL_SECONDS = 0.2  # between asks for a task (flower-superexec waits 1 s)


def _client(
    address: str, root_certificates: bytes | None, *interceptors: ProtobufClientInterceptor
) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(  # type: ignore[no-any-return]
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=list(interceptors),
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(address: str, token: str, root_certificates: bytes | None = None) -> bool:
    """Run one ClientApp task in this process; True when the ClientApp returned a reply."""
    client = _client(address, root_certificates,
                     RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                     RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message: Message | None = None
    reply: Message | None = None
    context: Context | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        app = load(run.fab_id, run.fab_version, fab.hash_str)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # the node gets an error reply, as from flwr-clientapp
        code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        details = f"{type(ex)}:<'{ex}'>"
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=status,
                             details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return status == SubStatus.COMPLETED


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def exit_with(pid: int, poll: float = 0.5) -> None:
    """Leave this process as soon as process ``pid`` (its SuperNode) is gone."""
    def watch() -> None:
        while _alive(pid):
            time.sleep(poll)
        log(INFO, "fedit worker: SuperNode %d is gone; exiting", pid)
        os._exit(0)  # a task in flight has nowhere to send its reply

    threading.Thread(target=watch, daemon=True, name="fedit-worker-watch").start()


def run_worker(
    address: str, root_certificates: bytes | None = None, max_tasks: int | None = None,
    parent_pid: int | None = None,
) -> None:
    """Take ClientApp tasks from the SuperNode's runtime API at ``address`` until killed
    (or until the process ``parent_pid``, its SuperNode, is gone)."""
    if parent_pid is not None:
        exit_with(parent_pid)
    import fedit.client.round  # noqa: F401  (torch and transformers: once, not per message)

    acquire = _client(address, root_certificates,
                      RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    log(INFO, "fedit worker: taking ClientApp tasks from %s", address)
    done = 0
    try:
        while max_tasks is None or done < max_tasks:
            res = acquire.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
            if res.HasField("task") and res.token:
                start = time.perf_counter()
                ok = run_task(address, res.token, root_certificates)
                done += 1
                log(INFO, "fedit worker: task %d %s in %.1f s", res.task.task_id,
                    "done" if ok else "failed", time.perf_counter() - start)
            else:
                time.sleep(POLL_SECONDS)
    finally:
        acquire.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m fedit.runtimes.flower.worker --runtime-api-address HOST:PORT``"""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's runtime API (its --port)")
    parser.add_argument("--root-certificates", default=None,
                        help="CA file when the SuperNode's runtime API uses TLS")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the SuperNode) is gone")
    parser.add_argument("--max-tasks", type=int, default=None,
                        help="exit after this many tasks (default: take tasks until killed)")
    args = parser.parse_args(argv)
    certs = Path(args.root_certificates).read_bytes() if args.root_certificates else None
    run_worker(args.runtime_api_address, certs, max_tasks=args.max_tasks,
               parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
