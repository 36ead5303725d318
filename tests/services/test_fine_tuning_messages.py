"""The message of an OpenAI fine-tuning event names the losses that were measured."""

from services.api.routes.fine_tuning import _event_message


def test_an_event_names_only_the_losses_it_has() -> None:
    assert _event_message(3, 10, 0.51234, None) == "Step 3/10: training loss=0.5123"
    assert _event_message(10, 10, None, 1.5) == "Step 10/10: validation loss=1.5000"
    assert _event_message(4, 10, 0.5, 0.75) == (
        "Step 4/10: training loss=0.5000, validation loss=0.7500"
    )
    assert _event_message(0, None, None, None) == "Step 0"
