//! The get-balance function through both doors: an API Gateway v2 event through the Lambda
//! runtime, and a real HTTP request through the server, with the same outcome.

use tally_testkit::{assert_same, both_doors, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_get-balance");

#[tokio::test]
async fn the_balance_answers_the_same_through_lambda_and_http() {
    let seed = [
        Step::Open("acc"),
        Step::Deposit("acc", "500.00"),
        Step::Withdraw("acc", "150.00"),
    ];
    let req = Req::get("/accounts/acc/balance");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["balance"], "350.00");
    assert_eq!(answer.body["revision"], 3);
}

#[tokio::test]
async fn an_unknown_account_is_refused_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc")];
    let req = Req::get("/accounts/other/balance");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 404);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.body["type"], "/problems/account-not-found");
}
