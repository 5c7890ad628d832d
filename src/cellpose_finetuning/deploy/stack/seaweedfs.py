"""SeaweedFS, the stack's S3: its identities file, its command line and its readiness check.

SeaweedFS runs as ``weed server`` with master, volume, filer and S3 in one
process, on loopback, with the stack's S3 keys as its only identity. It is
ready when ``/healthz`` answers *and* a signed ``ListBuckets`` succeeds:
Hypha's first ``CreateBucket`` fails otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cellpose_finetuning.deploy.stack.config import StackConfig
from cellpose_finetuning.deploy.stack.files import write_private
from cellpose_finetuning.deploy.stack.processes import find_bin

__all__ = ["s3_accepts_keys", "weed_command", "write_identities"]


def write_identities(path: Path, access_key: str, secret_key: str) -> Path:
    """Write SeaweedFS's S3 identities (one admin: the stack's keys) to ``path``, 0600."""
    identities = {
        "identities": [
            {
                "name": "hypha-admin",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    write_private(path, json.dumps(identities))
    return path


def weed_command(config: StackConfig, data_dir: Path, s3_conf: Path) -> list[str]:
    """The ``weed server`` command line for ``config`` on ``data_dir``."""
    c = config
    return [
        find_bin("weed"),
        "server",
        f"-dir={data_dir / 's3' / 'data'}",
        f"-ip={c.host}",
        f"-ip.bind={c.host}",
        f"-master.port={c.weed_master_port}",
        f"-volume.port={c.weed_volume_port}",
        "-filer",
        f"-filer.port={c.weed_filer_port}",
        "-s3",
        f"-s3.port={c.s3_port}",
        f"-s3.config={s3_conf}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=256",
        # each bucket takes ~7 volumes on its first write
        "-volume.max=32",
        "-volume.preStopSeconds=1",
        # a restart on existing state waits for this election: 13 s at 10 s
        "-master.electionTimeout=1s",
        "-master.telemetry=false",
        *c.weed_extra_args,
    ]


def s3_accepts_keys(endpoint: str, access_key: str, secret_key: str) -> Callable[[], bool]:
    """A readiness check: whether S3 at ``endpoint`` answers a signed ``ListBuckets``."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5, proxies={}),
    )

    def ready() -> bool:
        try:
            client.list_buckets()
        except Exception:
            return False
        return True

    return ready
