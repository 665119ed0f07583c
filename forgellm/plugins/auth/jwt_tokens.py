"""JWT bearer tokens, verified with PyJWT against keys and algorithms fixed by configuration.

The token's ``alg`` header only selects among the algorithms the operator allowed, and each
algorithm family has its own key: HS* verify with --jwt-secret, RS*/PS*/ES*/EdDSA with
--jwt-public-key. So ``alg: none`` and the classic key confusion (an HS256 token "signed"
with the server's RSA public key) never verify.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from forgellm import INVALID_CREDENTIALS, Identity, Unauthorized

logger = logging.getLogger("forgellm.auth")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
EDDSA_ALGORITHM = "EdDSA"
# RFC 7518 section 3.2: an HMAC key must be at least as long as the hash output.
MIN_HMAC_SECRET_BYTES = 32
REQUIRED_CLAIMS = ("exp", "sub")

# PyJWT's exceptions, as messages that say what is wrong without echoing the token.
_REASONS = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token's audience is not accepted"),
    (jwt.InvalidIssuerError, "the token's issuer is not accepted"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (jwt.DecodeError, "the token is malformed"),
)


class JwtConfigError(ValueError):
    """The JWT settings do not make a usable verifier; the message says how to fix them."""


def _invalid(reason: str) -> Unauthorized:
    """The client hears only that the credential is invalid, as for a wrong API key: why a token failed
    (expired, wrong issuer, bad signature) tells a prober what the server checks. The log says why."""
    logger.info("refused a JWT: %s", reason)
    return Unauthorized(INVALID_CREDENTIALS)


def _algorithms_for_public_key(key: Any) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        if algorithm is None:
            raise JwtConfigError(f"--jwt-public-key: JWT has no algorithm for the {key.curve.name} curve")
        return (algorithm,)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return (EDDSA_ALGORITHM,)
    raise JwtConfigError("--jwt-public-key must be an RSA, EC (P-256/384/521) or Ed25519/Ed448 public key")


def _default_algorithm(family: Sequence[str]) -> str:
    return family[0]  # HS256, RS256, the curve's ES*, or EdDSA


def load_public_key(path: str | Path) -> Any:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise JwtConfigError(f"--jwt-public-key: cannot read {path}: {exc.strerror}") from None
    try:
        return load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise JwtConfigError(f"--jwt-public-key: {path} is not a PEM public key ({exc})") from None


@dataclass(frozen=True)
class JwtVerifier:
    keys_by_algorithm: dict[str, Any]  # every accepted algorithm, with the one key that verifies it
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 30.0

    @classmethod
    def from_settings(
        cls,
        *,
        secret: str | None,
        public_key_path: str | None,
        algorithms: str | None,
        audience: str | None,
        issuer: str | None,
        leeway: float,
    ) -> JwtVerifier | None:
        """The verifier the settings describe, or None when JWT is not configured."""
        families: dict[str, tuple[tuple[str, ...], Any]] = {}  # name -> (algorithms, key)
        if secret:
            if len(secret.encode()) < MIN_HMAC_SECRET_BYTES:
                raise JwtConfigError(
                    f"--jwt-secret must be at least {MIN_HMAC_SECRET_BYTES} bytes (RFC 7518); "
                    "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
            families["--jwt-secret"] = (HMAC_ALGORITHMS, secret)
        if public_key_path:
            key = load_public_key(public_key_path)
            families["--jwt-public-key"] = (_algorithms_for_public_key(key), key)
        if not families:
            if algorithms or audience or issuer:
                raise JwtConfigError(
                    "--jwt-algorithms, --jwt-audience and --jwt-issuer need --jwt-secret or --jwt-public-key"
                )
            return None
        if leeway < 0:
            raise JwtConfigError("--jwt-leeway cannot be negative")
        if algorithms:
            wanted = [name.strip() for name in algorithms.split(",") if name.strip()]
        else:
            wanted = [_default_algorithm(family) for family, _ in families.values()]
        keys_by_algorithm = {}
        for name in wanted:
            key = next((key for family, key in families.values() if name in family), None)
            if key is None:
                configured = ", ".join(alg for family, _ in families.values() for alg in family)
                raise JwtConfigError(
                    f"--jwt-algorithms: {name} does not fit the configured key (possible: {configured})"
                )
            keys_by_algorithm[name] = key
        return cls(keys_by_algorithm, audience or None, issuer or None, leeway)

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self.keys_by_algorithm)

    def verify(self, token: str) -> Identity:
        """The identity a valid token carries; anything else is a 401 that says what was wrong."""
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise _invalid("the token is malformed") from None
        key = self.keys_by_algorithm.get(algorithm) if isinstance(algorithm, str) else None
        if key is None or not isinstance(algorithm, str):
            raise _invalid("the token's algorithm is not accepted")
        required = [*REQUIRED_CLAIMS, *(["aud"] if self.audience else []), *(["iss"] if self.issuer else [])]
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": required},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"the token has no {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), "the token is not valid")
            raise _invalid(reason) from None
        if not claims["sub"]:
            raise _invalid("the token's sub claim is empty")
        return Identity(subject=f"jwt:{claims['sub']}", scopes=scopes_of(claims), method="jwt", claims=claims)


def scopes_of(claims: dict[str, Any]) -> frozenset[str]:
    """Scopes from the ``scope`` claim (space-separated, RFC 8693) and/or a ``scopes`` list."""
    scopes: set[str] = set()
    scope = claims.get("scope")
    if scope is not None:
        if not isinstance(scope, str):
            raise _invalid("the scope claim must be a space-separated string")
        scopes.update(scope.split())
    listed = claims.get("scopes")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
            raise _invalid("the scopes claim must be a list of strings")
        scopes.update(listed)
    return frozenset(scopes)
