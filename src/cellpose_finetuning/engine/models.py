"""Networks and checkpoints: what a model *is* and how it is loaded.

Every network here is cellpose's own :class:`cellpose.vit_sam.Transformer`.
What varies is the SAM image encoder inside it, described by an
:class:`ArchSpec`. The ``cpsam`` preset is the real Cellpose-SAM (ViT-L);
``tiny`` and ``small`` are the same class with a smaller encoder, for tests,
demos and benchmarks on a CPU.

Checkpoints we write are plain cellpose state dicts (``torch.save`` of
``net.state_dict()``), so cellpose itself can load a fine-tuned ``cpsam``
checkpoint, plus one extra tensor entry, :data:`ARCH_KEY`, holding the
architecture as JSON bytes. Cellpose loads with ``strict=False`` and ignores
that entry; we read it to rebuild the right network.

The name ``cpsam`` goes through cellpose's own loading path
(``CellposeModel(pretrained_model="cpsam")``): the weights are taken from
``$CELLPOSE_LOCAL_MODELS_PATH/cpsam`` (or ``~/.cellpose/models/cpsam``) and
downloaded by cellpose on first use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cellpose_finetuning.engine.sam_encoder import register_encoder
from cellpose_finetuning.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    import torch
    from cellpose.models import CellposeModel
    from cellpose.vit_sam import Transformer

__all__ = [
    "ARCH_KEY",
    "PRESETS",
    "PRETRAINED_MODELS",
    "ArchSpec",
    "arch_from_state_dict",
    "build_network",
    "is_bioimageio_package",
    "load_cellpose_model",
    "load_network",
    "pick_device",
    "save_network",
]

#: State-dict entry that carries the architecture of checkpoints we write.
ARCH_KEY = "cellpose_finetuning_arch"

#: Names that resolve to a pretrained model through cellpose itself.
PRETRAINED_MODELS = ("cpsam",)


class ArchSpec(BaseModel):
    """The shape of a Cellpose-SAM network.

    Parameters mirror SAM's ``ImageEncoderViT`` and cellpose's ``Transformer``.
    The encoder must keep ``img_size=1024``, ``patch_size=16`` and
    ``out_chans=256`` because ``Transformer`` slices SAM's 64x64 position
    embedding and reads out 256 channels.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("custom", description="Preset name, informational.")
    embed_dim: int = Field(1024, ge=8)
    depth: int = Field(24, ge=1)
    num_heads: int = Field(16, ge=1)
    global_attn_indexes: tuple[int, ...] = (5, 11, 17, 23)
    ps: int = Field(8, description="Token (patch) size in pixels.")
    bsize: int = Field(256, description="Tile size the network accepts.")
    nout: int = Field(3, description="Outputs: dY, dX, cell probability.")

    @property
    def is_cpsam(self) -> bool:
        """Whether this is the real Cellpose-SAM (ViT-L) architecture."""
        return self == PRESETS["cpsam"].model_copy(update={"name": self.name})


PRESETS: dict[str, ArchSpec] = {
    # ViT-L, exactly what cellpose's CellposeModel builds: 304.6 M parameters.
    "cpsam": ArchSpec(name="cpsam"),
    # ~0.75 M parameters (the 256-channel neck dominates): seconds per epoch on CPU.
    "tiny": ArchSpec(name="tiny", embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,)),
    # A mid-size network for benchmarks: ~1.7 M parameters.
    "small": ArchSpec(
        name="small", embed_dim=128, depth=4, num_heads=4, global_attn_indexes=(1, 3)
    ),
}


def build_network(arch: ArchSpec, dtype: torch.dtype | None = None) -> Transformer:
    """Build an untrained cellpose ``Transformer`` with the given architecture.

    Parameters
    ----------
    arch : ArchSpec
        The encoder shape; see :data:`PRESETS`.
    dtype : torch.dtype, optional
        Parameter dtype, float32 by default.

    Returns
    -------
    cellpose.vit_sam.Transformer
        The network, on the CPU.
    """
    import torch

    from cellpose_finetuning.engine.cellpose_compat import transformer_class

    Transformer = transformer_class()  # noqa: N806 (a class)
    key = register_encoder(
        f"cellpose_finetuning:{arch.model_dump_json()}",
        arch.embed_dim,
        arch.depth,
        arch.num_heads,
        arch.global_attn_indexes,
    )
    return Transformer(
        backbone=key, ps=arch.ps, nout=arch.nout, bsize=arch.bsize, dtype=dtype or torch.float32
    )


