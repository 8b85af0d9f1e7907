"""Every message that crosses a process boundary (pydantic v2, JSON on the wire)."""

from sentinel.schemas.chat import ChatMessage, ToolCall
from sentinel.schemas.envelope import Envelope
from sentinel.schemas.experience import Correction, Exploration, Reflection, SFTExample
from sentinel.schemas.failure import ErrorPattern, FailureCategory, FailureDiagnosis, FailureSignal
from sentinel.schemas.message import Message, MessageError, message_class
from sentinel.schemas.proposal import (
    RejectionCode,
    RejectionReason,
    TaskProposal,
    ValidationResult,
)
from sentinel.schemas.task import (
    Action,
    EvaluationCriteria,
    Origin,
    Provenance,
    RewardBasis,
    StateCheck,
    Task,
    TaskSpec,
    UserInstructions,
    UserScenario,
)
from sentinel.schemas.training import (
    EvalReport,
    PolicyVersion,
    RolloutGroup,
    RolloutRequest,
    TrainStepReport,
)
from sentinel.schemas.trajectory import (
    RewardBreakdown,
    TerminationReason,
    Timings,
    Trajectory,
    TurnTokens,
)

__all__ = [
    "Action",
    "ChatMessage",
    "Correction",
    "Envelope",
    "ErrorPattern",
    "EvalReport",
    "EvaluationCriteria",
    "Exploration",
    "FailureCategory",
    "FailureDiagnosis",
    "FailureSignal",
    "Message",
    "MessageError",
    "Origin",
    "PolicyVersion",
    "Provenance",
    "Reflection",
    "RejectionCode",
    "RejectionReason",
    "RewardBasis",
    "RewardBreakdown",
    "RolloutGroup",
    "RolloutRequest",
    "SFTExample",
    "StateCheck",
    "Task",
    "TaskProposal",
    "TaskSpec",
    "TerminationReason",
    "Timings",
    "ToolCall",
    "TrainStepReport",
    "Trajectory",
    "TurnTokens",
    "UserInstructions",
    "UserScenario",
    "ValidationResult",
    "message_class",
]
