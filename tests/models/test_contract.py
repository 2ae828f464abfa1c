"""The model contract (fss/models/base.py), checked for every registered method.

Parametrised over the registry, as timm's tests/test_models.py is over its models: a
method added to fss/models/methods/ is tested here without a line of its own. Small
backbone, 33 px episodes and narrow heads keep the whole file to seconds.
"""

from __future__ import annotations

import inspect
import pkgutil
import sys

import pytest
import torch

import fss.models.methods
from fss.models import create_model, get_method, list_methods
from fss.models.base import FSSModel, ModelOutput
from fss.models.registry import _constructor_defaults
from tests.models.episodes import random_episode

METHODS = list_methods()
SIZE, BATCH = 33, 2


def _build(method: str, shot: int = 1, **extra) -> FSSModel:
    # narrow heads: the registry's small knob values (Knob(small=...); the defaults are the papers')
    torch.manual_seed(0)
    return create_model(method, backbone="small", shot=shot, **get_method(method).small_knobs, **extra)


def _batch(shot: int = 1, seed: int = 0) -> dict:
    batch = random_episode(b=BATCH, shot=shot, seed=seed, size=SIZE)
    # APANet's class-agnostic target: every labelled query pixel counts as a base class
    batch["query_base_masks"] = batch["query_masks"].clone()
    batch["class_ids"] = torch.tensor([1, 2])
    return batch


def test_the_methods_package_lists_every_module():
    # an explicit import list can forget a file; a forgotten method module would not register
    modules = [m.name for m in pkgutil.iter_modules(fss.models.methods.__path__) if not m.name.startswith("_")]
    assert modules and all(f"fss.models.methods.{m}" in sys.modules for m in modules)
    registered_in = {get_method(m).builder.__module__ for m in METHODS}
    assert registered_in == {f"fss.models.methods.{m}" for m in modules}


@pytest.mark.parametrize("method", METHODS)
def test_knob_defaults_live_only_in_the_knob_table(method):
    spec = get_method(method)
    assert _constructor_defaults(spec.builder, spec.knobs) == []
    accepted = set()
    for klass in spec.builder.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            params = inspect.signature(init).parameters.values()
            accepted |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}  # create_model passes knobs by name
    assert set(spec.knobs) <= accepted, sorted(set(spec.knobs) - accepted)
    for name, knob in spec.knobs.items():  # every default passes its own validation unchanged
        assert knob.coerce(method, name, knob.default) == knob.default


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_gives_finite_loss_terms_and_gradients(method):
    model = _build(method).train()
    batch = _batch()
    out = model(batch)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape[0] == BATCH and out.logits.shape[1] == 2
    assert "loss" in out.losses and all(v.dim() == 0 and torch.isfinite(v) for v in out.losses.values())
    if model.training_free:  # the floor (prototype): nothing to learn, nothing to back-propagate
        assert not model.trainable_parameters() and not out.loss.requires_grad
        return
    out.loss.backward()
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shot", [1, 2])
def test_predict_shape_and_no_training_only_branch_at_inference(method, shot):
    model = _build(method, shot).train()
    model(_batch(shot))  # one training forward first: it must leave nothing inference depends on
    model.eval()
    batch = _batch(shot, seed=1)
    # inference never sees the query's labels: they are not in the batch at all
    unlabelled = {k: batch[k] for k in ("support_images", "support_masks", "query_images")}
    with torch.no_grad():
        first = model.predict(**unlabelled)
        again = model.predict(**unlabelled)
        through_forward = model(unlabelled)
    assert first.shape == (BATCH, 2, SIZE, SIZE) and torch.isfinite(first).all()
    assert not isinstance(through_forward, ModelOutput)
    assert torch.equal(first, again) and torch.equal(first, through_forward)


@pytest.mark.parametrize("method", METHODS)
def test_fg_weight_is_a_constructor_argument_of_the_training_loss(method):
    # train.fg_weight reaches the model through create_model (fss train and fss bench alike)
    plain, weighted = _build(method).train(), _build(method, fg_weight=3.0).train()
    assert plain.fg_weight == 1.0 and weighted.fg_weight == 3.0
    batch = _batch()
    torch.manual_seed(1)
    a = plain(batch).loss
    torch.manual_seed(1)
    b = weighted(batch).loss
    if plain.training_free:  # nothing is trained on the floor's loss
        return
    assert not torch.isclose(a, b), "the training loss ignores fg_weight"


@pytest.mark.parametrize("method", METHODS)
def test_the_registry_states_every_method_fact(method):
    spec = get_method(method)
    assert spec.display == get_method(method).describe()["display"] != ""
    assert spec.training_free == spec.builder.training_free == _build(method).training_free
    assert spec.test_time_knobs <= set(spec.knobs)
    for name, value in spec.small_knobs.items():  # each small value passes its knob's validation
        assert spec.knobs[name].coerce(method, name, value) is not None


def test_display_names_are_distinct():
    names = [get_method(m).display for m in METHODS]
    assert len(set(names)) == len(names), names
