"""JWT bearer tokens through the auth plugin: the attack battery, valid tokens, scopes, and settings.

Every forged, expired or mis-addressed token must be a 401; the accepted algorithms come from
the server's settings, never from the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import warnings

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from identity_probe import IdentityProbe
from wire import bearer

from forgellm import INVALID_CREDENTIALS
from forgellm.plugins.auth.authenticator import AuthConfigError
from forgellm.testing import test_client

SECRET = "hs256-secret-for-the-tests-0123456789abcdef"
OTHER_SECRET = "another-secret-that-the-server-does-not-know-0123"
AUDIENCE = "forgellm-tests"
ISSUER = "https://issuer.example"
CHALLENGE = 'Bearer realm="forgellm"'
LOAD_BODY = {"model_name": "/nowhere/model"}  # past the guard this is a 400, so it probes authorization only


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides) -> dict:
    """Claims the HS256 server accepts, with overrides; an override of None removes the claim."""
    now = int(time.time())
    base = {"sub": "alice", "exp": now + 600, "iat": now, "aud": AUDIENCE, "iss": ISSUER, "scope": "generate"}
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def hs256(**overrides) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def unsigned(alg: str, payload: dict, signature: str = "") -> str:
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(payload).encode())}.{signature}"


def hmac_signed(secret: bytes, payload: dict | bytes) -> str:
    """An HS256 token signed by hand: PyJWT itself refuses to use a PEM public key as an HMAC secret,
    and to sign a payload that is not JSON."""
    raw_payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64url(raw_payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def assert_unauthorized(response, token: str = "") -> str:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == CHALLENGE
    message = response.json()["error"]
    assert message == INVALID_CREDENTIALS
    if token:
        assert token not in message
    return message


@pytest.fixture(scope="module")
def probe():
    return IdentityProbe()


@pytest.fixture(scope="module")
def hs_server(probe):
    with test_client(
        plugins="auth",
        jwt_secret=SECRET,
        jwt_audience=AUDIENCE,
        jwt_issuer=ISSUER,
        extra_plugins={"identity-probe": probe},
    ) as client:
        yield client


def test_a_valid_hs256_token_is_accepted_as_its_subject(hs_server, probe):
    token = hs256(scope="generate models:load", rate_limit="3/minute")
    response = hs_server.get("/api/model/status", headers=bearer(token))

    assert response.status_code == 200
    identity = probe.identities[-1]
    assert (identity.subject, identity.method) == ("jwt:alice", "jwt")
    assert identity.scopes == {"generate", "models:load"}
    assert identity.claims["rate_limit"] == "3/minute"  # a signed claim the ratelimit plugin may read


def test_a_valid_token_works_on_the_openai_routes(hs_server):
    assert hs_server.get("/v1/models", headers=bearer(hs256())).status_code == 200


def test_an_expired_token_within_the_leeway_is_accepted(hs_server):
    assert hs_server.get("/api/model/status", headers=bearer(hs256(exp=int(time.time()) - 10))).status_code == 200


def _hs512_with_our_secret() -> str:
    """The server's own secret under an algorithm it was not configured for."""
    with warnings.catch_warnings():
        # PyJWT warns that the secret is short for SHA-512; the server never accepts HS512 anyway.
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims(), SECRET, algorithm="HS512")


