"""What ``EggrollOptimizer.state_dict()`` adds to torch's, and the checks ``load_state_dict`` runs
before it changes anything.

``state["eggroll"]`` holds ``format`` (``FORMAT``, raised whenever the layout changes), the step,
seed and noise layout that define the next noise, the inner optimizer's state, and ``params``: the
``[name, shape]`` of every evolved parameter in param-group order, so a state from another model
is an error naming the first parameters that differ, not a silent load.
"""
from __future__ import annotations

__all__ = ["FORMAT", "check_loadable", "param_table"]

FORMAT = 1  # the layout of state["eggroll"] this version writes and reads (0: before it was versioned)


def param_table(param_groups: list[dict], names: dict) -> list[list]:
    """``[[name, shape], ...]`` of the parameters in ``param_groups``, in order."""
    return [[names[p], list(p.shape)] for g in param_groups for p in g["params"]]


def check_loadable(state_dict, expected: dict, table: list[list]) -> dict:
    """``state_dict["eggroll"]`` once it is known to fit this optimizer; else ``ValueError``/``TypeError``.

    ``expected``: values that must match (``population_size``, ``noise_block``); ``table``: this
    optimizer's ``param_table``."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict (EggrollOptimizer.state_dict()), got {type(state_dict).__name__}")
    extra = state_dict.get("eggroll")
    if not isinstance(extra, dict):
        keys = sorted(map(str, state_dict))[:6]
        raise ValueError(f"Not an EggrollOptimizer state_dict: the 'eggroll' entry is missing (keys: {keys})")
    version = extra.get("format", 0)
    if not isinstance(version, int) or version > FORMAT:
        raise ValueError(
            f"state_dict has format {version!r}, newer than this eggroll_optim reads (up to {FORMAT}): "
            "load it with the version that saved it, or upgrade"
        )
    missing = [k for k in ("step", "seed", "inner") if k not in extra]
    if missing or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError(f"Truncated EggrollOptimizer state_dict: missing {missing or ['param_groups/state']}")
    for key, value in expected.items():
        if key in extra and extra[key] != value:
            raise ValueError(
                f"state_dict was saved with {key}={extra[key]}, this optimizer has {value}: "
                "the run could not continue identically (the noise or the inner optimizer's state would differ)"
            )
    saved = extra.get("params")
    if saved is not None:
        _check_params([list(map(_plain, row)) for row in saved], table)
    return extra


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_params(saved: list, table: list) -> None:
    if saved == table:
        return
    diffs = [f"{a[0]} {tuple(a[1])} there, {b[0]} {tuple(b[1])} here" for a, b in zip(saved, table) if a != b]
    if len(saved) != len(table):
        diffs.append(f"{len(saved)} evolved parameters there, {len(table)} here")
    raise ValueError(
        "state_dict is from another model (or other param groups): " + "; ".join(diffs[:4])
        + (" ..." if len(diffs) > 4 else "")
    )
