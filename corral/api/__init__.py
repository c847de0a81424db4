"""The wire schema: request and response models shared by the server, the agent, the SDK
and the store. States are the domain's enums. Pure data, no I/O; imports only corral.domain.

The names below load their module on first use (PEP 562), so a client that needs only
the job models does not build every model of the agent protocol.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.api.agents import (
        HeartbeatReply,
        HeartbeatRequest,
        KillOrder,
        ObservedAttempt,
        OffloadOrder,
        RegisterReply,
        RegisterRequest,
        StartOrder,
    )
    from corral.api.common import (
        NAME_PATTERN,
        SHA256_PATTERN,
        Sha256,
        Strict,
        parse_memory_mb,
    )
    from corral.api.components import (
        ComponentPublish,
        ComponentView,
        InstallOrder,
        InstanceComponentView,
        ObservedComponent,
        RolloutProgress,
        RolloutRequest,
        RolloutView,
    )
    from corral.api.fleets import (
        BACKENDS,
        DURABLE_KEYS,
        FleetSpec,
        FleetView,
        ScaleRequest,
        SshHost,
        SshSettings,
    )
    from corral.api.instances import (
        AtRisk,
        DrainRequest,
        DrainView,
        EventView,
        InstanceView,
        ServerView,
    )
    from corral.api.jobs import (
        AttemptAck,
        AttemptFinish,
        AttemptLost,
        AttemptReport,
        AttemptReports,
        AttemptReportsReply,
        AttemptView,
        JobBatch,
        JobBatchReply,
        JobSubmit,
        JobView,
        LogBatch,
        LogChunkIn,
        LogChunkView,
        LogPage,
        OutputFile,
    )
    from corral.api.objects import (
        CopiesLanded,
        Fetch,
        ObjectError,
        ObjectView,
        OutputView,
        PeerVerify,
        ReplicaView,
    )
    from corral.api.tokens import TokenRotated, TokenView

_WHERE = {
    "HeartbeatReply": "corral.api.agents",
    "HeartbeatRequest": "corral.api.agents",
    "KillOrder": "corral.api.agents",
    "ObservedAttempt": "corral.api.agents",
    "OffloadOrder": "corral.api.agents",
    "RegisterReply": "corral.api.agents",
    "RegisterRequest": "corral.api.agents",
    "StartOrder": "corral.api.agents",
    "NAME_PATTERN": "corral.api.common",
    "SHA256_PATTERN": "corral.api.common",
    "Sha256": "corral.api.common",
    "Strict": "corral.api.common",
    "parse_memory_mb": "corral.api.common",
    "ComponentPublish": "corral.api.components",
    "ComponentView": "corral.api.components",
    "InstallOrder": "corral.api.components",
    "InstanceComponentView": "corral.api.components",
    "ObservedComponent": "corral.api.components",
    "RolloutProgress": "corral.api.components",
    "RolloutRequest": "corral.api.components",
    "RolloutView": "corral.api.components",
    "BACKENDS": "corral.api.fleets",
    "DURABLE_KEYS": "corral.api.fleets",
    "FleetSpec": "corral.api.fleets",
    "FleetView": "corral.api.fleets",
    "ScaleRequest": "corral.api.fleets",
    "SshHost": "corral.api.fleets",
    "SshSettings": "corral.api.fleets",
    "AtRisk": "corral.api.instances",
    "DrainRequest": "corral.api.instances",
    "DrainView": "corral.api.instances",
    "EventView": "corral.api.instances",
    "InstanceView": "corral.api.instances",
    "ServerView": "corral.api.instances",
    "AttemptAck": "corral.api.jobs",
    "AttemptFinish": "corral.api.jobs",
    "AttemptLost": "corral.api.jobs",
    "AttemptReport": "corral.api.jobs",
    "AttemptReports": "corral.api.jobs",
    "AttemptReportsReply": "corral.api.jobs",
    "AttemptView": "corral.api.jobs",
    "JobBatch": "corral.api.jobs",
    "JobBatchReply": "corral.api.jobs",
    "JobSubmit": "corral.api.jobs",
    "JobView": "corral.api.jobs",
    "LogBatch": "corral.api.jobs",
    "LogChunkIn": "corral.api.jobs",
    "LogChunkView": "corral.api.jobs",
    "LogPage": "corral.api.jobs",
    "OutputFile": "corral.api.jobs",
    "CopiesLanded": "corral.api.objects",
    "Fetch": "corral.api.objects",
    "ObjectError": "corral.api.objects",
    "ObjectView": "corral.api.objects",
    "OutputView": "corral.api.objects",
    "PeerVerify": "corral.api.objects",
    "ReplicaView": "corral.api.objects",
    "TokenRotated": "corral.api.tokens",
    "TokenView": "corral.api.tokens",
}

__all__ = [
    "BACKENDS",
    "DURABLE_KEYS",
    "NAME_PATTERN",
    "SHA256_PATTERN",
    "AtRisk",
    "AttemptAck",
    "AttemptFinish",
    "AttemptLost",
    "AttemptReport",
    "AttemptReports",
    "AttemptReportsReply",
    "AttemptView",
    "ComponentPublish",
    "ComponentView",
    "CopiesLanded",
    "DrainRequest",
    "DrainView",
    "EventView",
    "Fetch",
    "FleetSpec",
    "FleetView",
    "HeartbeatReply",
    "HeartbeatRequest",
    "InstallOrder",
    "InstanceComponentView",
    "InstanceView",
    "JobBatch",
    "JobBatchReply",
    "JobSubmit",
    "JobView",
    "KillOrder",
    "LogBatch",
    "LogChunkIn",
    "LogChunkView",
    "LogPage",
    "ObjectError",
    "ObjectView",
    "ObservedAttempt",
    "ObservedComponent",
    "OffloadOrder",
    "OutputFile",
    "OutputView",
    "PeerVerify",
    "RegisterReply",
    "RegisterRequest",
    "ReplicaView",
    "RolloutProgress",
    "RolloutRequest",
    "RolloutView",
    "ScaleRequest",
    "ServerView",
    "Sha256",
    "SshHost",
    "SshSettings",
    "StartOrder",
    "Strict",
    "TokenRotated",
    "TokenView",
    "parse_memory_mb",
]


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'corral.api' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
