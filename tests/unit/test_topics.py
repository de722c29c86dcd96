import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgespeed.errors import TopicError
from edgespeed.protocol import topics
from edgespeed.protocol.topics import TopicKind, TopicName


def test_builders_and_parser_agree() -> None:
    cases = {
        topics.device_inbox("f1", "dev-1"): TopicName(TopicKind.DEVICE_INBOX, "f1", "dev-1"),
        topics.birth("f1", "dev-1"): TopicName(TopicKind.BIRTH, "f1", "dev-1"),
        topics.death("f1", "dev-1"): TopicName(TopicKind.DEATH, "f1", "dev-1"),
        topics.heartbeat("f1", "dev-1"): TopicName(TopicKind.HEARTBEAT, "f1", "dev-1"),
        topics.coordinator_inbox("f1", "dev-1"): TopicName(TopicKind.COORDINATOR_INBOX, "f1", "dev-1"),
        topics.coordinator_state("f1"): TopicName(TopicKind.COORDINATOR_STATE, "f1"),
        topics.broadcast("f1", "models"): TopicName(TopicKind.BROADCAST, "f1", "models"),
        topics.model_manifest("f1", "digits"): TopicName(TopicKind.MODEL, "f1", "digits"),
    }
    for topic, expected in cases.items():
        assert topic.startswith("es/1/f1/")
        assert topics.parse_topic(topic) == expected


@pytest.mark.parametrize(
    "bad", ["", "+", "#", "a/b", "a\x00", "A", "-lead", "a" * 64, "dev+1", "dev#", "ü", " a", None, 5]
)
def test_injection_and_bad_ids_are_refused(bad: object) -> None:
    with pytest.raises(TopicError):
        topics.device_inbox("fleet", bad)  # type: ignore[arg-type]
    with pytest.raises(TopicError):
        topics.broadcast(bad, "models")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "topic",
    [
        "es/2/f/dev/d/in",
        "es/1/f/dev/d/other",
        "es/1/f/dev/+/in",
        "es/1/f/coord",
        "x/1/f/coord/state",
        "es/1/f/dev/d/in/extra",
        "es/1/F/coord/state",
        "es/1/f/bcast/a#",
        "a" * 600,
    ],
)
def test_unknown_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.parse_topic(topic)


@pytest.mark.fuzz
@given(st.text(max_size=80))
def test_any_string_is_a_valid_id_or_a_topic_error(value: str) -> None:
    try:
        topic = topics.device_inbox("f", value)
    except TopicError:
        return
    assert not set(value) & set("+#/\x00")
    assert topics.parse_topic(topic).id == value


@pytest.mark.fuzz
@given(st.text(max_size=200))
def test_parse_topic_never_crashes(topic: str) -> None:
    try:
        topics.parse_topic(topic)
    except TopicError:
        pass


def test_device_filter() -> None:
    assert topics.device_filter("f", "birth") == "es/1/f/dev/+/birth"
    with pytest.raises(TopicError):
        topics.device_filter("f", "#")
