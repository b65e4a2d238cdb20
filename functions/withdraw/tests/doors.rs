//! The withdraw function through both doors: an API Gateway v2 event through the Lambda
//! runtime, and a real HTTP request through the server, with the same outcome.

use tally_testkit::{assert_same, both_doors, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_withdraw");

#[tokio::test]
async fn a_withdrawal_answers_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc"), Step::Deposit("acc", "20")];
    let req = Req::post("/accounts/acc/withdraw").json(r#"{"Amount": 7.50}"#);
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["balance"], "12.50");
    assert_eq!(answer.body["amount"], "7.50");
}

#[tokio::test]
async fn overdrawing_is_refused_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc"), Step::Deposit("acc", "20")];
    let req = Req::post("/accounts/acc/withdraw").json(r#"{"Amount": 20.01}"#);
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 422);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.body["type"], "/problems/insufficient-funds");
}
