"""What a streamed completion passes on when its job is re-run after a worker died."""

from __future__ import annotations

from gateway.stream_relay import Relay
from worker.streaming import settled_text


def test_rerun_attempt_sends_only_text_beyond_what_the_client_has() -> None:
    relay = Relay()
    assert relay.take(1, {"0": "Once "}) == [(0, "Once ")]
    assert relay.take(1, {"0": "upon"}) == [(0, "upon")]
    # The worker died; attempt 2 starts again from the beginning and repeats the same text.
    assert relay.take(2, {"0": "Once up"}) == []
    assert relay.take(2, {"0": "on a time"}) == [(0, " a time")]
    assert relay.take(1, {"0": "late message of the dead attempt"}) == []
    assert relay.rest(0, "Once upon a time, there") == ", there"


def test_rerun_that_writes_different_text_is_reported_not_spliced() -> None:
    relay = Relay()
    relay.take(1, {"0": "Once upon"})
    assert relay.take(2, {"0": "Twice"}) == []
    assert relay.rest(0, "Twice upon a time") is None


def test_settled_text_holds_back_a_stop_string_that_may_be_forming() -> None:
    assert settled_text("Hello wor", ["world!"]) == "Hell"
    assert settled_text("Hello world! and more", ["world!"]) == "Hello "
    assert settled_text("partial \ufffd", []) == "partial "
