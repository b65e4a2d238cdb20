//! The close-account function through both doors: an API Gateway v2 event through the Lambda
//! runtime, and a real HTTP request through the server, with the same outcome.

use tally_testkit::{assert_same, both_doors, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_close-account");

#[tokio::test]
async fn closing_answers_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc")];
    let req = Req::post("/accounts/acc/close");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["status"], "closed");
    assert_eq!(answer.body["revision"], 2);
}

#[tokio::test]
async fn closing_with_money_is_refused_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc"), Step::Deposit("acc", "1")];
    let req = Req::post("/accounts/acc/close");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 409);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.body["type"], "/problems/balance-not-zero");
}
