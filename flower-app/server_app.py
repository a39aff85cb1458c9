"""fedit's ServerApp: the simulation's round loop, with the clients on Flower SuperNodes."""

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from logging import INFO

    from fedit.runtimes.flower.server import server_main

    server_main(grid, context, log=lambda m: log(INFO, "fedit: %s", m))
