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


def test_manager_ssh_key_is_an_ed25519_pair_ssh_accepts(cdir, tmp_path):
    import subprocess

    key, pub = cdir / "secrets/manager-ssh.key", cdir / "secrets/manager-ssh.key.pub"
    assert mode(key) == 0o400 and mode(pub) == 0o444
    private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    assert type(private).__name__.startswith("Ed25519PrivateKey")
    line = secrets.manager_ssh_public_key(cdir)
    assert line.startswith("ssh-ed25519 ") and line.endswith(" pibake-manager@red")
    if os.path.exists("/usr/bin/ssh-keygen"):  # OpenSSH itself derives the same public key from the private one
        derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True)
        assert derived.stdout.split()[:2] == line.split()[:2]
    assert secrets.seed_secrets(cdir).manager_ssh_key == line
    (cdir / "cluster.yaml").write_text("name: red\n")  # the bundle reads it; content does not matter here
    bundle = secrets.manager_bundle(cdir)
    assert bundle["secrets/manager-ssh.key"] == key.read_bytes() and "secrets/ca.key" not in bundle
    os.chmod(key, 0o444)
    with pytest.raises(SecretsError, match="manager-ssh.key is 0o444, must be 0400"):
        secrets.check_permissions(cdir)


def test_a_cluster_made_before_the_manager_key_gets_it_and_keeps_the_rest(cdir):
    for name in ("manager-ssh.key", "manager-ssh.key.pub"):
        (cdir / "secrets" / name).unlink()
    with pytest.raises(SecretsError, match=r"manager-ssh.key.pub is missing: run `pibake init` again"):
        secrets.seed_secrets(cdir)
    before = {p.name: p.read_bytes() for p in (cdir / "secrets").iterdir()}
    result = secrets.ensure_secrets(cdir, "red", "red00", "10.1.1.10")
    assert result.pop("manager-ssh-key") == "created" and set(result.values()) == {"kept"}
    after = {p.name: p.read_bytes() for p in (cdir / "secrets").iterdir()}
    assert {k: after[k] for k in before} == before
    old = after["manager-ssh.key"]
    result = secrets.ensure_secrets(cdir, "red", "red00", "10.1.1.10", rotate={"manager-ssh-key"})
    assert result["manager-ssh-key"] == "rotated" and result["munge-key"] == "kept"
    assert (cdir / "secrets/manager-ssh.key").read_bytes() != old
