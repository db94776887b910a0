"""``EggrollOptimizer.state_dict()``: a format version and the model's parameter names and shapes;
``load_state_dict`` rejects another model, a newer format, a truncated or foreign dict, another
inner optimizer, before it changes anything."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer, per_member_mse
from eggroll_optim.state import FORMAT

from optim_helpers import N
from optim_helpers import data as _data
from optim_helpers import mlp as _mlp


def _trained(model=None, **kwargs):
    model = _mlp() if model is None else model
    opt = EggrollOptimizer(model, lr=0.05, population_size=N, seed=1, optimizer=torch.optim.Adam, **kwargs)
    x, y = _data()
    opt.step(lambda: per_member_mse(model(x), y))
    return model, opt


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _frozen(opt):
    """Everything a failed load must leave as it was: state tensors, then the rest."""
    state = copy.deepcopy(opt.state_dict())
    tensors = [t for s in (state["state"], state["eggroll"]["inner"]["state"]) for v in s.values() for t in v.values()]
    return tensors, (state["param_groups"], state["eggroll"]["inner"]["param_groups"], opt.step_count, opt.seed)


def test_state_dict_carries_format_names_and_shapes_through_torch_save():
    _, opt = _trained()
    extra = _roundtrip(opt.state_dict())["eggroll"]
    assert extra["format"] == FORMAT == 1 and extra["inner_type"] == "Adam"
    assert extra["params"] == [["0.weight", [8, 5]], ["2.weight", [3, 8]], ["0.bias", [8]], ["2.bias", [3]]]


def _another_width():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _renamed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Identity(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("edit, error, message", [
    (lambda s: s["eggroll"].update(format=FORMAT + 1), ValueError, "format 2, newer than this eggroll_optim reads"),
    (lambda s: s["eggroll"].pop("inner"), ValueError, r"Truncated .* missing \['inner'\]"),
    (lambda s: s.pop("param_groups"), ValueError, "Truncated"),
    (lambda s: s.pop("eggroll"), ValueError, "Not an EggrollOptimizer state_dict"),
    (lambda s: s["eggroll"].update(population_size=2 * N), ValueError,
     f"population_size={2 * N}, this optimizer has {N}"),
    (lambda s: s["eggroll"].update(inner_type="SGD"), ValueError, "inner_type=SGD, this optimizer has Adam"),
])
def test_a_bad_state_dict_is_rejected_before_anything_changes(edit, error, message):
    _, saved = _trained()
    state = _roundtrip(saved.state_dict())
    edit(state)
    _, opt = _trained()
    before = _frozen(opt)
    with pytest.raises(error, match=message):
        opt.load_state_dict(state)
    after = _frozen(opt)
    assert after[1] == before[1] and all(map(torch.equal, after[0], before[0]))


@pytest.mark.parametrize("other, message", [
    (_another_width, r"0.weight \(8, 5\) there, 0.weight \(16, 5\) here"),
    (_renamed, r"2.weight \(3, 8\) there, 3.weight \(3, 8\) here"),
])
def test_a_state_dict_from_another_model_names_the_first_difference(other, message):
    _, saved = _trained()
    _, opt = _trained(other())
    with pytest.raises(ValueError, match="another model .*" + message):
        opt.load_state_dict(_roundtrip(saved.state_dict()))


def test_foreign_and_non_dict_states_are_rejected():
    model, opt = _trained()
    with pytest.raises(ValueError, match="'eggroll' entry is missing"):
        opt.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())
    with pytest.raises(TypeError, match="must be a dict"):
        opt.load_state_dict([1, 2])


def test_an_unversioned_state_from_before_the_format_still_loads():
    model, saved = _trained()
    state = saved.state_dict()
    for key in ("format", "params", "inner_type"):
        del state["eggroll"][key]
    _, opt = _trained()
    opt.load_state_dict(state)
    assert opt.step_count == 1


def test_loading_while_a_population_is_pending_is_an_error():
    _, opt = _trained()
    state = opt.state_dict()
    opt.ask()
    with pytest.raises(RuntimeError, match="pending"):
        opt.load_state_dict(state)


def test_loaded_scheduler_values_reach_the_inner_optimizer():
    model, opt = _trained()
    opt.param_groups[0]["betas"] = (0.5, 0.9)
    state = opt.state_dict()
    _, fresh = _trained()
    fresh.load_state_dict(state)
    assert fresh.inner.param_groups[0]["betas"] == (0.5, 0.9) == fresh.param_groups[0]["betas"]
