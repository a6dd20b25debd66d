"""The backup target a ``[backup]`` section names: settings with overrides, the target.

Used by the composition root (``service.backup.build``) and by the commands that still
work from the config file (``medvault restore --into``, offline ``backup verify``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from service.config import BackupConfig, Config, ConfigError, read_secret
from storage import BackupTarget, DirectoryTarget, S3Target, make_minio_client


def backup_settings(
    config: Config, *, target: str = "", bucket: str = "", directory: str = ""
) -> BackupConfig:
    """``[backup]`` of ``config`` with the given overrides (empty = keep the file's)."""
    overrides: dict[str, Any] = {
        name: value
        for name, value in (("target", target), ("bucket", bucket), ("directory", directory))
        if value
    }
    if "directory" in overrides:  # a path given on the command line is used as given
        overrides["directory"] = str(Path(overrides["directory"]).resolve())
    return replace(config.backup, **overrides)


def make_target(config: Config, s: BackupConfig) -> BackupTarget:
    """The configured target, created if absent; S3 defaults to the ``[s3]`` endpoint."""
    if s.target == "directory":
        directory = DirectoryTarget(config.base_dir / s.directory)
        directory.ensure()
        return directory
    if s.target != "s3":
        raise ConfigError(f"[backup] target must be 's3' or 'directory', not {s.target!r}")
    s3 = config.s3
    if s.access_key_file:
        access = read_secret("", s.access_key_file)
        secret = read_secret("", s.secret_key_file)
    else:
        access = read_secret(s3.access_key_env, s3.access_key_file)
        secret = read_secret(s3.secret_key_env, s3.secret_key_file)
    client = make_minio_client(
        s.endpoint or s3.endpoint, access, secret,
        secure=s3.secure if s.secure is None else s.secure,
        ca_file=(s.ca_file or s3.ca_file) or None,
    )  # fmt: skip
    target = S3Target(client, s.bucket, lock_days=s.object_lock_days)
    target.ensure_bucket()
    return target
