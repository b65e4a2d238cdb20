"""Schemathesis checks for Tally (loaded by scripts/schemathesis.sh via SCHEMATHESIS_HOOKS).

`refused_only_for_state` sharpens the built-in `positive_data_acceptance`, which
schemathesis.toml tells to take 412 and 422 as answers: Tally answers some schema-valid
requests with 412 or 422 because of the account's state, not the request's form —
If-Match naming another revision, a withdrawal larger than the balance, a revision the
account has not reached, a key reused with another request, a time in the future for
`as_of` (it depends on the clock). Those are allowed by problem type; any other refusal of
a schema-valid request (an `invalid-amount` or `invalid-request` 422, a 400) is a failure
— the document is looser than the server there. Two rules span two parameters, which
OpenAPI 3.1 cannot state, and are said in the parameters' descriptions and answered 422
`conflicting-query`: `as_of` with `as_of_revision` (or `min_revision`, the present, with
either), and a statement period that does not end after it starts. One rule spans two
body fields, which JSON Schema cannot state either: a transfer's `to` is not its `from`
(422 `same-account`, said in the field's description).
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
ACROSS_PARAMETERS = {"/problems/conflicting-query"}
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
    if kind in STATE or kind in ACROSS_PARAMETERS or kind in ACROSS_FIELDS:
        return None
    raise AssertionError(
        f"a schema-valid request was refused for its form: {status} {kind}: {detail}"
    )
