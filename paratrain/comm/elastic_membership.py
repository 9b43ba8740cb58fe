"""Pure rules of elastic membership (:mod:`paratrain.comm.elastic`), tested without a
network: member names, who forms the next epoch, who is still waiting to join, whose
state the others take, and the run's failures and recoveries from the epochs' records.

A *member* is one process: ``"<slot>.<incarnation>"``, where the slot is the
launcher's rank and the incarnation counts the processes that held it. Slots come in
*units* of ``unit`` consecutive slots that live and die together (a pipeline replica's
stages; 1 for data parallelism): only complete units are members.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def member_id(slot: int, incarnation: int) -> str:
    return f"{slot}.{incarnation}"


def member_order(member: str) -> tuple[int, int]:
    """Members sort by launcher slot, then incarnation: at full size rank == slot."""
    slot, incarnation = member.split(".")
    return int(slot), int(incarnation)


def slot_of(member: str) -> int:
    return member_order(member)[0]


def newest_per_slot(members) -> dict[int, int]:
    """The highest incarnation seen of each slot."""
    newest: dict[int, int] = {}
    for member in members:
        slot, incarnation = member_order(member)
        newest[slot] = max(newest.get(slot, 0), incarnation)
    return newest


def complete_units(members, unit: int) -> list[str]:
    """The members whose unit (slots ``u*unit .. u*unit+unit-1``) is all there, sorted."""
    slots: dict[int, set[int]] = {}
    for member in members:
        slots.setdefault(slot_of(member) // unit, set()).add(slot_of(member))
    whole = {u for u, present in slots.items() if len(present) == unit}
    return sorted((m for m in members if slot_of(m) // unit in whole), key=member_order)


def waiting_for(previous: list[str], arrived: list[str], gone: set[str]) -> list[str]:
    """Members of the last epoch that neither reached the rendezvous nor are gone."""
    return [m for m in previous if m not in arrived and m not in gone]


def decide_membership(previous: list[str], arrived: list[str], joiners: list[str], gone: set[str],
                      min_units: int, unit: int = 1) -> list[str] | None:
    """The next epoch's members, or None while the rendezvous must stay open: some
    member of the last epoch may still arrive, or fewer than ``min_units`` complete
    units are live (a replacement may still register). Members of a unit that lost a
    process are left out (they cannot train alone)."""
    if waiting_for(previous, arrived, gone):
        return None
    members = complete_units({m for m in arrived if m not in gone} | {j for j in joiners if j not in gone}, unit)
    if len(members) < min_units * unit:
        return None
    return members


def pending_joiners(joiners: list[str], members: list[str], dead: set[str], unit: int = 1) -> list[str]:
    """Joiners that can be admitted now: not members, not dead, not replaced by a newer
    process of their slot, and making whole units (a replaced pipeline replica joins
    with all its stages or not at all)."""
    newest = newest_per_slot([*joiners, *members])
    waiting = [j for j in joiners if j not in members and j not in dead
               and member_order(j)[1] == newest[slot_of(j)]]
    return complete_units(waiting, unit)


@dataclass(frozen=True)
class SyncPlan:
    """Whose state every member takes after a re-form: ``target`` committed steps;
    ``undo``: members that must first take back their last step (in some state group
    nobody else holds it); ``sources[g]``: the rank in state group ``g`` that sends;
    ``behind``: the ranks that receive."""

    target: int
    undo: list[int]
    sources: dict[int, int]
    behind: list[int]


def sync_plan(steps: list[int], state_group_of: list[int]) -> SyncPlan:
    """Every member ends at the same committed step count: the highest, when each
    state group (members holding the same state: all, or one pipeline stage per
    replica) has a member with it; else one less, and those ahead undo their last
    step. In each group the lowest rank at the target sends. A pure function."""
    groups = sorted(set(state_group_of))
    target = max(steps)
    if any(all(steps[r] < target for r in range(len(steps)) if state_group_of[r] == g) for g in groups):
        target -= 1
    undo = [r for r, count in enumerate(steps) if count > target]
    sources = {g: min(r for r in range(len(steps)) if state_group_of[r] == g and steps[r] >= target) for g in groups}
    behind = [r for r, count in enumerate(steps) if count < target]
    return SyncPlan(target, undo, sources, behind)


@dataclass
class Reconfiguration:
    """One epoch as this member entered it."""

    kind: str   # "start"; "shrink" or "regroup" (after a failure); "grow"; "rejoin" (this member was admitted)
    epoch: int
    members: list[str]
    step: int                   # committed steps after the state sync
    seconds: float              # from noticing the need to training in the new epoch
    synced: list[int] = field(default_factory=list)   # ranks that received a healthy peer's state
    reason: str = ""


def fault_report(records: list[dict], num_slots: int) -> dict:
    """``worker_failures`` and ``recoveries`` from the epochs' records (each: cause,
    previous and new members, step, noticed_at, entered_at; wall-clock seconds). A
    recovery is an epoch formed after a failure that lost members: ``recovery_s`` from
    noticing the loss to training in the re-formed group, ``full_size_s`` to the first
    epoch from then on at full size (None if never). A pure function."""
    failures, recoveries = 0, []
    for index, record in enumerate(records):
        lost = sorted(set(record.get("previous", [])) - set(record["members"]), key=member_order)
        if record["cause"] != "failure" or not lost:
            continue
        failures += len(lost)
        full = next((r for r in records[index:] if len(r["members"]) == num_slots), None)
        recoveries.append({"step": record["step"], "lost": lost, "size": len(record["members"]),
                           "noticed_at": record["noticed_at"],
                           "recovery_s": round(record["entered_at"] - record["noticed_at"], 3),
                           "full_size_s": round(full["entered_at"] - record["noticed_at"], 3) if full else None})
    return {"worker_failures": failures, "recoveries": recoveries}
