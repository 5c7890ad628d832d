"""The embedded local stack: SeaweedFS (S3) + Hypha server (SQLite), supervised.

Both servers run as child processes, each in its own process group, under one
data directory, following the verified recipe in our notes: SeaweedFS first
(wait for ``/healthz`` and for a signed ``ListBuckets``: Hypha's first
``CreateBucket`` fails otherwise), then Hypha with its artifact manager on S3
and SQLite (wait for ``/health/readiness``), then the service's workspace and
its default model collection are created if missing. Shutdown goes the other
way: Hypha (SIGTERM, SIGKILL after 10 s), then SeaweedFS, whose filer takes
up to ~20 s (SIGKILL after 30 s). Every port is checked before anything starts.

The JWT secret and the S3 keys are generated once and kept (mode 0600) in the
data directory, so tokens, datasets and models survive a restart. Registered
services do not: Hypha keeps them in memory, so the service registers again
at each start.

Workspaces. Each user ``<id>`` owns ``ws-user-<id>``. The service lives in a
named workspace (``bioimage-io`` by default, so that
``get_service("bioimage-io/cellpose-finetuning")`` works as it does on the
public server), owned by the service's own user (``cellpose-service``) and
created at every start: Hypha forgets workspaces it has not loaded after a
restart, so creating it before anyone else can connect keeps it ours.

Layout of ``data_dir``::

    secret.json          JWT secret and S3 keys (0600)
    stack.lock           held while a stack runs on this directory (filelock)
    stack.owner          the process id of the stack holding the lock
    stack.pids           process ids of the running children
    s3/                  SeaweedFS state (data/) and its identities (s3.json, 0600)
    hypha/               SQLite database, Hypha's working directory
    logs/                weed.log, hypha.log
    web/                 the web page and its config.json, copied at each start
    connection.json      how to connect, while serving (0600)

Modules, one job each: :mod:`.config` (settings, port plan, checks),
:mod:`.files` (private files), :mod:`.processes` (children, logs, leftovers,
the lock), :mod:`.seaweedfs`, :mod:`.hypha`, :mod:`.provisioning` (workspace
and collection, shared with ``serve --server-url``), :mod:`.tokens` (minting,
expiry, the lifetime rule), :mod:`.connection` (``connection.json``) and
:mod:`.embedded` (:class:`EmbeddedStack`). Everything public is importable
from here, as it was from the former module ``deploy/stack.py``.
"""

from __future__ import annotations

from cellpose_finetuning.deploy.stack.config import (
    GRPC_OFFSET,
    StackConfig,
    StackError,
    check_platform,
    port_is_free,
)
from cellpose_finetuning.deploy.stack.connection import (
    CONNECTION_FILE,
    connection_record,
    read_connection_file,
    remove_connection_file,
    write_connection_file,
)
from cellpose_finetuning.deploy.stack.embedded import EmbeddedStack
from cellpose_finetuning.deploy.stack.files import PRIVATE_UMASK, make_private, write_private
from cellpose_finetuning.deploy.stack.provisioning import (
    connection_user,
    ensure_collection,
    ensure_workspace,
    provision,
)
from cellpose_finetuning.deploy.stack.tokens import (
    SERVICE_TOKEN_LIFETIME,
    USER_TOKEN_LIFETIME,
    check_token_lifetime,
    mask_token,
    mint_token,
    token_expiry,
    user_workspace,
)
from cellpose_finetuning.names import SERVICE_ID

__all__ = [
    "CONNECTION_FILE",
    "GRPC_OFFSET",
    "PRIVATE_UMASK",
    "SERVICE_ID",
    "SERVICE_TOKEN_LIFETIME",
    "USER_TOKEN_LIFETIME",
    "EmbeddedStack",
    "StackConfig",
    "StackError",
    "check_platform",
    "check_token_lifetime",
    "connection_record",
    "connection_user",
    "ensure_collection",
    "ensure_workspace",
    "make_private",
    "mask_token",
    "mint_token",
    "port_is_free",
    "provision",
    "read_connection_file",
    "remove_connection_file",
    "token_expiry",
    "user_workspace",
    "write_connection_file",
    "write_private",
]
