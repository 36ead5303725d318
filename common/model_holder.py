"""The one process per cluster that loads the frozen model and owns its object-store copy.

Whoever needs the model (the scheduler for its trainers, the Serve application for its
inference replicas) asks the holder instead of loading it: a detached actor named after the
model and the data directory (:func:`holder_name`), started by the first to ask. The
object's owner must outlive every user of it, so the weights are put by this actor rather than
by whichever short-lived process asked first.

    shared = get_shared_model(settings)       # the SharedModel, unpickled here
    ref = model_holder(settings).get.remote() # a reference, resolved where it is passed

No torch here, on purpose: the scheduler hands its trainers such a reference and never
unpickles the model's tokenizer itself, so it never imports transformers and torch (seconds
of CPU at every start, and their memory for the process's life).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, cast

import ray

if TYPE_CHECKING:
    from common.shared_weights import SharedModel


class ModelHolder:
    """Loads the model once and owns its object-store copy for as long as it lives."""

    def __init__(self, settings: Any) -> None:
        from common.model_loading import load_model
        from common.shared_weights import share_model

        self.shared = share_model(load_model(settings=settings))

    def get(self) -> SharedModel:
        return self.shared

    def weights_id(self) -> str:
        """The object id of the weights, the same for every process that maps them."""
        return self.shared.weights.hex()


def holder_name(settings: Any) -> str:
    """Stable across processes (unlike ``hash()``): one holder per model and data dir."""
    digest = hashlib.sha256(f"{settings.model}|{settings.home_dir}".encode()).hexdigest()
    return f"prefixd-model-{digest[:16]}"


def model_holder(settings: Any, *, namespace: str | None = None) -> Any:
    """The holder of ``settings``' model (an actor handle), started if none runs yet."""
    return (
        ray.remote(ModelHolder)
        .options(
            name=holder_name(settings),
            namespace=namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
        )
        .remote(settings)
    )


def get_shared_model(settings: Any, *, namespace: str | None = None) -> SharedModel:
    """The model of ``settings`` in the object store, loaded once per cluster; the scheduler,
    its trainers and every inference replica get the same object."""
    holder = model_holder(settings, namespace=namespace)
    return cast("SharedModel", ray.get(holder.get.remote()))
