"""Calls to Mercado Pago's API made through the broker, which attaches the seller's token."""
