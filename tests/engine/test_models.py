"""Networks and checkpoints."""

from __future__ import annotations

import pytest
import torch

from cellpose_finetuning.engine.models import (
    ARCH_KEY,
    PRESETS,
    build_network,
    load_cellpose_model,
    load_network,
    read_state_dict,
    save_network,
)
from cellpose_finetuning.errors import InvalidInput, NotFound


def test_tiny_preset_is_cellposes_transformer_class():
    from cellpose.vit_sam import Transformer

    net = build_network(PRESETS["tiny"])
    assert isinstance(net, Transformer)
    assert sum(p.numel() for p in net.parameters()) < 1_000_000


def test_checkpoint_round_trip_is_bit_exact_and_carries_the_architecture(tmp_path):
    net = build_network(PRESETS["small"])
    path = save_network(net, PRESETS["small"], tmp_path / "m.pth")
    loaded, arch = load_network(path)
    assert arch == PRESETS["small"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_checkpoint_is_a_plain_state_dict_cellpose_can_read(tmp_path):
    path = save_network(build_network(PRESETS["tiny"]), PRESETS["tiny"], tmp_path / "m.pth")
    state = torch.load(path, weights_only=True)  # what cellpose's Transformer.load_model does
    assert "encoder.pos_embed" in state and ARCH_KEY in state


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_plain_state_dict_architecture_is_read_from_its_shapes(tmp_path, preset):
    # Exported packages hold plain cellpose state dicts (no ARCH_KEY): the network
    # must still load, with exactly the weights that were saved.
    net = build_network(PRESETS[preset])
    path = tmp_path / "plain.pth"
    torch.save(net.state_dict(), path)
    _, arch = read_state_dict(path)
    assert arch == PRESETS[preset]
    loaded, _ = load_network(path)
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_state_dict_of_another_network_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(InvalidInput, match="other.pth"):
        load_network(path)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="broken.pth"):
        load_network(path)


def test_unknown_model_is_not_found():
    with pytest.raises(NotFound, match="no-such-model"):
        load_cellpose_model("no-such-model.pth")


def test_loaded_model_runs_on_cpu_in_float32(tiny_model):
    model, arch = load_cellpose_model(tiny_model)
    assert arch.name == "tiny"
    assert model.net.dtype == torch.float32 and model.device.type == "cpu"
