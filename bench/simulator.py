"""The Mercado Pago simulator as its own process, for the refresh wave.

`python -m bench.simulator --port P` serves `service.simulator` for the one application named
by MP_CLIENT_ID / MP_CLIENT_SECRET / MP_REDIRECT_URI (from the environment, like the broker's),
with the broker's uvicorn flags and no access log.
"""

from __future__ import annotations

import argparse
import gc
import os

from bench.bare import run
from service.simulator import SimulatorClient, SimulatorConfig, create_simulator_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    client = SimulatorClient(
        client_id=os.environ["MP_CLIENT_ID"],
        client_secret=os.environ["MP_CLIENT_SECRET"],
        redirect_uris=(os.environ["MP_REDIRECT_URI"],),
    )
    app = create_simulator_app(SimulatorConfig(clients=[client]))
    # Mercado Pago stands in here, not a process under test: no cyclic collector. It holds
    # every grant it issued and every request it logged, and its full collections over them
    # held every request in flight (the refresh wave's p99: 149 ms with, 57 ms without, for
    # the simulator alone). It lives one wave; its few garbage cycles wait for its exit.
    gc.disable()
    run(app, args.host, args.port)


if __name__ == "__main__":
    main()
