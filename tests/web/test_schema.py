"""Schemathesis over the OpenAPI schema: generated requests, valid and not, never get a server error, and
every answer has the shape the schema documents; with runs in the runs folder, one of them malformed."""

from __future__ import annotations

import sys

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error, response_schema_conformance

from nnvitals.web import create_app

from .conftest import BASE, PORT, fake_run

EXAMPLES = 8  # per operation and mode (valid, then invalid): bounded to keep the suite quick


def test_no_request_gets_a_server_error_or_an_undocumented_answer(tmp_path):
    fake_run(tmp_path / "runs", "run-1")
    (fake_run(tmp_path / "runs", "run-2") / "summary.json").write_text('{"dataset": null, "stages": 3}')
    # A lab "run" that exits at once, so generated requests can start as many as they like.
    app = create_app(tmp_path / "runs", tmp_path / "study.sqlite3", port=PORT, lab_command=[sys.executable, "-c", ""])
    host = {"Host": f"127.0.0.1:{PORT}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=host)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11
    checks = [not_a_server_error, response_schema_conformance]
    for operation in operations:
        takes_input = any(len(part) for part in (operation.path_parameters, operation.query, operation.body))
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)[:1 + takes_input]:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None)
            def call(case: schemathesis.Case) -> None:
                case.call_and_validate(base_url=BASE, headers=host, checks=checks)

            try:
                call()
            except Unsatisfiable:
                # Only for invalid input: a free-text path segment (a run id) has no invalid form to generate.
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
        if "run_id" in [p.name for p in operation.path_parameters]:  # random ids never name the runs there are
            for run_id in ("run-1", "run-2"):
                case = operation.Case(path_parameters={"run_id": run_id})
                case.call_and_validate(base_url=BASE, headers=host, checks=checks)
