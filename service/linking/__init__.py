"""Linking a seller: the link, the attempt (state, PKCE, browser binding), the callback."""
