"""SGD with momentum and weight decay, without ``torch.optim``.

The first use of any ``torch.optim`` optimiser imports ``torch._dynamo`` (about 2 s per
process on a 2-core machine; the embedded benchmark starts about 40 training processes).
:class:`SGD` does the same arithmetic as ``torch.optim.SGD`` with ``dampening=0``,
``maximize=False`` and the per-tensor (non-foreach) implementation that torch uses for CPU
tensors, in the same order, so its updates are bit-identical on the CPU; its
``state_dict()`` has ``torch.optim.SGD``'s layout, so checkpoints load into either.
Adam and AdamW still come from ``torch.optim`` (pipeline/train.py: ``make_optimizer``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


class SGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay, nesterov)`` (one param group)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        params = list(params)
        if not params:
            raise ValueError("SGD got an empty parameter list")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.param_groups: list[dict[str, Any]] = [{
            "params": params, "lr": float(lr), "momentum": float(momentum), "dampening": 0.0,
            "weight_decay": float(weight_decay), "nesterov": bool(nesterov), "maximize": False,
            "foreach": None, "differentiable": False, "fused": None,
        }]
        #: per parameter: {"momentum_buffer": tensor} once it has had a gradient
        self.state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, momentum, decay, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d_p = p.grad
            if decay != 0:
                d_p = d_p.add(p, alpha=decay)
            if momentum != 0:
                state = self.state.setdefault(p, {})
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = torch.clone(d_p).detach()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(momentum).add_(d_p)
                d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
            p.add_(d_p, alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.SGD.state_dict()``'s layout: parameters by index."""
        group = self.param_groups[0]
        index = {id(p): i for i, p in enumerate(group["params"])}
        state = {index[id(p)]: {"momentum_buffer": s["momentum_buffer"]}
                 for p, s in self.state.items() if s.get("momentum_buffer") is not None}
        saved = {k: v for k, v in group.items() if k != "params"}
        saved["params"] = list(range(len(group["params"])))
        return {"state": state, "param_groups": [saved]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by this class or by ``torch.optim.SGD`` (one param group)."""
        groups = state_dict["param_groups"]
        params = self.param_groups[0]["params"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(params):
            raise ValueError("the saved optimiser state has a different number of parameter groups or parameters")
        for key in ("lr", "momentum", "weight_decay", "nesterov"):
            if key in groups[0]:
                self.param_groups[0][key] = groups[0][key]
        position = {saved_id: i for i, saved_id in enumerate(groups[0]["params"])}
        self.state = {}
        for saved_id, entry in state_dict["state"].items():
            p = params[position[saved_id]]
            buf = entry.get("momentum_buffer")
            if buf is None:
                continue
            if buf.shape != p.shape:
                raise ValueError(f"momentum buffer of shape {tuple(buf.shape)} does not fit a parameter of shape {tuple(p.shape)}")
            self.state[p] = {"momentum_buffer": buf.to(device=p.device, dtype=p.dtype).clone()}
