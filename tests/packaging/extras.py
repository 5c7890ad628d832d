"""Which extra each of our modules needs: the promise the packaging tests check.

A module not listed needs the base install only. ``test_dependencies`` checks every
third-party import (lazy ones included) against the distributions that the base
and these extras declare; ``test_install`` installs the wheel with each extra into
a fresh venv and imports the modules it promises.
"""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "cellpose_finetuning"

#: module path (relative to src/, a file or a folder ending in /) -> the extras it needs
EXTRAS_OF: dict[str, frozenset[str]] = {
    # remote commands, dataset upload: hypha-rpc, httpx
    "cellpose_finetuning/client.py": frozenset({"client"}),
    "cellpose_finetuning/data/artifacts.py": frozenset({"client"}),
    "cellpose_finetuning/data/publishing.py": frozenset({"client"}),
    # direct S3 reads on the embedded stack (boto3): only built when serving on it
    "cellpose_finetuning/data/s3direct.py": frozenset({"server"}),
    # the service object and its token checks also run on BioEngine replicas ([client,export])
    "cellpose_finetuning/service/": frozenset({"client"}),
    "cellpose_finetuning/deploy/serve.py": frozenset({"client"}),
    # what serve --server-url and BioEngine replicas use of the stack package:
    # tokens (python-jose), provisioning (hypha-rpc), config, connection.json
    "cellpose_finetuning/deploy/stack/tokens.py": frozenset({"client"}),
    "cellpose_finetuning/deploy/stack/provisioning.py": frozenset({"client"}),
    # the health check asks Hypha, S3 and the service over HTTP and RPC
    "cellpose_finetuning/deploy/health.py": frozenset({"client"}),
    "cellpose_finetuning/deploy/bioengine.py": frozenset({"client"}),
    # the CLI's remote and bioengine commands import hypha-rpc lazily
    "cellpose_finetuning/cli/": frozenset({"client"}),
    "cellpose_finetuning/export/": frozenset({"export"}),
    # the stack's processes: SeaweedFS (boto3), Hypha, the directory lock
    "cellpose_finetuning/deploy/stack/embedded.py": frozenset({"server"}),
    "cellpose_finetuning/deploy/stack/processes.py": frozenset({"server"}),
    "cellpose_finetuning/deploy/stack/seaweedfs.py": frozenset({"server"}),
    "cellpose_finetuning/deploy/stack/hypha.py": frozenset({"server"}),
    "cellpose_finetuning/deploy/testing.py": frozenset({"server"}),
    "cellpose_finetuning/web/": frozenset({"server"}),
    "cellpose_finetuning/deploy/ray_backend.py": frozenset({"ray"}),
    # lazy Zarr and compressed-TIFF access for whole-slide images
    "cellpose_finetuning/engine/blockio.py": frozenset({"wsi"}),
}

#: modules each install must import (base's are imported by every extra's venv too)
PROMISED: dict[str, list[str]] = {
    "base": [
        "cellpose_finetuning",
        "cellpose_finetuning.errors",
        "cellpose_finetuning.io",
        "cellpose_finetuning.data",
        "cellpose_finetuning.engine.cellpose_compat",
        "cellpose_finetuning.engine.devices",
        "cellpose_finetuning.engine.inference",
        "cellpose_finetuning.engine.metrics",
        "cellpose_finetuning.engine.models",
        "cellpose_finetuning.engine.plots",
        "cellpose_finetuning.engine.runs",
        "cellpose_finetuning.engine.sessions",
        "cellpose_finetuning.engine.training",
        "cellpose_finetuning.scheduler",
        "cellpose_finetuning.sample_data",
        "cellpose_finetuning.cli",
    ],
    "client": [
        "cellpose_finetuning.client",
        "cellpose_finetuning.data.artifacts",
        "cellpose_finetuning.service.api",
        "cellpose_finetuning.service.auth",
        "cellpose_finetuning.deploy.serve",
        "cellpose_finetuning.deploy.stack.tokens",
        "cellpose_finetuning.deploy.stack.provisioning",
        "cellpose_finetuning.deploy.bioengine",
        "hypha_rpc",
        "httpx",
        "jose.jwt",
    ],
    "export": [
        "cellpose_finetuning.export.bioimageio",
        "cellpose_finetuning.export.bioimageio.wrapper",
        "bioimageio.core",
        "bioimageio.spec",
    ],
    "server": [
        "cellpose_finetuning.deploy.stack",
        "cellpose_finetuning.deploy.serve",
        "cellpose_finetuning.deploy.testing",
        "cellpose_finetuning.web",
        "cellpose_finetuning.service.api",
        "hypha.server",
        "boto3",
        "botocore.config",
        "jose.jwt",
        "filelock",
        "httpx",
    ],
}


def extras_of(module_file: Path) -> frozenset[str]:
    """The extras ``module_file`` (a path under ``src/``) needs beyond the base."""
    rel = module_file.resolve().relative_to(SRC).as_posix()
    found: frozenset[str] = frozenset()
    for key, extras in EXTRAS_OF.items():
        if rel == key or (key.endswith("/") and rel.startswith(key)):
            found |= extras
    return found
