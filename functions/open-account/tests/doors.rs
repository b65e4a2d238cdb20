//! The open-account function through both doors: an API Gateway v2 event through the Lambda
//! runtime, and a real HTTP request through the server, with the same outcome.

use tally_testkit::{assert_same, both_doors, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_open-account");

#[tokio::test]
async fn opening_an_account_answers_the_same_through_lambda_and_http() {
    let seed: [Step; 0] = [];
    let req = Req::post("/accounts").json(r#"{"ID": "account123"}"#);
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 201);
    assert_eq!(answer.body["id"], "account123");
    assert_eq!(answer.body["revision"], 1);
    assert_eq!(answer.body["balance"], "0.00");
}

#[tokio::test]
async fn an_id_with_a_slash_is_refused_the_same_through_lambda_and_http() {
    let seed: [Step; 0] = [];
    let req = Req::post("/accounts").json(r#"{"ID": "a/b"}"#);
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 400);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.body["type"], "/problems/invalid-account-id");
}
