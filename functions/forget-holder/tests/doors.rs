//! The forget-holder function through both doors: an API Gateway v2 event through the
//! Lambda runtime, and a real HTTP request through the server, with the same outcome.

use tally_testkit::{assert_same, both_doors, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_forget-holder");

#[tokio::test]
async fn forgetting_answers_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc"), Step::Deposit("acc", "2")];
    let req = Req::post("/accounts/acc/forget");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["revision"], 3);
    assert_eq!(answer.body["balance"], "2.00", "the ledger stays");
}

#[tokio::test]
async fn forgetting_a_missing_account_is_refused_the_same_through_lambda_and_http() {
    let seed: [Step; 0] = [];
    let req = Req::post("/accounts/nobody/forget");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 404);
    assert_eq!(answer.body["type"], "/problems/account-not-found");
}
