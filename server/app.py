"""hemex ServerApp: the coordinator's aggregator. Settings come from the run config."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.federation.settings import FederationSettings
from server.run import FederatedRun

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = FederationSettings.from_run_config(dict(context.run_config))
    FederatedRun(grid, settings).execute()
