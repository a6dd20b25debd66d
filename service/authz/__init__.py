"""Authorization: permissions, the role policy, and the decision for each RPC.

Public surface: ``Policy`` (what a role may do), ``PolicyHolder`` (the live policy,
reloaded on SIGHUP), ``Decision`` and ``PermissionDeniedError``. The RPC -> permission
table lives in ``service.authz.permissions``.
"""

from service.authz.model import (
    Application,
    Decision,
    DelegationConfig,
    PermissionDeniedError,
    Policy,
    PolicyError,
    Role,
)
from service.authz.policy import PolicyHolder, install_sighup, load

__all__ = [
    "Application",
    "Decision",
    "DelegationConfig",
    "PermissionDeniedError",
    "Policy",
    "PolicyError",
    "PolicyHolder",
    "Role",
    "install_sighup",
    "load",
]
