"""fedit on Flower: the glue the ServerApp and ClientApp in ``flower-app/`` call.

The round loop is the simulation's (``fedit.federation.loop.RoundLoop``, set up by
``fedit.federation.setup.prepare_run``), the client round is
``fedit.client.round.run_client_round``, the aggregation is the configured strategy's: this
package only moves adapters through Flower's Grid and checks what comes back.

- ``wire``: adapter arrays and replies <-> Flower records (the payload keys of
  ``fedit.algorithms.payload``); the loop checks the replies (``fedit.federation.replies``).
- ``server``: the runtime on the Grid (nodes, hello, timeouts) and the ServerApp's main.
- ``client``: the ClientApp's handlers; a SuperNode finds its data in its node config.
- ``secagg``: SecAgg+ through Flower's legacy workflow and mod.
- ``local``: certificates, node keys, and a local SuperLink + N SuperNodes for a trial.
- ``worker``: a long-lived ClientApp process (``--isolation process``) that keeps the base
  model in memory between messages.
"""
