"""Who is calling: the subject of the client certificate presented over mutual TLS.

Roles, delegation tokens and patient scope come with the access-control issue; this
module is their seam.
"""

from __future__ import annotations

import grpc

ANONYMOUS = "anonymous"


def caller(context: grpc.ServicerContext) -> str:
    """The client certificate's common name, or ``anonymous`` when TLS is off."""
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    return names[0].decode() if names else ANONYMOUS
