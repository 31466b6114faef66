"""Pure logic: PKCE (RFC 7636) and sealed values."""

from __future__ import annotations

import pytest

from service.core.crypto import Keyring, SealError, context, generate_key_spec
from service.linking import pkce


def test_s256_matches_the_rfc_7636_appendix_b_vector() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce.challenge(verifier, "S256") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_plain_challenge_is_the_verifier() -> None:
    verifier = pkce.new_verifier()
    assert pkce.challenge(verifier, "plain") == verifier


def test_new_verifiers_are_43_unreserved_characters_and_never_repeat() -> None:
    verifiers = {pkce.new_verifier() for _ in range(200)}
    assert len(verifiers) == 200
    assert all(len(v) == 43 and pkce.is_valid_verifier(v) for v in verifiers)


@pytest.mark.parametrize("verifier", ["short", "a" * 129, "a" * 42 + "+", "a" * 42 + "="])
def test_a_verifier_outside_the_rfc_grammar_is_refused(verifier: str) -> None:
    with pytest.raises(ValueError, match="43-128"):
        pkce.challenge(verifier, "S256")


def test_states_carry_at_least_128_random_bits() -> None:
    states = {pkce.new_state() for _ in range(200)}
    assert len(states) == 200
    assert all(len(s) >= 22 for s in states)  # 22 base64url characters = 132 bits


CTX = context("sellers", "seller-1", "refresh_token", "app-1")


def test_a_sealed_value_opens_in_its_own_context() -> None:
    ring = Keyring.parse(generate_key_spec("k1"))
    sealed = ring.seal("TG-secret-1", CTX)
    assert sealed.startswith("v1.k1.")
    assert "TG-secret-1" not in sealed
    assert ring.open(sealed, CTX) == "TG-secret-1"


@pytest.mark.parametrize(
    "other",
    [
        context("sellers", "seller-2", "refresh_token", "app-1"),
        context("sellers", "seller-1", "access_token", "app-1"),
        context("sellers", "seller-1", "refresh_token", "app-2"),
    ],
)
def test_a_sealed_value_copied_to_another_row_column_or_app_does_not_open(other: str) -> None:
    ring = Keyring.parse(generate_key_spec("k1"))
    with pytest.raises(SealError):
        ring.open(ring.seal("TG-secret-1", CTX), other)


def test_a_tampered_value_or_relabelled_key_does_not_open() -> None:
    ring = Keyring.parse(f"{generate_key_spec('k1')},{generate_key_spec('k2')}")
    version, key_id, nonce, body = ring.seal("TG-secret-1", CTX).split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(SealError):
        ring.open(".".join([version, key_id, nonce, flipped]), CTX)
    with pytest.raises(SealError):
        ring.open(".".join([version, "k2", nonce, body]), CTX)


def test_an_old_key_still_opens_after_a_new_one_is_promoted() -> None:
    old, new = generate_key_spec("k1"), generate_key_spec("k2")
    sealed_by_old = Keyring.parse(old).seal("TG-secret-1", CTX)
    promoted = Keyring.parse(f"{new},{old}")
    assert promoted.open(sealed_by_old, CTX) == "TG-secret-1"
    assert promoted.seal("x", CTX).startswith("v1.k2.")
    with pytest.raises(SealError, match="k1"):
        Keyring.parse(new).open(sealed_by_old, CTX)


def test_a_keyring_never_shows_its_keys() -> None:
    spec = generate_key_spec("k1")
    assert spec.split(":")[1] not in repr(Keyring.parse(spec))


@pytest.mark.parametrize("spec", ["k1:short", ":" + "A" * 43, "k.1:" + "A" * 43, ""])
def test_malformed_key_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (binascii errors are ValueErrors too)
        Keyring.parse(spec)
