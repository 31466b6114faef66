"""The OAuth client the tests register at the simulator, and where the repository is."""

from pathlib import Path

CLIENT_ID = "7000000000000001"
CLIENT_SECRET = "test-client-secret-0123456789"
SIM_EXPIRES_IN = 15768000  # seen from Mercado Pago; differs from the documented 180 days

ROOT = Path(__file__).resolve().parent.parent.parent
