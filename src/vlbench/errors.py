"""The one error type of a bad params.yaml, at the bottom of the import graph: config, params, the
model registries and the data readers all raise it, and the CLI turns it into exit status 2."""
from __future__ import annotations


class ParamError(ValueError):
    """A bad value in params.yaml; the message starts with the dotted key."""
