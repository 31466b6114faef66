"""A typed client of the Mercado Pago token broker, sync and async (README.md)."""

from mp_broker.auth import MercadoPagoAuth
from mp_broker.cache import CachePolicy
from mp_broker.client import AsyncBrokerClient, BrokerClient
from mp_broker.errors import (
    BrokerError,
    Forbidden,
    InvalidRequest,
    RateLimited,
    RelinkRequired,
    SellerNotFound,
    Unauthorized,
    Unavailable,
)
from mp_broker.retry import RetryBudget, RetryPolicy
from mp_broker.token import Token, TokenWarning

__all__ = [
    "AsyncBrokerClient",
    "BrokerClient",
    "BrokerError",
    "CachePolicy",
    "Forbidden",
    "InvalidRequest",
    "MercadoPagoAuth",
    "RateLimited",
    "RelinkRequired",
    "RetryBudget",
    "RetryPolicy",
    "SellerNotFound",
    "Token",
    "TokenWarning",
    "Unauthorized",
    "Unavailable",
]
