"""pipeline.optim.SGD: torch.optim.SGD's updates and state layout, without torch._dynamo."""

import copy
import subprocess
import sys

import pytest
import torch

from pipeline.optim import SGD


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))


def _steps(model, opt, steps, seed=1, lr_schedule=(0.1, 0.05, 0.02, 0.01, 0.005, 0.001)):
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_schedule[i % len(lr_schedule)]
        x = torch.randn(2, 3, 8, 8, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if i == 2:  # a parameter without a gradient this step is left alone, as torch does
            model[3].bias.grad = None
        opt.step()


@pytest.mark.parametrize("momentum,decay,nesterov", [(0.9, 1e-4, False), (0.9, 5e-4, True), (0.0, 1e-4, False), (0.9, 0.0, False)])
def test_updates_are_bit_identical_to_torch_sgd(momentum, decay, nesterov):
    ours, ref = _model(), _model()
    opt = SGD(ours.parameters(), lr=0.1, momentum=momentum, weight_decay=decay, nesterov=nesterov)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=decay, nesterov=nesterov)
    _steps(ours, opt, 6)
    _steps(ref, ref_opt, 6)
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_state_dict_round_trips_with_torch_sgd():
    """A checkpoint written with either optimiser resumes in the other to the same weights."""
    a, b = _model(), _model()
    opt_a = SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    _steps(a, opt_a, 3)
    _steps(b, opt_b, 3)
    # deep copies: torch's state_dict() and load_state_dict() share the buffer tensors
    saved_ours, saved_torch = copy.deepcopy(opt_a.state_dict()), copy.deepcopy(opt_b.state_dict())
    assert saved_ours["state"].keys() == saved_torch["state"].keys()
    assert set(saved_torch["param_groups"][0]) == set(saved_ours["param_groups"][0])

    c, d = _model(), _model()
    c.load_state_dict(b.state_dict())
    d.load_state_dict(a.state_dict())
    opt_c = SGD(c.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_c.load_state_dict(saved_torch)  # ours from torch's state
    opt_d = torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_d.load_state_dict(saved_ours)  # torch's from ours
    _steps(c, opt_c, 3, seed=5)
    _steps(d, opt_d, 3, seed=5)
    _steps(a, opt_a, 3, seed=5)
    for x, y, z in zip(a.state_dict().values(), c.state_dict().values(), d.state_dict().values()):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_a_state_that_does_not_fit_is_refused():
    opt = SGD(_model().parameters(), lr=0.1, momentum=0.9)
    small = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError):
        opt.load_state_dict(small.state_dict())


def test_training_set_up_imports_no_compiler():
    """The reason for the class: building and stepping it, and the determinism switch, load
    neither torch._dynamo nor torch._inductor (seconds per training process)."""
    code = (
        "import sys, torch\n"
        "from pipeline.optim import SGD\n"
        "from pipeline.train import set_deterministic_algorithms\n"
        "m = torch.nn.Linear(3, 2); o = SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)\n"
        "m(torch.randn(4, 3)).sum().backward(); o.step()\n"
        "set_deterministic_algorithms(True)\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "assert torch.is_deterministic_algorithms_warn_only_enabled()\n"
        "loaded = [m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
