"""Small, valid instances of every message, for tests and benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sentinel.agents.llm import Completion
from sentinel.agents.solver import Solver
from sentinel.config import RolloutSettings
from sentinel.schemas import (
    Action,
    ChatMessage,
    Correction,
    ErrorPattern,
    EvalReport,
    EvaluationCriteria,
    Exploration,
    FailureCategory,
    FailureDiagnosis,
    FailureSignal,
    Message,
    Origin,
    PolicyVersion,
    Provenance,
    RejectionCode,
    RejectionReason,
    RewardBreakdown,
    RolloutGroup,
    RolloutRequest,
    SFTExample,
    Task,
    TaskProposal,
    TaskSpec,
    TerminationReason,
    ToolCall,
    TrainStepReport,
    Trajectory,
    TurnTokens,
    UserInstructions,
    UserScenario,
    ValidationResult,
)

if TYPE_CHECKING:
    from sentinel.envs.base import Environment


def task(i: int = 0) -> Task:
    spec = TaskSpec(
        id=f"retail-{i}",
        user_scenario=UserScenario(
            persona="Polite, in a hurry.",
            instructions=UserInstructions(
                domain="retail",
                reason_for_call="You want to return a lamp from order #W2378156.",
                known_info="You are Yusuf Rossi, zip 19122.",
                unknown_info="You do not remember your email.",
                task_instructions="Return only the lamp; refund to the original card.",
            ),
        ),
        evaluation_criteria=EvaluationCriteria(
            actions=[
                Action(
                    action_id="0",
                    name="return_delivered_order_items",
                    arguments={"order_id": "#W2378156", "item_ids": ["4602305039"]},
                )
            ],
            communicate_info=["54.04"],
        ),
    )
    return Task(
        id=spec.id,
        domain="retail",
        spec=spec,
        provenance=Provenance(origin=Origin.SEED, split="train"),
    )


def trajectory(i: int = 0, reward: float = 0.0) -> Trajectory:
    return Trajectory(
        id=f"traj-{i}",
        task_id="retail-0",
        domain="retail",
        group_id="g-0",
        policy_version=1,
        policy_model="policy-v1",
        messages=[
            ChatMessage(role="system", content="You are a retail agent."),
            ChatMessage(role="user", content="I want to return a lamp."),
            ChatMessage(
                role="assistant",
                tool_calls=[
                    ToolCall(id="c1", name="get_order_details", arguments={"order_id": "#W1"})
                ],
            ),
            ChatMessage(
                role="tool", content='{"error": "order not found"}', tool_call_id="c1", error=True
            ),
        ],
        turns=[
            TurnTokens(
                message_index=2,
                prompt_token_ids=[1, 2, 3],
                completion_token_ids=[4, 5],
                logprobs=[-0.1, -2.5],
                finish_reason="stop",
            )
        ],
        termination=TerminationReason.MAX_STEPS,
        reward=RewardBreakdown(reward=reward, components={"DB": reward, "COMMUNICATE": 1.0}),
        tool_errors=1,
    )


def examples() -> list[Message]:
    """One instance of every registered message type."""
    diagnosis = FailureDiagnosis(
        trajectory_id="traj-0",
        task_id="retail-0",
        policy_version=1,
        category=FailureCategory.WRONG_ENTITY,
        first_wrong_step=2,
        summary="Looked up an order id the user never gave.",
        evidence=["order #W1 not in the user's orders"],
        tools=["get_order_details"],
        signals=[FailureSignal(category=FailureCategory.WRONG_ENTITY, step=2, detail="#W1")],
    )
    return [
        task(),
        trajectory(),
        diagnosis,
        ErrorPattern(
            title="Invented order ids",
            description="The agent queries orders the user did not mention.",
            category=FailureCategory.WRONG_ENTITY,
            tools=["get_order_details"],
            example_trajectory_ids=["traj-0"],
            frequency={0: 4, 1: 2},
        ),
        TaskProposal(task=task(1), pattern_id="p-1", prompt_version="v3", proposer_model="smol"),
        ValidationResult(
            proposal_id="prop-1",
            task_id="retail-1",
            accepted=False,
            reasons=[
                RejectionReason(code=RejectionCode.TEST_LEAKAGE, detail="matches test task 7")
            ],
        ),
        RolloutGroup(
            task_id="retail-0",
            policy_version=1,
            trajectories=[trajectory(0, 0.0), trajectory(1, 1.0)],
            exploration=Exploration(
                failures=1,
                reflected=1,
                branches=2,
                interactions=5,
                recovered=1,
                corrections=[
                    Correction(
                        trajectory_id="traj-0",
                        backtrack_step=2,
                        experience="Check the order id.",
                        reward=1.0,
                        partial=1.0,
                        example=sft_example(),
                    )
                ],
            ),
        ),
        PolicyVersion(
            version=2, served_name="policy-v2", base_model="smol", adapter_path="/adapters/v2"
        ),
        TrainStepReport(
            step=3,
            policy_version=2,
            loss=0.12,
            mean_reward=0.5,
            groups=4,
            filtered_groups=1,
            tokens=2048,
            tokens_per_s=300.5,
            peak_memory_mb=812.0,
            duration_s=6.8,
            wait_s=1.5,
            trained_groups=["g-1", "g-2"],
            dropped_groups={"g-3": "uninformative: every reward equal"},
        ),
        RolloutRequest(task=task(2), size=4, policy_version=2, served_name="policy-v2"),
        EvalReport(
            policy="policy-v2",
            policy_version=2,
            tasks=10,
            trials=2,
            pass_hat_k={1: 0.4, 2: 0.3},
            pass_at_k={1: 0.4, 2: 0.5},
            mean_reward=0.4,
            terminations={"user_stop": 20},
        ),
    ]


def group(task_id: str, rewards: list[float], i: int = 0, version: int = 0) -> RolloutGroup:
    """A rollout group of one trajectory per reward."""
    trajectories = [
        trajectory(i * 100 + n, r).model_copy(
            update={"task_id": task_id, "policy_version": version}
        )
        for n, r in enumerate(rewards)
    ]
    return RolloutGroup(
        id=f"g-{task_id}-{i}", task_id=task_id, policy_version=version, trajectories=trajectories
    )


def cancellation(retail: Environment, name: str, nth: int = 0) -> Task:
    """A new, correct task: cancel the `nth` pending order that no tau2 task mentions."""
    used = " ".join(t.spec.model_dump_json() for t in retail.tasks())
    orders = retail.database["orders"]
    fresh = [(i, o) for i, o in orders.items() if o["status"] == "pending" and i not in used]
    order_id, order = fresh[nth]
    user = retail.database["users"][order["user_id"]]
    actions = [
        Action(action_id="0", name="find_user_id_by_email", arguments={"email": user["email"]}),
        Action(action_id="1", name="get_order_details", arguments={"order_id": order_id}),
        Action(
            action_id="2",
            name="cancel_pending_order",
            arguments={"order_id": order_id, "reason": "no longer needed"},
        ),
    ]
    spec = TaskSpec(
        id=name,
        user_scenario=UserScenario(
            instructions=UserInstructions(
                domain="retail",
                reason_for_call=f"You want to cancel order {order_id}: you no longer need it.",
                known_info=f"Your email is {user['email']}.",
                task_instructions="Confirm the cancellation when asked.",
            )
        ),
        evaluation_criteria=EvaluationCriteria(actions=actions, communicate_info=[]),
    )
    provenance = Provenance(origin=Origin.PROPOSED)
    return Task(id=name, domain="retail", spec=spec, provenance=provenance)


def todo(mock: Environment, name: str, title: str = "Plan the sprint") -> Task:
    """A new, correct task on tau2's mock domain: a to-do titled `title` for its user."""
    [user] = mock.database["users"]
    actions = [
        Action(action_id="0", name="get_users", arguments={}),
        Action(action_id="1", name="create_task", arguments={"user_id": user, "title": title}),
    ]
    spec = TaskSpec(
        id=name,
        user_scenario=UserScenario(
            instructions=UserInstructions(
                domain="mock",
                reason_for_call=f"You want a new task called '{title}' on your to-do list.",
                known_info=f"Your user id is {user}.",
                task_instructions="Confirm when asked.",
            )
        ),
        evaluation_criteria=EvaluationCriteria(actions=actions, communicate_info=[]),
    )
    return Task(id=name, domain="mock", spec=spec, provenance=Provenance(origin=Origin.PROPOSED))


