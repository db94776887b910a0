"""Any model runs unchanged inside a population: a registry of layers and models drives every test.

Each ``Case`` (``models.CASES``) is a model written for ordinary batches and its inputs. Inside ``opt.ask()`` calling
the model runs all ``N`` members: a plain tensor argument is a batch shared by every member,
``population.per_member(x)`` gives member ``i`` the row ``x[i]``, and every output leaf comes back
as ``(N, *leaf)``. The reference for member ``i`` is
``torch.func.functional_call(model, population.member_state_dict(i), inputs_i)`` on a plain copy of
the model, one member at a time (``reference`` below). Everything runs in float64 on CPU.

Adding a layer or a model is one ``Case`` in ``CASES``: it then inherits every test.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from eggroll_optim import EggrollOptimizer
from eggroll_optim.losses import per_member_cross_entropy, per_member_mse

from models import (
    CASES, CNN, MLP, N, ActorCritic, Case, GRUPolicy, LSTMPolicy, TiedEmbeddingLM, TransformerLM, randn, tokens,
)

SIGMA, RANK, SEED = 0.1, 2, 3  # the noise of the exactness tests (population N = 4, from models)
CASE_IDS = [case.name for case in CASES]


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 ops gain nothing from intra-op threads, and on a busy 2-core runner OpenMP's
    barriers turn mobilenet's depthwise convs (thousands of per-group calls a forward) from
    0.3 s into tens of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(case: Case) -> tuple[nn.Module, tuple, dict]:
    """The case's float64 model (same weights on every call) and inputs."""
    torch.manual_seed(0)
    model = case.model().double().train(case.train)
    torch.manual_seed(1)
    args, kwargs = case.inputs()
    return model, args, kwargs


def optimizer(model: nn.Module, **kwargs) -> EggrollOptimizer:
    kwargs = dict(dict(lr=0.1, sigma=SIGMA, rank=RANK, population_size=N, seed=SEED), **kwargs)
    return EggrollOptimizer(model, **kwargs)


def member_args(population, case: Case, args: tuple) -> tuple:
    """The arguments for a population call: ``args[0]`` wrapped as per-member if the case says so."""
    return (population.per_member(args[0]), *args[1:]) if case.per_member else args


def tensor_leaves(out) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def run_population(model, case: Case, args, kwargs, **opt_kwargs) -> tuple[list, object]:
    """Every member's output leaves ``[(N, *leaf)]`` (chunk by chunk, concatenated) and the population
    (for ``member_state_dict``); the optimizer's hooks are removed afterwards."""
    opt = optimizer(model, **opt_kwargs)
    chunks = []
    with torch.no_grad(), opt.ask() as population:
        for _ in population.chunks():
            chunks.append(tensor_leaves(model(*member_args(population, case, args), **kwargs)))
    opt.remove_hooks()  # the model is plain again; the population keeps its noise keys
    return [torch.cat(parts) for parts in zip(*chunks)], population


def reference(plain: nn.Module, population, case: Case, args, kwargs) -> list[torch.Tensor]:
    """Member ``i``'s output by ``functional_call`` with its dense parameters, stacked: ``[(N, *leaf)]``.

    ``plain`` is a copy of the model taken before ``ask`` (its own running statistics are untouched
    by the population, and any it updates here do not matter)."""
    names = [name for name, _ in plain.named_parameters()]  # a tied parameter once: functional_call ties it
    outs = []
    with torch.no_grad():
        for i in range(N):
            member = (args[0][i], *args[1:]) if case.per_member else args
            state = population.member_state_dict(i)
            outs.append(tensor_leaves(functional_call(plain, {n: state[n] for n in names}, member, kwargs)))
    return [torch.stack(leaves) for leaves in zip(*outs)]


