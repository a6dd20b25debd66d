"""The local stack's names the CLI's parser shows, without the stack's machinery.

``medvault --help`` and every client command build the whole parser; importing the stack
itself (SQLAlchemy, minio, the PKCS#11 binding) only to list its choices cost every
command a third of a second.
"""

from __future__ import annotations

# Client certificates every stack gets, with the role carried in their OU: an
# application, and a sample person for each default role of deploy/policy.toml, so
# anyone can try the roles by hand (`medvault stack env --as physician`).
DEFAULT_CLIENTS = {
    "local-admin": "admin",
    "local-app": "application",
    "dr-lan": "physician",
    "nurse-hoa": "nurse",
    "rad-minh": "radiologist",
    "clerk-thu": "records_clerk",
    "officer-an": "security_officer",
    "backup-op": "backup_operator",
    "keys-admin": "key_admin",
}
DEFAULT_REPLICAS = 2
TOPOLOGIES = ("single", "cluster")
