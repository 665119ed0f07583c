"""Shared fixtures: one tiny random-weight model and adapter per session, loaded by the real loader."""

from __future__ import annotations

import os

# Nothing in the suite may reach the Hugging Face hub. huggingface_hub reads this once, when it is
# first imported (forgellm.testing imports it), so it must be set before any forgellm import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from forgellm.testing import build_tiny_adapter, build_tiny_model, test_client  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def responses_match_the_schema():
    """Every in-process test server checks each response against its own OpenAPI schema, extra keys
    forbidden: the wire types and the schema cannot drift apart unnoticed."""
    import forgellm.testing.clients

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(forgellm.testing.clients, "CHECK_SCHEMA_BY_DEFAULT", True)
        yield


@pytest.fixture(scope="session", autouse=True)
def private_config_home(tmp_path_factory):
    """Keep the developer's ~/.config/forgellm (the auth plugin's default keys file) out of every test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config-home")))
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_without_template(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-plain", chat_template=False)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory):
    return build_tiny_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "tiny-lora")


@pytest.fixture(scope="module")
def client(tiny_model):
    """A server with the tiny model loaded, shared by a module's tests (they must not unload it)."""
    with test_client(tiny_model) as c:
        yield c


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost: (certificate path, private key path)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
