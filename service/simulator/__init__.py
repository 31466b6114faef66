"""A fake Mercado Pago OAuth server for demos and end-to-end tests (see `app.py`)."""

from service.simulator.app import create_simulator_app
from service.simulator.state import SimulatorClient, SimulatorConfig

__all__ = ["SimulatorClient", "SimulatorConfig", "create_simulator_app"]