@pytest.mark.parametrize(
    "make_token, reason",
    [
        (lambda: unsigned("none", claims()), "algorithm is not accepted"),
        (lambda: unsigned("None", claims()), "algorithm is not accepted"),
        (lambda: unsigned("NONE", claims()), "algorithm is not accepted"),
        (lambda: unsigned("none", claims(), signature=b64url(b"x" * 32)), "algorithm is not accepted"),
        (lambda: jwt.encode(claims(), OTHER_SECRET, algorithm="HS256"), "signature does not verify"),
        (lambda: _with_changed_signature(hs256()), "signature does not verify"),
        (lambda: _tampered(hs256(), sub="admin"), "signature does not verify"),
        (lambda: hs256(exp=int(time.time()) - 3600), "expired"),
        (lambda: hs256(exp=None), "no exp claim"),
        (lambda: hs256(exp="tomorrow"), "malformed"),
        (lambda: hs256(sub=None), "no sub claim"),
        (lambda: hs256(sub=42), "not valid"),
        (lambda: hs256(sub=""), "sub claim is empty"),
        (lambda: hs256(aud="someone-else"), "audience"),
        (lambda: hs256(aud=None), "no aud claim"),
        (lambda: hs256(iss="https://evil.example"), "issuer"),
        (lambda: hs256(iss=None), "no iss claim"),
        (lambda: hs256(nbf=int(time.time()) + 3600), "not valid yet"),
        (lambda: _hs512_with_our_secret(), "algorithm is not accepted"),
        (lambda: hs256(scope=["generate"]), "scope claim"),
        (lambda: hs256(scopes="generate"), "scopes claim"),
        (lambda: hmac_signed(SECRET.encode(), b"not json"), "malformed"),
        (lambda: hmac_signed(SECRET.encode(), b"[1, 2]"), "malformed"),
        (lambda: "bm90IGpzb24.e30.c2ln", "malformed"),
        (lambda: b64url(b"[1, 2]") + ".e30.c2ln", "malformed"),
        (lambda: "a.b.c", "malformed"),
        (lambda: hs256() + ".extra", INVALID_CREDENTIALS),
        (lambda: "..", INVALID_CREDENTIALS),
    ],
    ids=[
        "alg-none",
        "alg-None",
        "alg-NONE",
        "alg-none-with-signature",
        "wrong-secret",
        "wrong-signature",
        "tampered-payload",
        "expired",
        "missing-exp",
        "non-numeric-exp",
        "missing-sub",
        "non-string-sub",
        "empty-sub",
        "wrong-audience",
        "missing-audience",
        "wrong-issuer",
        "missing-issuer",
        "not-yet-valid",
        "unconfigured-hs512",
        "scope-not-a-string",
        "scopes-not-a-list",
        "payload-not-json",
        "payload-not-an-object",
        "header-not-json",
        "header-not-an-object",
        "garbage-segments",
        "four-segments",
        "empty-segments",
    ],
)
def test_the_jwt_attack_battery_is_all_401(hs_server, make_token, reason, caplog):
    token = make_token()
    for path in ("/api/model/status", "/v1/models"):
        response = hs_server.get(path, headers=bearer(token))
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == CHALLENGE
    with caplog.at_level(logging.INFO, logger="forgellm.auth"):
        message = assert_unauthorized(hs_server.get("/api/model/status", headers=bearer(token)), token)
    assert message == INVALID_CREDENTIALS  # the client learns nothing of why: a prober would
    if reason != INVALID_CREDENTIALS:  # not shaped like a JWT: never verified as one
        assert reason in caplog.text  # the operator's log says why


def _with_changed_signature(token: str) -> str:
    signing_input, _, signature = token.rpartition(".")
    middle = len(signature) // 2  # a character that carries only signature bits, unlike the last one
    changed = "A" if signature[middle] != "A" else "B"
    return f"{signing_input}.{signature[:middle]}{changed}{signature[middle + 1 :]}"


def _tampered(token: str, **changes) -> str:
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(changes)
    return f"{header}.{b64url(json.dumps(data).encode())}.{signature}"


def test_a_jwt_in_x_api_key_is_not_accepted(hs_server):
    """JWTs travel as Bearer tokens; X-API-Key carries API keys only."""
    assert_unauthorized(hs_server.get("/api/model/status", headers={"X-API-Key": hs256()}))


