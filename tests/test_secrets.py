import datetime as dt
import hashlib
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pibake import secrets
from pibake.errors import SecretsError


@pytest.fixture
def cdir(tmp_path):
    secrets.ensure_secrets(tmp_path, "red", "red00", "10.1.1.10")
    return tmp_path


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_layout_and_permissions(cdir):
    sdir = cdir / "secrets"
    assert mode(sdir) == 0o700
    for name in ("ca.key", "registry.key", "join-token.json", "munge.key", "admin-password"):
        assert mode(sdir / name) == 0o400, name
    assert len((sdir / "munge.key").read_bytes()) == 1024
    secrets.check_permissions(cdir)


def test_rerun_never_overwrites(cdir):
    before = {p.name: p.read_bytes() for p in (cdir / "secrets").iterdir()}
    result = secrets.ensure_secrets(cdir, "red", "red00", "10.1.1.10")
    assert set(result.values()) == {"kept"}
    assert before == {p.name: p.read_bytes() for p in (cdir / "secrets").iterdir()}


def test_rotate_on_purpose(cdir):
    old_key = (cdir / "secrets/munge.key").read_bytes()
    old_ca = (cdir / "secrets/ca.crt").read_bytes()
    result = secrets.ensure_secrets(cdir, "red", "red00", "10.1.1.10", rotate={"munge-key"})
    assert result["munge-key"] == "rotated" and result["ca"] == "kept"
    assert (cdir / "secrets/munge.key").read_bytes() != old_key
    assert (cdir / "secrets/ca.crt").read_bytes() == old_ca
    result = secrets.ensure_secrets(cdir, "red", "red00", "10.1.1.10", rotate={"ca"})
    # the registry cert and the token depend on the CA: they follow it
    assert result["ca"] == result["registry-cert"] == result["join-token"] == "rotated"


def test_rotate_unknown_name_is_an_error(cdir):
    with pytest.raises(SecretsError, match="unknown secret"):
        secrets.ensure_secrets(cdir, "red", "red00", "10.1.1.10", rotate={"everything"})


def test_server_cert_chains_to_ca_and_names_manager(cdir):
    ca = x509.load_pem_x509_certificate((cdir / "secrets/ca.crt").read_bytes())
    srv = x509.load_pem_x509_certificate((cdir / "secrets/registry.crt").read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "red00" in san.get_values_for_type(x509.DNSName)
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.1.1.10"]
    # valid from well before "now": a Pi without RTC boots with an old clock
    assert srv.not_valid_before_utc.year <= 2020


def test_manager_change_reissues_server_cert(cdir):
    result = secrets.ensure_secrets(cdir, "red", "red00", "10.1.1.20")
    assert result["registry-cert"] == "rotated" and result["ca"] == "kept"


def test_join_token_pins_ca(cdir):
    tok = secrets.load_join_token(cdir)
    ca_hash, token_id, secret = secrets.parse_join_token(tok.token)
    der = x509.load_pem_x509_certificate((cdir / "secrets/ca.crt").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert ca_hash == hashlib.sha256(der).hexdigest()
    assert len(token_id) == 6 and len(secret) == 32
    assert secrets.check_join_token(cdir, tok.token)
    assert not secrets.check_join_token(cdir, tok.token[:-1] + ("a" if tok.token[-1] != "a" else "b"))
    assert tok.expires - tok.created == dt.timedelta(days=7)


def test_join_token_expires(cdir):
    tok = secrets.load_join_token(cdir)
    later = tok.expires + dt.timedelta(seconds=1)
    assert not secrets.check_join_token(cdir, tok.token, now=later)
    with pytest.raises(SecretsError, match="expired.*pibake token rotate"):
        secrets.seed_secrets(cdir, now=later)
    new = secrets.rotate_join_token(cdir)
    assert new.token != tok.token


@pytest.mark.parametrize("bad", ["", "K10abc::x.y", "nonsense", None])
def test_malformed_token_error_does_not_echo(bad):
    with pytest.raises(SecretsError) as err:
        secrets.parse_join_token(bad)
    if bad:
        assert bad not in str(err.value)


def test_wpa_psk_ieee_vector():
    # IEEE 802.11i-2004, Annex H.4 test vector
    assert secrets.wpa_psk("IEEE", "password") == (
        "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
    )
    with pytest.raises(SecretsError):
        secrets.wpa_psk("IEEE", "short")


def test_loose_permissions_are_reported(cdir):
    os.chmod(cdir / "secrets/munge.key", 0o644)
    with pytest.raises(SecretsError, match="munge.key is 0o644, must be 0400"):
        secrets.check_permissions(cdir)
