"""The exact allocation: each linear picks one option, minimise the summed loss within a byte budget.

This is a multiple-choice knapsack. It is solved by dynamic programming over the budget, not by a
greedy bits-per-loss rule, because greedy plans are not optimal once options differ in both cost
and loss (a 3-bit g32 can beat a 4-bit g128 at fewer bytes), and the issue asks for the best plan
that meets the budget, provably.

Discretisation that never breaks the budget: every item's cheapest option is paid up front, and the
rest of each cost is rounded *up* to a multiple of `resolution` bytes while the remaining budget is
rounded *down*. Any plan the DP accepts therefore fits in real bytes. With `resolution` = the greatest
common divisor of the costs (the default when the state table stays below `max_states`) nothing is
rounded and the plan is exactly optimal; a coarser resolution only ever discards plans that are
within `resolution` bytes per item of the budget. numpy only (torch-free).

Droppable groups (whole decoder layers): a group's items either each take one of their options and
the group pays its own `cost` (a layer's norms), or all of them are dropped together at no cost for
the group's measured `loss`. The DP stays exact: a group is run through from the table before it
twice, once through its items (keep) and once as a single jump (drop), and each budget cell keeps the
better of the two; back-pointers record which, so the plan is optimal over every keep/drop pattern.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce

from qingzhou.errors import RecipeError

# state-table width above which the budget grid is coarsened (time and memory grow with it:
# items x states bytes for the back-pointers)
MAX_STATES = 1 << 18


DROPPED = "drop"  # the choice of every item of a dropped group


@dataclass(frozen=True)
class Droppable:
    """Items that can be removed together (a decoder layer's linears): while kept, the group pays
    `cost` of its own besides its items' options (its other tensors); dropped, its items cost
    nothing and the plan's loss grows by `loss` (measured for the whole group)."""

    items: tuple[Hashable, ...]
    cost: int
    loss: float


@dataclass
class Plan:
    """The chosen option per item, its total cost (bytes) and loss, and the grid it was solved on."""

    choice: dict[Hashable, Hashable]
    cost: int
    loss: float
    budget: int
    resolution: int
    exact: bool = field(default=True)


def solve_choice(table: Mapping[Hashable, Mapping[Hashable, tuple[int, float]]], budget: int, *,
                 resolution: int | None = None, max_states: int = MAX_STATES,
                 droppable: Sequence[Droppable] = ()) -> Plan:
    """Minimise sum(loss) over one option per item subject to sum(cost) <= `budget`.

    `table[item][option] = (cost in bytes, loss)`. Raises `RecipeError` when even the cheapest
    option of every item exceeds `budget`, naming that smallest reachable size.
    `resolution`: bytes per DP state (None: exact if it fits in `max_states`, else coarsened).
    `droppable`: disjoint groups of items that may be dropped whole (their items' choice is then
    `DROPPED`); a group's own `cost` counts only while it is kept.
    """
    import numpy as np

    grouped = {i: g for g, grp in enumerate(droppable) for i in grp.items}
    if len(grouped) != sum(len(grp.items) for grp in droppable) or any(i not in table for i in grouped):
        raise ValueError("droppable groups must be disjoint sets of table items")
    # ungrouped items first, then each group's items together (the DP runs a group as one block)
    items = [i for i in table if i not in grouped] + [i for grp in droppable for i in grp.items]
    opts: list[list[Hashable]] = [list(table[i]) for i in items]
    if any(not o for o in opts):
        empty = next(i for i, o in zip(items, opts) if not o)
        raise RecipeError(f"item {empty!r} has no option to choose from.", where="fit")
    costs = [[int(table[i][o][0]) for o in os_] for i, os_ in zip(items, opts)]
    losses = [[float(table[i][o][1]) for o in os_] for i, os_ in zip(items, opts)]
    # paid up front: an ungrouped item's cheapest option; a group's cheapest is being dropped (0)
    floor = [0 if i in grouped else min(c) for i, c in zip(items, costs)]
    base = sum(floor)
    if base > budget:
        raise RecipeError(
            f"no plan fits in {budget} bytes ({budget / 2**20:.2f} MiB): the smallest reachable size "
            f"is {base} bytes ({base / 2**20:.2f} MiB).",
            where="fit budget", hint=f"Give a budget of at least {base} bytes, or allow cheaper options.")
    extra = [[c - f for c in cs] for cs, f in zip(costs, floor)]
    room = budget - base
    exact_res = reduce(math.gcd, [e for es in extra for e in es] + [grp.cost for grp in droppable], 0) or 1
    if resolution is None:
        resolution = exact_res
        if room // resolution + 1 > max_states:
            resolution = -(-room // (max_states - 1))
    units = room // resolution
    width = units + 1

    def shift(table_: np.ndarray, w: int, loss: float) -> np.ndarray:
        out = np.full(width, np.inf)
        if w <= units:
            out[w:] = table_[: width - w] + loss
        return out

    best = np.zeros(width)  # best[u]: least loss of the items so far within u units
    back = np.zeros((len(items), width), dtype=np.int32)
    dropped = np.zeros((len(droppable), width), dtype=bool)
    first = {grp.items[0]: g for g, grp in enumerate(droppable)}
    last = {grp.items[-1]: g for g, grp in enumerate(droppable)}
    before: np.ndarray | None = None
    for k, (es, ls) in enumerate(zip(extra, losses)):
        if items[k] in first:  # entering a group: remember the table to drop it from, pay its own cost
            g = first[items[k]]
            before = best
            best = shift(best, -(-droppable[g].cost // resolution), 0.0)
        new = np.full(width, np.inf)
        arg = np.zeros(width, dtype=np.int32)
        for j, (e, loss) in enumerate(zip(es, ls)):
            w = -(-e // resolution)  # cost rounded up: the plan can only be cheaper than it looks
            if w > units:
                continue
            cand = shift(best, w, loss)
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        best, back[k] = new, arg
        if items[k] in last:  # leaving a group: dropping it costs nothing and adds its loss
            g = last[items[k]]
            drop = before + droppable[g].loss  # type: ignore[operator]
            dropped[g] = drop < best
            best = np.where(dropped[g], drop, best)
    u = units
    choice: dict[Hashable, Hashable] = {}
    cost, loss = 0, 0.0
    k = len(items) - 1
    while k >= 0:
        if items[k] in last and dropped[last[items[k]], u]:  # the whole group was dropped here
            grp = droppable[last[items[k]]]
            for i in grp.items:
                choice[i] = DROPPED
            loss += grp.loss
            k -= len(grp.items)
            continue
        j = int(back[k, u])
        choice[items[k]] = opts[k][j]
        cost += costs[k][j]
        loss += losses[k][j]
        u -= -(-extra[k][j] // resolution)
        if items[k] in first:  # the group was kept: its own cost
            grp = droppable[first[items[k]]]
            cost += grp.cost
            u -= -(-grp.cost // resolution)
        k -= 1
    choice = {i: choice[i] for i in table}
    return Plan(choice=choice, cost=cost, loss=loss, budget=budget, resolution=resolution,
                exact=resolution == exact_res)


def uniform_choice(table: Mapping[Hashable, Mapping[Hashable, tuple[int, float]]], budget: int, *,
                   fixed: Sequence[Hashable] = (),
                   budget_of: Callable[[Hashable], int] | None = None) -> Plan | None:
    """The best plan that gives every item (but the `fixed` ones, which take their cheapest option)
    the same option, within `budget` (or `budget_of(option)`, where the room depends on the option:
    a file's header is exact for one option, bounded for a mix); None when no shared option fits.

    Why beside the optimal plan: the knapsack minimises the summed per-item proxy, which does not see
    how errors compound through the layers; the uniform setting a user would have picked is the
    baseline the mixed plan must beat end to end, so it is always a candidate of the KL check."""
    chosen = [i for i in table if i not in fixed]
    if not chosen:
        return None
    shared = [o for o in table[chosen[0]] if all(o in table[i] for i in chosen)]
    base = {i: min(table[i], key=lambda o, i=i: table[i][o][0]) for i in fixed}
    best: Plan | None = None
    for o in shared:
        choice = {i: (base[i] if i in base else o) for i in table}
        cost = total_cost(table, choice)
        loss = sum(float(table[i][c][1]) for i, c in choice.items())
        room = budget if budget_of is None else budget_of(o)
        if cost <= room and (best is None or loss < best.loss):
            best = Plan(choice=choice, cost=cost, loss=loss, budget=room, resolution=1)
    return best


def brute_force(table: Mapping[Hashable, Mapping[Hashable, tuple[int, float]]], budget: int,
                droppable: Sequence[Droppable] = ()) -> float:
    """The least total loss within `budget` by enumerating every plan, every keep/drop pattern of
    the `droppable` groups included (tests, tiny tables only); inf when none fits."""
    import itertools

    best = math.inf
    for pattern in itertools.product((False, True), repeat=len(droppable)):
        gone = {i for grp, d in zip(droppable, pattern) if d for i in grp.items}
        items = [i for i in table if i not in gone]
        fixed_cost = sum(grp.cost for grp, d in zip(droppable, pattern) if not d)
        fixed_loss = sum(grp.loss for grp, d in zip(droppable, pattern) if d)
        for combo in itertools.product(*(list(table[i].values()) for i in items)):
            if fixed_cost + sum(c for c, _ in combo) <= budget:
                best = min(best, fixed_loss + sum(loss for _, loss in combo))
    return best


def total_cost(table: Mapping[Hashable, Mapping[Hashable, tuple[int, float]]],
               choice: Mapping[Hashable, Hashable]) -> int:
    """Bytes of a plan's items (dropped ones cost nothing)."""
    return sum(int(table[i][o][0]) for i, o in choice.items() if o != DROPPED)


__all__: Sequence[str] = ("Plan", "Droppable", "DROPPED", "solve_choice", "uniform_choice", "brute_force", "total_cost", "MAX_STATES")