@pytest.mark.parametrize(
    "token_claims, may_generate, may_load",
    [
        ({"scope": "generate"}, True, False),
        ({"scope": "models:load"}, False, True),
        ({"scope": None, "scopes": ["generate", "models:load"]}, True, True),
        ({"scope": "admin"}, True, True),
        ({"scope": None}, False, False),
        ({"scope": "read write generat"}, False, False),
    ],
    ids=["scope-generate", "scope-load", "scopes-list", "admin", "no-scope", "unknown-scopes"],
)
def test_token_scopes_decide_what_it_may_do(hs_server, token_claims, may_generate, may_load):
    headers = bearer(hs256(**token_claims))

    status = hs_server.get("/api/model/status", headers=headers)
    generate = hs_server.post("/api/model/generate", json={"prompt": "Hi"}, headers=headers)
    chat = hs_server.post(
        "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]}, headers=headers
    )
    load = hs_server.post("/api/model/load", json=LOAD_BODY, headers=headers)

    assert status.status_code == 200  # any authenticated identity reads status
    # Past the guard, generation without a loaded model is a 400 "No model loaded", and so is this load.
    assert generate.status_code == (400 if may_generate else 403)
    assert chat.status_code == (400 if may_generate else 403)
    assert load.status_code == (400 if may_load else 403)
    if not may_generate:
        assert chat.json()["error"]["type"] == "permission_error"


# Signed with the right secret, but with any claims at all: never a crash, and a pass only when the claims are valid.
claim_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
random_claims = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.one_of(st.just("bob"), claim_values),
        "exp": st.one_of(st.just(int(time.time()) + 3600), claim_values),
        "nbf": claim_values,
        "iat": claim_values,
        "aud": st.one_of(st.just(AUDIENCE), st.just([AUDIENCE, "x"]), claim_values),
        "iss": st.one_of(st.just(ISSUER), claim_values),
        "scope": claim_values,
        "scopes": claim_values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=random_claims)
def test_correctly_signed_tokens_with_arbitrary_claims_never_crash_or_pass_invalid(hs_server, payload):
    response = hs_server.get("/api/model/status", headers=bearer(hmac_signed(SECRET.encode(), payload)))

    assert response.status_code in (200, 401), response.text
    if response.status_code == 200:
        assert isinstance(payload["sub"], str) and payload["sub"]
        assert isinstance(payload["exp"], (int, float)) and payload["exp"] > time.time()
        assert payload["aud"] == AUDIENCE or AUDIENCE in payload["aud"]
        assert payload["iss"] == ISSUER
    else:
        assert_unauthorized(response)


# Asymmetric keys: the server holds only the public key.


def _rsa():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEY_MAKERS = {
    "RS256": _rsa,
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
}


def public_pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module", params=sorted(KEY_MAKERS))
def asymmetric(request, tmp_path_factory):
    """A server configured with only a public key: (algorithm, private key, public PEM, client)."""
    algorithm = request.param
    private_key = KEY_MAKERS[algorithm]()
    pem = public_pem(private_key)
    path = tmp_path_factory.mktemp("jwt-key") / "public.pem"
    path.write_bytes(pem)
    with test_client(plugins="auth", jwt_public_key=str(path)) as client:
        yield algorithm, private_key, pem, client


def asymmetric_claims(**overrides) -> dict:
    return claims(aud=None, iss=None, **overrides)


def test_a_token_signed_with_the_private_key_is_accepted(asymmetric):
    algorithm, private_key, _, client = asymmetric
    token = jwt.encode(asymmetric_claims(), private_key, algorithm=algorithm)
    assert client.get("/api/model/status", headers=bearer(token)).status_code == 200
    assert client.post("/api/model/load", json=LOAD_BODY, headers=bearer(token)).status_code == 403


def test_key_confusion_hs256_signed_with_the_public_key_is_a_401(asymmetric, caplog):
    """The classic attack: HMAC-sign with the server's public key, hoping it verifies HS256 with that key."""
    _, _, pem, client = asymmetric
    for secret in (pem, pem.strip()):
        token = hmac_signed(secret, asymmetric_claims())
        with caplog.at_level(logging.INFO, logger="forgellm.auth"):
            assert_unauthorized(client.get("/api/model/status", headers=bearer(token)), token)
        assert "algorithm is not accepted" in caplog.text