TOOL = {
    "type": "function",
    "function": {
        "name": "find_user_id_by_zip",
        "description": "Find a user id by name and zip code.",
        "parameters": {
            "type": "object",
            "properties": {"first_name": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["first_name", "zip"],
        },
    },
}


class Stub:
    model = "unused"  # Solver.render needs no endpoint


def sft_example() -> SFTExample:
    """A short agent conversation rendered exactly as the Solver renders it for the server."""
    solver = Solver(Stub(), "Help the user.", [TOOL], RolloutSettings())  # type: ignore[arg-type]
    call = ToolCall(
        id="c1", name="find_user_id_by_zip", arguments={"first_name": "Yusuf", "zip": "19122"}
    )
    history = [
        ChatMessage(role="assistant", content="Hi! How can I help you today?"),
        ChatMessage(role="user", content="I am Yusuf, zip 19122; cancel my order."),
        ChatMessage(role="assistant", tool_calls=[call]),
        ChatMessage(role="tool", tool_call_id="c1", content="yusuf_rossi_9620"),
        ChatMessage(role="assistant", content="Found you. Which order?"),
        ChatMessage(role="user", content="#W2378156"),
    ]
    return SFTExample(
        source="leafe", task_id="retail-0", messages=solver.render(history),
        tools=solver.tools, trained=[3, 5],
    )  # fmt: skip


def proposal(task: Task) -> TaskProposal:
    """`task` as the Proposer would send it to the validator."""
    return TaskProposal(id=f"p-{task.id}", task=task, prompt_version="v1", proposer_model="t")


class Answers:
    """A stand-in endpoint for error handling only: it answers `text` to every request."""

    model = "stand-in"

    def __init__(self, text: str) -> None:
        self.text = text

    async def complete(self, *_: Any, **__: Any) -> Completion:
        return Completion(content=self.text, finish_reason="stop")
