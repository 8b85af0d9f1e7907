from __future__ import annotations

import json

import pytest

from sentinel.schemas import (
    Envelope,
    Message,
    MessageError,
    RolloutGroup,
    Task,
    Trajectory,
    TurnTokens,
    message_class,
)
from sentinel.schemas.envelope import peek_key
from tests import factories


@pytest.mark.parametrize("message", factories.examples(), ids=lambda m: type(m).__name__)
def test_json_round_trips_exactly(message: Message) -> None:
    wire = message.model_dump_json()
    again = type(message).parse(wire)
    assert again == message
    assert again.model_dump_json() == wire


def test_every_registered_type_has_an_example() -> None:
    assert {type(m).__name__ for m in factories.examples()} == set(Message.registry)


@pytest.mark.parametrize("message", factories.examples(), ids=lambda m: type(m).__name__)
def test_envelope_round_trips_on_the_wire(message: Message) -> None:
    envelope = Envelope.wrap(message)
    decoded = Envelope.from_wire(envelope.to_wire(), type(message), attempt=2)
    assert decoded.payload == message
    assert decoded.attempt == 2
    assert (decoded.id, decoded.key, decoded.created_at) == (
        envelope.id,
        envelope.key,
        envelope.created_at,
    )


def test_keys_of_any_text_round_trip_on_the_wire() -> None:
    key = 'ключ "q" \\ 😀\n'
    assert Envelope.from_wire(Envelope.encode(factories.task(), key), Task).key == key
    wrapped = Envelope.wrap(factories.task(), key).to_wire()
    assert Envelope.from_wire(wrapped, Task).key == key


def test_envelope_ids_are_unique_and_as_long_as_message_ids() -> None:
    ids = {json.loads(w["envelope"])["id"] for w in Envelope.encode_many(factories.examples())}
    assert len(ids) == len(factories.examples())
    assert {len(i) for i in ids} == {32}


def test_invalid_payload_names_the_field() -> None:
    data = json.loads(factories.task().model_dump_json())
    data["spec"]["evaluation_criteria"]["actions"][0]["arguments"] = "not a dict"
    with pytest.raises(MessageError) as caught:
        Task.parse(json.dumps(data))
    assert caught.value.field == "spec.evaluation_criteria.actions.0.arguments"
    assert "spec.evaluation_criteria.actions.0.arguments" in str(caught.value)


def test_unknown_field_is_an_error() -> None:
    data = json.loads(factories.task().model_dump_json())
    data["provenance"]["colour"] = "blue"
    with pytest.raises(MessageError, match=r"provenance\.colour"):
        Task.parse(json.dumps(data))


def test_truncated_json_is_an_error() -> None:
    with pytest.raises(MessageError, match="invalid Task"):
        Task.parse(factories.task().model_dump_json()[:40])


def test_wrong_type_missing_field_and_newer_schema_on_the_wire() -> None:
    wire = Envelope.wrap(factories.task()).to_wire()
    with pytest.raises(MessageError, match="expected Trajectory, got 'Task'"):
        Envelope.from_wire(wire, Trajectory)
    with pytest.raises(MessageError, match="field 'envelope': missing"):
        Envelope.from_wire({"data": "{}"}, Task)
    newer = json.loads(wire["envelope"]) | {"schema_version": 99}
    newer["payload"]["added_in_v99"] = True
    with pytest.raises(MessageError, match="99 is newer than 1"):
        Envelope.from_wire({"envelope": json.dumps(newer)}, Task)
    with pytest.raises(MessageError, match="field 'created_at'"):
        bad_time = json.loads(wire["envelope"]) | {"created_at": "yesterday"}
        Envelope.from_wire({"envelope": json.dumps(bad_time)}, Task)
    with pytest.raises(MessageError, match=r"field 'payload\.domain'"):
        bad_payload = json.loads(wire["envelope"])
        bad_payload["payload"]["domain"] = 7
        Envelope.from_wire({"envelope": json.dumps(bad_payload)}, Task)


def test_unknown_message_type() -> None:
    assert message_class("Task") is Task
    with pytest.raises(MessageError, match="unknown message type 'Nope'"):
        message_class("Nope")


def test_logprobs_must_align_with_tokens() -> None:
    with pytest.raises(ValueError, match="1 logprobs for 2 tokens"):
        TurnTokens(
            message_index=0, prompt_token_ids=[1], completion_token_ids=[2, 3], logprobs=[0.0]
        )


def test_rollout_group_informative_only_when_rewards_differ() -> None:
    mixed = RolloutGroup(
        task_id="t", policy_version=0,
        trajectories=[factories.trajectory(0, 0.0), factories.trajectory(1, 1.0)],
    )  # fmt: skip
    flat = mixed.model_copy(
        update={"trajectories": [factories.trajectory(i, 1.0) for i in range(3)]}
    )
    assert mixed.informative()
    assert not flat.informative()
    assert flat.rewards == [1.0, 1.0, 1.0]


def test_task_spec_accepts_a_real_tau2_task_shape() -> None:
    tau2_task = {
        "id": "0",
        "description": {"purpose": "returns", "relevant_policies": None, "notes": None},
        "user_scenario": {
            "persona": None,
            "instructions": {
                "domain": "retail",
                "reason_for_call": "return",
                "known_info": "zip 12345",
                "unknown_info": None,
                "task_instructions": "be brief",
            },
        },
        "initial_state": None,
        "evaluation_criteria": {
            "actions": [
                {
                    "action_id": "0_0",
                    "requestor": "assistant",
                    "name": "find_user_id_by_name_zip",
                    "arguments": {"first_name": "Yusuf", "last_name": "Rossi", "zip": "19122"},
                    "info": None,
                    "compare_args": None,
                }
            ],
            "communicate_info": [],
            "nl_assertions": None,
        },
    }
    spec = factories.task().spec.model_validate(tau2_task)
    assert spec.evaluation_criteria is not None
    assert [b.value for b in spec.evaluation_criteria.reward_basis] == ["DB", "COMMUNICATE"]


def test_a_newer_schema_is_refused_even_when_its_payload_validates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wire = json.loads(Envelope.wrap(factories.task()).to_wire()["envelope"])
    monkeypatch.setattr(Task, "schema_version", 2)
    for older_or_same in (1, 2):
        entry = {"envelope": json.dumps(wire | {"schema_version": older_or_same})}
        assert Envelope.from_wire(entry, Task).schema_version == older_or_same
    with pytest.raises(MessageError, match="'schema_version': 3 is newer than 2: upgrade"):
        Envelope.from_wire({"envelope": json.dumps(wire | {"schema_version": 3})}, Task)
    with pytest.raises(MessageError, match="'schema_version': Input should be greater"):
        Envelope.from_wire({"envelope": json.dumps(wire | {"schema_version": 0})}, Task)


def test_deep_nesting_and_keys_that_are_no_text_get_a_reason() -> None:
    deep = {"envelope": '{"key":"k","payload":' + "[" * 100_000 + "]" * 100_000 + "}"}
    with pytest.raises(MessageError, match="invalid Task: field"):
        Envelope.from_wire(deep, Task)
    assert peek_key(deep) is None
    assert peek_key({"envelope": '{"key":"\\ud800"}'}) is None  # a lone surrogate
    assert peek_key({"envelope": '{"key":"\\ud83d\\ude00"}'}) == "😀"  # a pair is text
    assert peek_key({"envelope": '{"key":7}'}) is None
