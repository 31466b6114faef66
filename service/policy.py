"""When a seller's token should be refreshed. Pure: no I/O, no clock of its own."""

from __future__ import annotations

from datetime import datetime, timedelta

# Mercado Pago advises renewing about 5 months into a 180-day token: refresh at 5/6 of its life.
REFRESH_AT_FRACTION = 5 / 6


def next_refresh_at(issued_at: datetime, expires_in: int) -> datetime:
    return issued_at + timedelta(seconds=expires_in * REFRESH_AT_FRACTION)
