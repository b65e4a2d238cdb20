//! The deposit function through both doors: an API Gateway v2 event through the Lambda
//! runtime, and a real HTTP request through the server, with the same outcome.

use tally_testkit::{assert_same, both_doors, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_deposit");

#[tokio::test]
async fn a_deposit_answers_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc"), Step::Deposit("acc", "5.00")];
    let req = Req::post("/accounts/acc/deposit").json(r#"{"Amount": 10.00}"#);
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["balance"], "15.00");
    assert_eq!(answer.body["revision"], 3);
}

#[tokio::test]
async fn an_over_precise_amount_is_refused_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc")];
    let req = Req::post("/accounts/acc/deposit").json(r#"{"Amount": 0.001}"#);
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 422);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.body["type"], "/problems/invalid-amount");
}
