"""Schemathesis checks for Tally (loaded by scripts/schemathesis.sh via SCHEMATHESIS_HOOKS).

`refused_only_for_state` replaces the built-in `positive_data_acceptance`, which counts
every 4xx but 401/403/404/409/429 as a schema-valid request refused. Tally answers some
schema-valid requests with 412 or 422 because of the account's state, not the request's
form: If-Match naming another revision, a withdrawal larger than the balance, a revision
the account has not reached, a key reused with another request. Those are allowed by
problem type; any other refusal of a schema-valid request is a failure — the document is
looser than the server there. Two rules span two parameters, which OpenAPI 3.1 cannot
state, and are said in the parameters' descriptions: `as_of` with `as_of_revision`, and a
statement period that does not end after it starts, and `min_revision` (the present) with
either. One rule spans two body fields, which JSON Schema cannot state either: a
transfer's `to` is not its `from` (`same-account`, said in the field's description). A time in the future for `as_of` depends on the clock, and is allowed as state.
"""

import json

import schemathesis

STATE = {
    "/problems/revision-mismatch",
    "/problems/revision-not-reached",
    "/problems/insufficient-funds",
    "/problems/idempotency-key-reused",
    "/problems/account-closed",
    "/problems/account-already-exists",
    "/problems/balance-not-zero",
    "/problems/as-of-in-future",
}
ACROSS_PARAMETERS = (
    "give as_of_revision or as_of, not both",
    "the period must end after it starts",
    "min_revision asks for the present",
)
ACROSS_FIELDS = {"/problems/same-account"}
ANSWERS = {401, 403, 404, 409, 429}


@schemathesis.check
def refused_only_for_state(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status >= 500 or status in ANSWERS:
        return None
    try:
        problem = json.loads(response.content)
    except ValueError:
        problem = {}
    kind = problem.get("type", "")
    detail = problem.get("detail", "")
    if kind in STATE or kind in ACROSS_FIELDS:
        return None
    if kind == "/problems/invalid-query" and detail.startswith(ACROSS_PARAMETERS):
        return None
    raise AssertionError(
        f"a schema-valid request was refused for its form: {status} {kind}: {detail}"
    )
