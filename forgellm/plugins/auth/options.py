"""The auth plugin's settings: each is a ``forgellm run`` flag and a ``FORGELLM_*`` variable."""

from __future__ import annotations

import click

from forgellm import Option

AUTH_OPTIONS = (
    Option(
        "api_key",
        "An API key clients may send; repeat for several. Holds every scope. (Its variable "
        "FORGELLM_API_KEY splits on whitespace; FORGELLM_API_KEYS takes commas.)",
        multiple=True,
        secret=True,
    ),
    Option("api_keys", "Comma-separated API keys, as if each were given with --api-key.", secret=True),
    Option(
        "api_keys_file",
        "Keys file managed by `forgellm keys`; re-read when it changes. "
        "Default: ~/.config/forgellm/keys.json ($XDG_CONFIG_HOME), used when it exists.",
        type=click.Path(dir_okay=False),
    ),
    Option("jwt_secret", "Shared secret (32 bytes or more) for HS256 JWTs.", secret=True),
    Option(
        "jwt_public_key",
        "PEM public key for RS256 (RSA), ES256/384/512 (EC) or EdDSA JWTs.",
        type=click.Path(exists=True, dir_okay=False),
    ),
    Option(
        "jwt_algorithms",
        "Comma-separated JWT algorithms to accept. Default: HS256 with --jwt-secret, and RS256, "
        "the curve's ES* or EdDSA for --jwt-public-key. A token's own alg header never widens this.",
    ),
    Option("jwt_audience", "Required `aud` claim of JWTs."),
    Option("jwt_issuer", "Required `iss` claim of JWTs."),
    Option("jwt_leeway", "Seconds of clock skew allowed when checking exp and nbf.", type=float, default=30.0),
)
