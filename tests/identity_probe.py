"""A plugin that remembers the identity each authorized request carried; it never votes."""

from forgellm import hookimpl


class IdentityProbe:
    def __init__(self) -> None:
        self.identities = []

    @hookimpl
    def authorize(self, identity, action, request, server):
        self.identities.append(identity)
