"""Domain errors -> HTTP bodies an OpenAI client can type, and the refusal reasons of the metrics."""

from __future__ import annotations

import pytest

from runtime.api.interceptors import _decoder, http_error
from runtime.metrics import REFUSAL_REASONS, refusal_reason
from wattserve.errors import (
    BudgetInfeasible,
    ExpertUnavailable,
    InvalidRequest,
    QueueFull,
    RequestAborted,
    RequestTooLarge,
    UnknownExpert,
)


def test_an_infeasible_budget_is_a_typed_bad_request_naming_the_budget():
    status, body, _ = http_error(BudgetInfeasible("no expert fits energy_budget_j=0.001", param="energy_budget_j"))
    assert status == 400
    assert body["error"] == {"message": "no expert fits energy_budget_j=0.001", "type": "invalid_request_error",
                             "param": "energy_budget_j", "code": "budget_infeasible"}


def test_a_too_large_request_is_413_over_http_and_invalid_argument_over_grpc():
    exc = RequestTooLarge("too big", param="prompt")
    assert exc.grpc_code == "INVALID_ARGUMENT"
    status, body, _ = http_error(exc)
    assert status == 413 and body["error"]["type"] == "invalid_request_error"


def test_grpc_decoder_names_the_message_limit_and_utf8():
    from runtime.api.gen import wattserve_pb2 as pb

    decode = _decoder(pb.GenerateRequest.FromString, "/wattserve.v1.Inference/Generate", max_message_bytes=100)
    with pytest.raises(RequestTooLarge, match=r"198 bytes; this server accepts at most 100 \(gateway.max_message_bytes"):
        decode(pb.GenerateRequest(prompt="x" * 195).SerializeToString())
    with pytest.raises(InvalidRequest, match="not valid UTF-8"):
        decode(pb.GenerateRequest(prompt="abc").SerializeToString().replace(b"abc", b"a\xffc"))
    with pytest.raises(InvalidRequest, match="not a valid protobuf message"):
        decode(b"\xff\xff\xff")
    assert decode(pb.GenerateRequest(prompt="ok").SerializeToString()).prompt == "ok"


@pytest.mark.parametrize("exc, reason", [
    (InvalidRequest("x", reason="unknown_field"), "unknown_field"),
    (InvalidRequest("x"), "invalid_value"),
    (InvalidRequest("x", reason="made-up-by-a-client"), "invalid_value"),  # the label set stays fixed
    (UnknownExpert("x"), "unknown_model"),
    (QueueFull("x"), "queue_full"),
    (BudgetInfeasible("x"), "budget_infeasible"),
    (RequestTooLarge("x"), "too_large"),
    (ExpertUnavailable("x"), None),  # the server's failure, not a refusal
    (RequestAborted("x"), None),
    (ValueError("x"), None),
])
def test_refusal_reasons(exc, reason):
    assert refusal_reason(exc) == reason
    assert reason is None or reason in REFUSAL_REASONS
