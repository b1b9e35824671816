"""Property-based fuzzing of both endpoints from their own OpenAPI (schemathesis, positive and negative
examples, a bounded number per operation): no input may cause a 5xx, every answer matches the documented
status codes and response schemas, and input that breaks the schema is refused with a 4xx.

Drives schemathesis' strategies with hypothesis directly: its pytest plugin (lazy fixtures) does not run
under pytest 9 (``'Function' object has no attribute '_nodeid'``).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

MAX_EXAMPLES = 25


#: Every response is checked against the endpoint's own OpenAPI: no 5xx, a documented status code and
#: content type, a body that matches the documented schema of that status; negative examples (input
#: that breaks the schema) must be rejected with a 4xx.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _fuzzer(operation, mode: GenerationMode, url: str, record: list):
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def call(case):
        response = case.call(base_url=url, timeout=30)
        record.append((f"{operation.label} [{mode.value}]", response.status_code,
                       f"{response.text[:200]} for {case.body!r:.200}"))
        case.validate_response(response, checks=checks)

    return call


def has_input(operation) -> bool:
    """Whether the operation takes anything a negative example could break (a body or parameters)."""
    return bool(operation.body) or any(True for _ in operation.iter_parameters())


def fuzz(url: str) -> list[tuple[str, int, str]]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    record: list[tuple[str, int, str]] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_input(operation) else [])
        for mode in modes:
            _fuzzer(operation, mode, url, record)()
    return record


@pytest.mark.parametrize("family", ["image", "text"])
def test_no_server_errors(family, request):
    url = request.getfixturevalue(f"{family}_url")
    record = fuzz(url)
    assert len(record) >= 2 * MAX_EXAMPLES
    predict = [status for label, status, _ in record if label.startswith("POST /predict")]
    assert 200 in predict, "no valid /predict request was generated"
    assert any(400 <= status < 500 for status in predict), "no invalid /predict request was generated"
    failures = [f"{label} -> {status}: {detail}" for label, status, detail in record if status >= 500]
    assert not failures, "\n".join(failures[:10])
