"""Decide what to write to make a linked pair of orders agree. Pure: no I/O.

Status: each side "changed" when it differs from the pair both held at the last sync. One side
changed: carry it across. Both changed (or the link is new, or no sync is remembered): the
conflict policy decides, `oms` (HMS-OMS is the system of record for fulfilment), `api`, or
`newest` (later `updated_at` wins; OMS on a tie). Content (title, items, user) flows from
HMS-API only. A write that would change nothing is never planned, which is what keeps a
change carried across from echoing back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .mapping import Mapper
from .models import ApiOrder, OmsOrder

Policy = Literal["oms", "api", "newest"]


@dataclass(frozen=True)
class Synced:
    """The status/state pair both sides held when hms-sync last made them agree."""

    status: str | None
    state: str | None


@dataclass
class Plan:
    oms_patch: dict[str, Any] = field(default_factory=dict)
    api_patch: dict[str, Any] = field(default_factory=dict)
    status_from: Literal["api", "oms"] | None = None  # which side's status won, if any
    why: str = "in step"

    @property
    def writes(self) -> int:
        return bool(self.oms_patch) + bool(self.api_patch)

    def describe(self) -> list[str]:
        out = []
        if self.oms_patch:
            out.append(f"HMS-OMS update {_fmt(self.oms_patch)}")
        if self.api_patch:
            out.append(f"HMS-API update {_fmt(self.api_patch)}")
        return out


def plan_update(
    api: ApiOrder,
    oms: OmsOrder,
    synced: Synced | None,
    mapper: Mapper,
    policy: Policy,
) -> Plan:
    """The smallest writes that make `api` and `oms` agree. Raises MappingError."""
    # Map both ways first: an unmapped value on either side writes nothing at all.
    want_state = mapper.oms_state_for(api.status, api.id)
    oms_as_status = mapper.api_status_for(oms.state, api.id)
    plan = Plan(oms_patch=mapper.content_patch(api, oms))
    if oms.code != api.oms_order_code:
        plan.api_patch["oms_order_code"] = oms.code

    if want_state != oms.state:
        if synced is None:
            api_changed = oms_changed = True
        else:
            api_changed = api.status != synced.status
            oms_changed = oms.state != synced.state
        winner: Literal["api", "oms"]
        if api_changed and not oms_changed:
            winner, plan.why = "api", "status changed in HMS-API"
        elif oms_changed and not api_changed:
            winner, plan.why = "oms", "state changed in HMS-OMS"
        else:
            winner = _by_policy(api, oms, policy)
            plan.why = f"both changed; conflict policy {policy!r} chose {winner}"
        plan.status_from = winner
        if winner == "api":
            plan.oms_patch["state"] = want_state
        else:
            plan.api_patch["status"] = oms_as_status
    elif plan.oms_patch or plan.api_patch:
        plan.why = "content or link changed"
    return plan


def _by_policy(api: ApiOrder, oms: OmsOrder, policy: Policy) -> Literal["api", "oms"]:
    if policy == "api":
        return "api"
    if policy == "newest" and api.updated_at > oms.updated_at:
        return "api"
    return "oms"


def _fmt(patch: dict[str, Any]) -> str:
    parts = []
    for key, value in patch.items():
        if key == "data":
            parts.append("data." + "/".join(sorted(value)))
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)