def _encode_arch(arch: ArchSpec) -> torch.Tensor:
    import torch

    raw = arch.model_dump_json().encode()
    return torch.tensor(list(raw), dtype=torch.uint8)


def _decode_arch(tensor: torch.Tensor) -> ArchSpec:
    return ArchSpec.model_validate(json.loads(bytes(tensor.tolist()).decode()))


def save_network(net: Transformer, arch: ArchSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``net`` as a cellpose-compatible state dict that carries ``arch``.

    The file is written to a temporary name and renamed, so a reader never
    sees half a checkpoint, and a failed write leaves the previous file intact.

    Parameters
    ----------
    net : cellpose.vit_sam.Transformer
        The network to save (any dtype; saved as float32).
    arch : ArchSpec
        Its architecture.
    path : path-like
        Destination file.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in net.state_dict().items()}
    state[ARCH_KEY] = _encode_arch(arch)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, Any], ArchSpec]:
    """Read a checkpoint file and the architecture it needs.

    Files without :data:`ARCH_KEY` (cellpose's own, such as ``cpsam``) are
    taken as the ``cpsam`` architecture, and their shapes are checked. A
    BioImage.IO package we exported (its zip, or its folder) gives its
    ``pytorch_state_dict`` weights, a plain cellpose state dict.

    Raises
    ------
    InvalidInput
        If the file is not a readable torch state dict.
    """
    import torch

    path = Path(path)
    if is_bioimageio_package(path):
        return _read_package_state_dict(path)
    if not path.is_file():
        raise NotFound("model file", str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds here
        raise InvalidInput(str(path), f"not a readable torch checkpoint ({exc})") from exc
    if not isinstance(state, dict) or not state:
        raise InvalidInput(str(path), "not a state dict (expected a mapping of tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    arch_tensor = state.pop(ARCH_KEY, None)
    if arch_tensor is not None:
        return state, _decode_arch(arch_tensor)
    return state, arch_from_state_dict(state, name=str(path))


def arch_from_state_dict(state: dict[str, Any], name: str = "checkpoint") -> ArchSpec:
    """The architecture a plain cellpose state dict needs, read from its shapes.

    Plain state dicts (cellpose's own ``cpsam`` file, ``model_weights.pth`` of
    an exported package) carry no :data:`ARCH_KEY`. The encoder's width is the
    patch embedding's output channels, its depth the number of blocks, the
    head count follows from the relative position tables (width / head size),
    and blocks with a 64-token table (127 rows) use global attention.

    Raises
    ------
    InvalidInput
        If the dict is not a cellpose ``Transformer``'s.
    """
    try:
        proj = state["encoder.patch_embed.proj.weight"]
        embed_dim, ps = int(proj.shape[0]), int(proj.shape[-1])
        blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks.")})
        tables = [state[f"encoder.blocks.{i}.attn.rel_pos_h"] for i in blocks]
        head_dim = int(tables[0].shape[1])
        bsize = int(state["encoder.pos_embed"].shape[1]) * ps
        nout = int(state["out.weight"].shape[0]) // (ps * ps)
    except (KeyError, IndexError, AttributeError) as exc:
        raise InvalidInput(
            name, f"not a Cellpose-SAM network state dict (no {exc} entry)"
        ) from None
    arch = ArchSpec(
        name="custom",
        embed_dim=embed_dim,
        depth=len(blocks),
        num_heads=max(1, embed_dim // head_dim),
        global_attn_indexes=tuple(
            i for i, t in zip(blocks, tables, strict=True) if int(t.shape[0]) == 127
        ),
        ps=ps,
        bsize=bsize,
        nout=nout,
    )
    for preset in PRESETS.values():
        if arch == preset.model_copy(update={"name": "custom"}):
            return preset
    return arch


def is_bioimageio_package(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a BioImage.IO package: a folder or zip with ``rdf.yaml`` at its root."""
    import zipfile

    path = Path(path)
    if path.is_dir():
        return (path / "rdf.yaml").is_file()
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return "rdf.yaml" in zf.namelist()
    except zipfile.BadZipFile:
        return False


def _read_package_state_dict(path: Path) -> tuple[dict[str, Any], ArchSpec]:
    """The ``pytorch_state_dict`` weights of a package and the architecture it records."""
    import io
    import zipfile

    import torch
    import yaml

    def read(name: str) -> bytes:
        if path.is_dir():
            return (path / name).read_bytes()
        with zipfile.ZipFile(path) as zf:
            return zf.read(name)

    try:
        rdf = yaml.safe_load(read("rdf.yaml"))
        entry = rdf["weights"]["pytorch_state_dict"]
        raw = read(str(entry["source"]))
    except (KeyError, TypeError, OSError, yaml.YAMLError) as exc:
        raise InvalidInput(
            str(path), f"BioImage.IO package without readable pytorch_state_dict weights ({exc})"
        ) from exc
    recorded = (rdf.get("config") or {}).get("cellpose_finetuning", {}).get("architecture")
    kwargs = (entry.get("architecture") or {}).get("kwargs") or {}
    try:
        if recorded:
            arch = ArchSpec.model_validate(recorded)
        else:
            fields = set(ArchSpec.model_fields) - {"name"}
            arch = ArchSpec(name="package", **{k: v for k, v in kwargs.items() if k in fields})
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # pydantic or torch
        raise InvalidInput(
            str(path), f"not a cellpose network package (architecture or weights: {exc})"
        ) from exc
    if not isinstance(state, dict) or not state:
        raise InvalidInput(str(path), "package weights are not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state.pop(ARCH_KEY, None)
    return state, arch


def load_network(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> tuple[Transformer, ArchSpec]:
    """Load a checkpoint written by :func:`save_network` (or a cpsam-shaped one).

    Unlike cellpose's ``load_model`` this is strict: a missing or unexpected
    weight is an error rather than silently left at its random initial value.

    Returns
    -------
    (Transformer, ArchSpec)
        The network (float32 unless ``dtype`` is given) and its architecture.
    """
    state, arch = read_state_dict(path)
    net = build_network(arch)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidInput(
            str(path), f"weights do not fit the {arch.name!r} architecture: {exc}"
        ) from exc
    if dtype is not None:
        net.to(dtype)
        net.dtype = dtype
    return net, arch


def pick_device(device: str | None = None) -> torch.device:
    """Choose the torch device: ``device`` if given, else CUDA, MPS, then CPU."""
    import torch

    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    from cellpose_finetuning.engine.devices import warn_if_gpu_unused

    warn_if_gpu_unused()  # a GPU torch cannot use: say so instead of a silent fallback
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (cellpose's default), float32 elsewhere.

    On a CPU cellpose's default bfloat16 is 14-20x slower than float32.
    """
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def wrap_network(net: Transformer, device: torch.device, name: str) -> CellposeModel:
    """Wrap a network in a :class:`cellpose.models.CellposeModel` for ``eval``.

    ``CellposeModel.__init__`` always builds ViT-L; we set the four attributes
    ``eval`` reads instead, so any architecture works.
    """
    from cellpose_finetuning.engine.cellpose_compat import make_eval_model

    return make_eval_model(net, device, name)


def load_cellpose_model(
    model: str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: Literal["auto", "float32", "bfloat16"] = "auto",
) -> tuple[CellposeModel, ArchSpec]:
    """Load a model by pretrained name or checkpoint path.

    Parameters
    ----------
    model : str or path-like
        ``"cpsam"`` (cellpose's own loading: ``CELLPOSE_LOCAL_MODELS_PATH``,
        download on first use) or a checkpoint file.
    device : str, optional
        Torch device; picked automatically by default.
    dtype : {"auto", "float32", "bfloat16"}
        ``auto`` is bfloat16 on CUDA and float32 elsewhere.

    Returns
    -------
    (cellpose.models.CellposeModel, ArchSpec)
    """
    import torch

    dev = pick_device(device)
    torch_dtype = default_dtype(dev) if dtype == "auto" else getattr(torch, dtype)
    name = os.fspath(model)
    if name in PRETRAINED_MODELS:
        from cellpose.models import CellposeModel

        cp = CellposeModel(
            pretrained_model=name, device=dev, use_bfloat16=torch_dtype == torch.bfloat16
        )
        return cp, PRESETS["cpsam"]
    path = Path(name)
    if not path.is_file() and not is_bioimageio_package(path):
        raise NotFound(
            "model",
            name,
            f"Use one of {list(PRETRAINED_MODELS)}, a .pth checkpoint file or a BioImage.IO "
            "package (zip or folder) exported by cellpose-finetuning.",
        )
    net, arch = load_network(path, dtype=torch_dtype)
    return wrap_network(net, dev, str(path)), arch
