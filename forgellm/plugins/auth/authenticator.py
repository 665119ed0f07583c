"""The auth plugin's decision for one request: which configured key or token its credential matches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from litestar.datastructures import Headers

from forgellm import INVALID_CREDENTIALS, Identity, Settings, Unauthorized
from forgellm.plugins.auth.api_keys import ApiKey, find_key, static_keys
from forgellm.plugins.auth.credentials import credential_of, looks_like_jwt
from forgellm.plugins.auth.jwt_tokens import JwtVerifier
from forgellm.plugins.auth.keys_file import WatchedKeysFile, default_keys_path


class AuthConfigError(ValueError):
    """The auth plugin is on but its settings cannot work; the message says how to fix them."""


@dataclass
class Authenticator:
    static_keys: list[ApiKey]
    keys_file: WatchedKeysFile | None
    jwt: JwtVerifier | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        try:
            keys = static_keys(settings.api_key, settings.api_keys)
            jwt = JwtVerifier.from_settings(
                secret=settings.jwt_secret,
                public_key_path=settings.jwt_public_key,
                algorithms=settings.jwt_algorithms,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway,
            )
            keys_file = cls._keys_file(settings.api_keys_file)
        except ValueError as exc:
            raise AuthConfigError(f"auth plugin: {exc}") from None
        if not keys and keys_file is None and jwt is None:
            raise AuthConfigError(
                "auth plugin: no credentials are configured, so every request would be refused; give --api-key, "
                f"create keys with `forgellm keys add NAME` (file: {default_keys_path()}), or set --jwt-secret "
                "or --jwt-public-key"
            )
        return cls(keys, keys_file, jwt)

    @staticmethod
    def _keys_file(explicit: str | None) -> WatchedKeysFile | None:
        """The named keys file (which must exist), else the default one if it exists."""
        path = Path(explicit).expanduser() if explicit else default_keys_path()
        try:
            path.stat()
        except FileNotFoundError:
            if explicit:
                raise ValueError(f"--api-keys-file {path} does not exist; create it with `forgellm keys add`") from None
            return None
        except OSError as exc:  # for example a directory the server's user may not enter
            raise ValueError(f"cannot read keys file {path}: {exc.strerror}") from None
        return WatchedKeysFile(path)

    def describe(self) -> str:
        """What is accepted, for the startup log: counts and algorithms, never a secret."""
        parts = [f"{len(self.static_keys)} API keys from --api-key/FORGELLM_API_KEYS"]
        if self.keys_file is not None:
            parts.append(f"{len(self.keys_file.keys())} from keys file {self.keys_file.path}")
        if self.jwt is not None:
            parts.append(f"JWT ({', '.join(self.jwt.algorithms)})")
        return "; ".join(parts)

    def authenticate(self, headers: Headers) -> Identity:
        """The identity of the request's one credential; anything missing or wrong is a 401."""
        credential = credential_of(headers)
        file_keys = self.keys_file.keys() if self.keys_file is not None else []
        key = find_key(credential.value, [*self.static_keys, *file_keys])
        if key is not None:
            return key.identity()
        if credential.bearer and self.jwt is not None and looks_like_jwt(credential.value):
            return self.jwt.verify(credential.value)
        raise Unauthorized(INVALID_CREDENTIALS)
