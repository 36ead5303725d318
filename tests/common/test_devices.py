import torch

from common.devices import choose_placement, place


def test_cpu_placement_keeps_float32_and_the_shared_weights(tiny_llama):
    placement = choose_placement(num_gpus=0)
    assert placement.device.type == "cpu" and placement.dtype == torch.float32
    assert place(tiny_llama, placement) is tiny_llama  # no copy on the CPU


def test_a_process_without_a_gpu_stays_on_the_cpu_even_if_it_asked_for_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_placement(num_gpus=1).device.type == "cpu"


def test_half_precision_placement_trains_and_generates(tiny_llama):
    """What a GPU replica does (bfloat16), exercised on the CPU: prefixes follow the model."""
    from common.data import Example
    from common.devices import Placement
    from common.generation import DecodingConfig, generate_texts
    from common.training import train_prefix
    from common.training_config import TrainingConfig

    placed = place(tiny_llama, Placement(torch.device("cpu"), torch.bfloat16))
    assert next(placed.model.parameters()).dtype == torch.bfloat16
    config = TrainingConfig(prefix_length=3, mid_dim=16, epochs=2, batch_size=2)
    result = train_prefix(placed, [Example("alpha", "red"), Example("beta", "one")], config)
    assert result.prefix.key_values.dtype == torch.float32  # stored as configured
    assert (
        len(generate_texts(placed, [(result.prefix, "alpha")], DecodingConfig(max_new_tokens=3)))
        == 1
    )