def test_asymmetric_attack_battery_is_all_401(asymmetric):
    algorithm, private_key, _, client = asymmetric
    attacker_key = KEY_MAKERS[algorithm]()
    embedded_jwk = json.loads(jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(attacker_key.public_key()))
    forged = {
        "signed-by-another-key": jwt.encode(asymmetric_claims(), attacker_key, algorithm=algorithm),
        # CVE-2018-0114 style: a token carrying its own verification key in the header.
        "own-key-in-header": jwt.encode(
            asymmetric_claims(), attacker_key, algorithm=algorithm, headers={"jwk": embedded_jwk}
        ),
        "alg-none": unsigned("none", asymmetric_claims()),
        "expired": jwt.encode(asymmetric_claims(exp=int(time.time()) - 3600), private_key, algorithm=algorithm),
        "missing-exp": jwt.encode(asymmetric_claims(exp=None), private_key, algorithm=algorithm),
        "hs256-with-a-guessable-secret": jwt.encode(asymmetric_claims(), OTHER_SECRET, algorithm="HS256"),
    }
    for name, token in forged.items():
        response = client.get("/api/model/status", headers=bearer(token))
        assert response.status_code == 401, name
        assert_unauthorized(response, token)


def test_other_algorithms_of_the_same_key_family_need_configuring(tmp_path):
    """An RSA key accepts RS256 by default; PS256 only when --jwt-algorithms names it."""
    private_key = _rsa()
    path = tmp_path / "rsa.pem"
    path.write_bytes(public_pem(private_key))
    ps256 = jwt.encode(asymmetric_claims(), private_key, algorithm="PS256")
    rs256 = jwt.encode(asymmetric_claims(), private_key, algorithm="RS256")

    with test_client(plugins="auth", jwt_public_key=str(path)) as client:
        assert_unauthorized(client.get("/api/model/status", headers=bearer(ps256)))
    with test_client(plugins="auth", jwt_public_key=str(path), jwt_algorithms="PS256") as client:
        assert client.get("/api/model/status", headers=bearer(ps256)).status_code == 200
        assert_unauthorized(client.get("/api/model/status", headers=bearer(rs256)))


def test_a_secret_and_a_public_key_each_verify_only_their_own_algorithm(tmp_path):
    private_key = _rsa()
    pem = public_pem(private_key)
    path = tmp_path / "rsa.pem"
    path.write_bytes(pem)
    payload = asymmetric_claims()

    with test_client(plugins="auth", jwt_public_key=str(path), jwt_secret=SECRET) as client:

        def status(token):
            return client.get("/api/model/status", headers=bearer(token)).status_code

        assert status(jwt.encode(payload, SECRET, algorithm="HS256")) == 200
        assert status(jwt.encode(payload, private_key, algorithm="RS256")) == 200
        # HS256 is accepted here, but verified with the secret, never with the public key.
        assert status(hmac_signed(pem, payload)) == 401


def startup_error(**settings) -> str:
    """The message the auth plugin stops the server with."""
    with pytest.raises(BaseExceptionGroup) as info:
        with test_client(plugins="auth", **settings):
            pass
    assert info.group_contains(AuthConfigError)
    return str(info.value.exceptions[0])


def test_a_short_hs256_secret_stops_the_server():
    assert "at least 32 bytes" in startup_error(jwt_secret="too-short")


def test_an_algorithm_that_does_not_fit_the_key_stops_the_server(tmp_path):
    path = tmp_path / "rsa.pem"
    path.write_bytes(public_pem(_rsa()))
    assert "HS256 does not fit" in startup_error(jwt_public_key=str(path), jwt_algorithms="HS256")
    assert "none does not fit" in startup_error(jwt_secret=SECRET, jwt_algorithms="HS256,none")
    assert "ES256 does not fit" in startup_error(jwt_public_key=str(path), jwt_algorithms="ES256")


def test_a_public_key_file_that_is_not_a_public_key_stops_the_server(tmp_path):
    private_key = ec.generate_private_key(ec.SECP256R1())
    private_pem = tmp_path / "private.pem"
    private_pem.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert "not a PEM public key" in startup_error(jwt_public_key=str(private_pem))


def test_jwt_claims_settings_without_a_key_stop_the_server():
    assert "need --jwt-secret or --jwt-public-key" in startup_error(api_key=("k",), jwt_audience=AUDIENCE)
