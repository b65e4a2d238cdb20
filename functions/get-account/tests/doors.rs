//! The get-account function through both doors: an API Gateway v2 event through the Lambda
//! runtime, and a real HTTP request through the server, with the same outcome.

use tally_testkit::{assert_same, both_doors, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_get-account");

#[tokio::test]
async fn the_account_answers_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc"), Step::Deposit("acc", "1.25")];
    let req = Req::get("/accounts/acc?min_revision=2");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["status"], "open");
    assert_eq!(answer.body["balance"], "1.25");
}

#[tokio::test]
async fn a_control_character_in_the_id_is_refused_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc")];
    let req = Req::get("/accounts/a%0Ab");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 400);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.body["type"], "/problems/invalid-account-id");
}
