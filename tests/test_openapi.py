"""The committed OpenAPI document is the one the app serves."""

from __future__ import annotations

import json
from typing import Any

from service.main import create_app
from tests.support import ROOT


def test_the_committed_openapi_document_is_fresh() -> None:
    committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(create_app().openapi())), (
        "openapi/openapi.json is stale: run `make openapi`"
    )


def test_every_route_documents_a_summary_tags_and_problem_errors() -> None:
    spec = create_app().openapi()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert len(operation.get("summary", "").split()) > 3, f"{method} {path}: no summary"
            assert operation.get("tags"), f"{method} {path} has no tags"
            for status, response in operation["responses"].items():
                if (status.startswith(("4", "5")) and status != "422") or status == "422":
                    content = response.get("content", {})
                    assert "application/problem+json" in content or "text/html" in content, (
                        f"{method} {path} {status} documents no problem+json or page"
                    )


def test_every_request_and_response_body_has_an_example() -> None:
    spec = create_app().openapi()
    schemas = spec["components"]["schemas"]

    def has_example(media: dict[str, Any]) -> bool:
        schema = media.get("schema", {})
        ref = schema.get("$ref") or schema.get("items", {}).get("$ref")
        target = schemas[ref.rsplit("/", 1)[1]] if ref else schema
        return bool({"example", "examples"} & (set(media) | set(target)))

    missing = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            bodies = [("request", operation.get("requestBody", {}))]
            bodies += list(operation["responses"].items())
            for where, documented in bodies:
                for content_type, media in documented.get("content", {}).items():
                    if not has_example(media):
                        missing.append(f"{method} {path} {where} {content_type}")
    assert not missing