def assert_close_relative(actual: list, expected: list, rel: float) -> None:
    """Each leaf within ``rel`` of the largest entry of its reference."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=rel * float(e.abs().max()))


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_member_output_is_functional_call_with_member_state_dict_and_members_differ(case):
    model, args, kwargs = build(case)
    plain = copy.deepcopy(model)
    out, population = run_population(model, case, args, kwargs)
    assert [tuple(leaf.shape) for leaf in out] == [(N, *shape) for shape in case.shapes]
    assert_close_relative(out, reference(plain, population, case, args, kwargs), rel=1e-9)
    for leaf in out:  # the noise is really there: antithetic twins (0, 1) and two draws (0, 2) differ
        scale = float(leaf.abs().max())
        assert (leaf[0] - leaf[1]).abs().max() > 1e-6 * scale
        assert (leaf[0] - leaf[2]).abs().max() > 1e-6 * scale


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunks_of_two_match_the_whole_population(case):
    def one_step(chunk_size):
        model, args, kwargs = build(case)
        opt = optimizer(model, chunk_size=chunk_size)
        outs = []

        def closure():  # "loss": the sum of every output entry, per member (n,)
            leaves = tensor_leaves(model(*member_args(opt.population, case, args), **kwargs))
            outs.append(leaves)
            return sum(leaf.flatten(1).sum(1) for leaf in leaves)

        opt.step(closure)
        return [torch.cat(parts) for parts in zip(*outs)], [p.detach() for p in model.parameters()]

    out_whole, params_whole = one_step(None)
    out_chunked, params_chunked = one_step(2)
    assert [leaf.shape[0] for leaf in out_chunked] == [N] * len(out_whole)
    assert_close_relative(out_chunked, out_whole, rel=1e-12)  # the members' outputs, hence their losses
    assert_close_relative(params_chunked, params_whole, rel=1e-12)  # and the update


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_odd_or_wrong_member_dims_raise(case):
    model, args, kwargs = build(case)
    with pytest.raises(ValueError, match="population_size"):
        optimizer(model, population_size=N + 1)
    x = args[0][0] if case.per_member else args[0]
    odd = x.unsqueeze(0).expand(N + 1, *x.shape)  # (N + 1, ...): neither N nor the chunk
    opt = optimizer(model)
    with opt.ask() as population, pytest.raises(ValueError, match="leading dim"):
        population.per_member(odd)
    opt.remove_hooks()  # one optimizer's hooks at a time
    opt = optimizer(model, chunk_size=2)
    with torch.no_grad(), opt.ask() as population, pytest.raises(ValueError, match="leading dim"):
        for _ in population.chunks():
            model(population.per_member(odd), *args[1:], **kwargs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_outside_ask_the_model_is_the_plain_mean_model(case):
    model, args, kwargs = build(case)
    plain = copy.deepcopy(model)  # never hooked
    one = (args[0][0], *args[1:]) if case.per_member else args  # one member's inputs
    opt = optimizer(model)
    # not bitwise: torch skips nn.TransformerEncoderLayer's fused path on a module with hooks
    with torch.no_grad():
        assert_close_relative(tensor_leaves(model(*one, **kwargs)), tensor_leaves(plain(*one, **kwargs)), rel=1e-14)
        with opt.ask() as population:
            model(*member_args(population, case, args), **kwargs)
        # after the with block, before tell: the hooks are inert again
        assert_close_relative(tensor_leaves(model(*one, **kwargs)), tensor_leaves(plain(*one, **kwargs)), rel=1e-14)


def test_shared_batch_as_large_as_the_population_stays_shared():
    torch.manual_seed(0)
    model = MLP().double()
    x = randn(N, 5)  # a batch of N samples, not one per member
    opt = optimizer(model)
    with torch.no_grad(), opt.ask() as population:
        shared = model(x)  # (N members, N samples, 3)
        per_member = model(population.per_member(x))  # (N members, 3): member i sees x[i]
    assert shared.shape == (N, N, 3) and per_member.shape == (N, 3)
    torch.testing.assert_close(per_member, shared.diagonal().T, rtol=0, atol=1e-14)
    for i in range(N):
        member = functional_call(model, population.member_state_dict(i), (x,))
        torch.testing.assert_close(shared[i], member, rtol=0, atol=1e-14)


def test_per_member_input_in_a_chunk_takes_the_chunk_rows_or_the_chunk_itself():
    torch.manual_seed(0)
    policy = GRUPolicy().double()
    obs = randn(N, 2, 5, 3)  # (N, B, T, obs)
    opt = optimizer(policy, chunk_size=2)
    whole, rows = [], []
    with torch.no_grad(), opt.ask() as population:
        for members in population.chunks():
            whole.append(policy(population.per_member(obs)))  # (2, B, actions): the chunk's rows of obs
            rows.append(policy(population.per_member(obs[members])))  # the chunk's own rows
    whole, rows = torch.cat(whole), torch.cat(rows)  # (N, B, actions)
    torch.testing.assert_close(rows, whole, rtol=0, atol=0)
    with torch.no_grad():  # references after the with block: inside it, calling the policy runs the population
        for i in range(N):
            member = functional_call(policy, population.member_state_dict(i), (obs[i],))
            torch.testing.assert_close(whole[i], member, rtol=0, atol=1e-13)


def test_recurrent_state_fed_back_per_member_across_calls_in_chunks():
    torch.manual_seed(0)
    policy = LSTMPolicy().double()
    obs = randn(2, N, 2, 1, 3)  # two steps of (N, B, T=1, obs)
    opt = optimizer(policy, chunk_size=2)
    actions = []
    with torch.no_grad(), opt.ask() as population:
        for _ in population.chunks():
            _, (h, c) = policy(population.per_member(obs[0]))  # h, c: (2, 1, B, H), this chunk's members
            action, _ = policy(population.per_member(obs[1]), (population.per_member(h), population.per_member(c)))
            actions.append(action)  # (2, B, actions)
    actions = torch.cat(actions)
    with torch.no_grad():
        for i in range(N):
            state = population.member_state_dict(i)
            _, hidden = functional_call(policy, state, (obs[0, i],))
            expected, _ = functional_call(policy, state, (obs[1, i], hidden))
            torch.testing.assert_close(actions[i], expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_member_state_dict_is_antithetic_low_rank_and_leaves_the_model_alone(case):
    model, _, _ = build(case)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with optimizer(model).ask() as population:
        members = [population.member_state_dict(i) for i in range(N)]
    for name, p in before.items():
        assert torch.equal(dict(model.named_parameters())[name], p)  # nothing written into the model
        deltas = [m[name] - p for m in members]  # (*p.shape) each
        torch.testing.assert_close(deltas[0], -deltas[1], rtol=0, atol=1e-15)  # pairs (0, 1), (2, 3): +e, -e
        torch.testing.assert_close(deltas[2], -deltas[3], rtol=0, atol=1e-15)
        assert (deltas[0] - deltas[2]).abs().max() > 0  # a new draw per pair
        if p.dim() >= 2 and min(p.shape[0], p[0].numel()) > RANK and p.numel() <= 1 << 16:
            # every matrix here belongs to a layer with a rule (no free matrix in these cases): rank r
            assert torch.linalg.matrix_rank(deltas[0].reshape(p.shape[0], -1)) == RANK, name


def test_pytree_output_keeps_its_structure_and_constants():
    torch.manual_seed(0)
    model = ActorCritic().double()
    with torch.no_grad(), optimizer(model).ask():
        out = model(randn(3, 4))
    assert list(out) == ["logits", "value", "actions"] and out["actions"] == 3
    assert out["logits"].shape == (N, 3, 3) and out["value"].shape == (N, 3)


def test_tied_weight_is_one_perturbation_in_member_state_dict():
    torch.manual_seed(0)
    model = TiedEmbeddingLM().double()
    with optimizer(model).ask() as population:
        pass
    state = population.member_state_dict(0)
    assert "head.weight" not in state  # a tied parameter appears once; functional_call ties the other name
    assert not torch.equal(state["tok.weight"], model.tok.weight)


def test_member_state_dict_of_a_tied_model_feeds_functional_call():
    torch.manual_seed(0)
    model = TiedEmbeddingLM().double()
    with optimizer(model).ask() as population:
        pass
    functional_call(model, population.member_state_dict(0), (tokens(2, 5),))


def test_embedding_padding_row_is_never_perturbed():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, padding_idx=0).double()
    idx = torch.tensor([[0, 3, 0, 5]])
    with torch.no_grad(), optimizer(emb).ask():
        out = emb(idx)  # (N, 1, 4, 4)
    assert torch.equal(out[:, 0, 0], emb.weight[0].detach().expand(N, 4))
    assert (out[0, 0, 1] - out[1, 0, 1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ running statistics


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layers,shape", [
    (lambda: (nn.Linear(3, 4), nn.BatchNorm1d(4)), (5, 3)),
    (lambda: (nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)), (2, 2, 4, 4)),
], ids=["linear_bn1d", "conv_bn2d"])
def test_batchnorm_running_stats_are_updated_by_the_mean_member_update(layers, shape, momentum):
    torch.manual_seed(0)
    first, bn = layers()
    bn.momentum = momentum
    model = nn.Sequential(first, bn).double().train()
    with torch.no_grad():  # non-trivial statistics to start from
        bn.running_mean.copy_(randn(bn.num_features))
        bn.running_var.copy_(randn(bn.num_features).exp())
        bn.num_batches_tracked.fill_(5)
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    x = randn(*shape)
    with torch.no_grad(), optimizer(model).ask() as population:
        model(x)
    # by hand: member i's batch statistics of its own BatchNorm input first_i(x)
    dims = [0, *range(2, len(shape))]  # every dim but the channels
    h = torch.stack([
        functional_call(first, {k[2:]: v for k, v in population.member_state_dict(i).items() if k.startswith("0.")},
                        (x,))
        for i in range(N)
    ])  # (N, B, C, ...)
    means = torch.stack([hi.mean(dims) for hi in h])  # (N, C)
    variances = torch.stack([hi.var(dims, unbiased=True) for hi in h])  # (N, C), unbiased as torch stores it
    factor = momentum if momentum is not None else 1 / 6  # cumulative average over 6 batches
    torch.testing.assert_close(bn.running_mean, (1 - factor) * old_mean + factor * means.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(bn.running_var, (1 - factor) * old_var + factor * variances.mean(0), rtol=1e-12, atol=0)
    assert int(bn.num_batches_tracked) == 6


# ------------------------------------------------------------------------------------ learning


@dataclass(frozen=True)
class Task:
    """A fixed small batch ``(x, y)`` and a per-member loss ``(n, ...) -> (n,)``."""

    name: str
    model: Callable[[], nn.Module]
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable
    lr: float
    sigma: float
    steps: int = 30
    population_size: int = 32
    per_member: bool = False
    train: bool = False


def _regression_batch():
    x = randn(16, 5)
    return x, torch.sin(x @ randn(5, 3))  # (16, 5), (16, 3)


def _policy_batch():
    obs = randn(8, 5, 3)
    return obs, torch.tanh(obs.sum(1) @ randn(3, 2))  # (8, 5, 3), (8, 2)


TASKS = [
    Task("mlp", MLP, _regression_batch, per_member_mse, lr=0.05, sigma=0.05),
    Task("cnn_batchnorm", CNN, lambda: (randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), per_member_cross_entropy,
         lr=0.05, sigma=0.05, train=True),
    Task("transformer_lm", TransformerLM, lambda: (lambda t: (t, t.roll(-1, 1)))(tokens(7, 7, vocab=11)),
         per_member_cross_entropy, lr=0.05, sigma=0.05, steps=40, population_size=64),
    Task("gru_policy", GRUPolicy, _policy_batch, per_member_mse, lr=0.05, sigma=0.05, per_member=True),
]


@pytest.mark.parametrize("task", TASKS, ids=[t.name for t in TASKS])
def test_loss_falls_with_step(task):
    torch.manual_seed(0)
    model = task.model().double().train(task.train)
    torch.manual_seed(1)
    x, y = task.batch()
    n = task.population_size
    opt = EggrollOptimizer(model, lr=task.lr, sigma=task.sigma, rank=4, population_size=n, seed=0,
                           optimizer=lambda groups: torch.optim.Adam(groups, lr=task.lr))

    def closure():  # per-member losses (n,)
        inputs = opt.population.per_member(x.expand(n, *x.shape)) if task.per_member else x
        return task.loss(model(inputs), y)

    def mean_model_loss() -> float:
        with torch.no_grad():
            return float(task.loss(model(x).unsqueeze(0), y))

    initial = mean_model_loss()
    for _ in range(task.steps):
        opt.step(closure)
    final = mean_model_loss()
    assert final < 0.8 * initial, f"{task.name}: loss {initial:.4f} -> {final:.4f}"
