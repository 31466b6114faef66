"""Test helpers: a real PostgreSQL per test, the simulator and the broker, a seller's browser.

`conftest.py` only turns these into fixtures; tests import helpers from here, never from it.
"""

from tests.support.api import assert_problem, calling_with, new_key
from tests.support.browser import SellerBrowser, query_of
from tests.support.clock import FakeClock, busiest
from tests.support.config import CLIENT_ID, CLIENT_SECRET, ROOT, SIM_EXPIRES_IN
from tests.support.db import admin_connect, execute, with_database
from tests.support.polling import wait_until
from tests.support.seed import create_api_key, seed_sellers, settings_keyring
from tests.support.servers import Broker, Loopback, Simulator, bound_socket

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "ROOT",
    "SIM_EXPIRES_IN",
    "Broker",
    "FakeClock",
    "Loopback",
    "SellerBrowser",
    "Simulator",
    "admin_connect",
    "assert_problem",
    "bound_socket",
    "busiest",
    "calling_with",
    "create_api_key",
    "execute",
    "new_key",
    "query_of",
    "seed_sellers",
    "settings_keyring",
    "wait_until",
    "with_database",
]
