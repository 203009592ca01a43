"""A torch optimizer as gpusnap state: its per-parameter state tensors
(``exp_avg``, ``step``, ...) and, as one JSON blob, its hyperparameters
(``param_groups`` without the parameters, which an LR scheduler changes)
and any non-tensor per-parameter state.

Parameters are numbered in ``param_groups`` order, as
``optimizer.state_dict()`` numbers them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from gpusnap._native import InvalidRegistration, ShapeMismatch


def _to_json(value: Any, where: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise InvalidRegistration(
                f"{where}: a tensor of shape {tuple(value.shape)} in the optimizer's "
                "hyperparameters cannot be saved as a scalar"
            )
        return {"__tensor__": value.item(), "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, where) for v in value]}
    if isinstance(value, list):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InvalidRegistration(
        f"{where}: a {type(value).__name__} in the optimizer's state cannot be saved"
    )


def _from_json(value: Any, current: Any = None) -> Any:
    import torch

    if isinstance(value, dict) and "__tensor__" in value:
        if isinstance(current, torch.Tensor):
            current.fill_(value["__tensor__"])
            return current
        return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"][6:]))
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_from_json(v) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


class OptimizerState:
    """The gpusnap view of one optimizer."""

    def __init__(self, optimizer: Any, prefix: str) -> None:
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "state"):
            raise InvalidRegistration(
                f"{prefix}: a {type(optimizer).__name__} is not a torch.optim.Optimizer"
            )
        self.optimizer = optimizer
        self.prefix = prefix
        self.scalars_name = f"{prefix}.scalars"

    def scalars_capacity(self) -> int:
        """Bytes for the hyperparameters blob: fixed by the optimizer's
        shape (groups and parameters), never by its values, so a restarted
        run registers the same size as the one that saved."""
        return 64 * 1024 + 4096 * len(self.optimizer.param_groups) + 512 * len(self.params())

    def params(self) -> list[Any]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_indices(self, names: Iterable[str]) -> set[int]:
        """The parameter indices whose state tensors are among `names`."""
        head = f"{self.prefix}.state."
        indices = set()
        for name in names:
            if name.startswith(head):
                index = name[len(head) :].split(".", 1)[0]
                if index.isdigit():
                    indices.add(int(index))
        return indices

    def tensors(self) -> Iterator[tuple[str, Any, Callable[[], Any]]]:
        import torch

        state = self.optimizer.state
        for index, p in enumerate(self.params()):
            for key, value in state.get(p, {}).items():
                if isinstance(value, torch.Tensor):

                    def resolve(p: Any = p, key: str = key) -> Any:
                        return state[p][key]

                    yield f"{self.prefix}.state.{index}.{key}", value, resolve

    def scalars(self) -> dict[str, Any]:
        import torch

        groups = [
            {k: _to_json(v, f"{self.prefix}.param_groups.{i}.{k}") for k, v in g.items() if k != "params"}
            for i, g in enumerate(self.optimizer.param_groups)
        ]
        per_param: dict[str, Any] = {}
        for index, p in enumerate(self.params()):
            plain = {
                k: _to_json(v, f"{self.prefix}.state.{index}.{k}")
                for k, v in self.optimizer.state.get(p, {}).items()
                if not isinstance(v, torch.Tensor)
            }
            if plain:
                per_param[str(index)] = plain
        return {"param_groups": groups, "state": per_param}

    def load_scalars(self, value: Any) -> None:
        groups = self.optimizer.param_groups
        if not isinstance(value, dict) or len(value.get("param_groups", [])) != len(groups):
            raise ShapeMismatch(
                f"{self.scalars_name}: the snapshot's optimizer has a different number of "
                "parameter groups"
            )
        for group, saved in zip(groups, value["param_groups"]):
            for k, v in saved.items():
                group[k] = _from_json(v, group.get(k))
        params = self.params()
        for index, saved in value.get("state", {}).items():
            entry = self.optimizer.state[params[int(index)]]
            for k, v in saved.items():
                entry[k] = _from_json(v)

    def materialize(self, indices: set[int]) -> None:
        """Creates the state of the parameters numbered `indices` that have
        none, without changing any parameter, so a restore has tensors to
        fill: a step with zero gradients (for those parameters only; the
        optimizer skips the others) and a learning rate of 0, as
        torch.distributed.checkpoint does."""
        import torch

        params = self.params()
        missing = [
            params[i] for i in sorted(indices) if i < len(params) and not self.optimizer.state.get(params[i])
        ]
        if not missing:
            return
        wanted = {id(p) for p in missing}
        created, hidden = [], []
        for p in params:
            if id(p) in wanted:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                    created.append(p)
            elif p.grad is not None:
                hidden.append((p, p.grad))
                p.grad = None
        saved = []
        for group in self.optimizer.param_groups:
            lr = group.get("lr")
            saved.append(lr)
            if isinstance(lr, torch.Tensor):
                group["lr"] = lr.clone().fill_(0.0)
            elif lr is not None:
                group["lr"] = 0.0
        try:
            with torch.no_grad():
                self.optimizer.step()
        finally:
            for group, lr in zip(self.optimizer.param_groups, saved):
                if lr is not None:
                    group["lr"] = lr
            for p in created:
                p.grad = None
            for p, grad in hidden:
                p.grad = grad
