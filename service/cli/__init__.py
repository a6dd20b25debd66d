"""The ``medvault`` command line.

gRPC's C core writes its own log lines to stderr (``E1129 ... ssl_transport_security.cc
...``) on top of the error a call returns; a CLI user gets one line from medvault
instead. The setting is read when ``grpc`` is first imported, so it is made here,
before any command module imports it. ``medvault serve`` keeps gRPC's default (its
log is an operator's), and an exported ``GRPC_VERBOSITY`` always wins.
"""

import os
import sys

if sys.argv[1:2] != ["serve"]:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
