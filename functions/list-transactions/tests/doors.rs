//! The list-transactions function through both doors: an API Gateway v2 event through the Lambda
//! runtime, and a real HTTP request through the server, with the same outcome.

use tally_testkit::{assert_same, both_doors, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_list-transactions");

#[tokio::test]
async fn a_page_of_history_answers_the_same_through_lambda_and_http() {
    let seed = [
        Step::Open("acc"),
        Step::Deposit("acc", "1"),
        Step::Deposit("acc", "2"),
        Step::Withdraw("acc", "3"),
    ];
    let req = Req::get("/accounts/acc/transactions?limit=2");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 200);
    let items = answer.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[1]["type"], "deposit");
    assert_eq!(answer.body["next_cursor"], "3");
}

#[tokio::test]
async fn a_bad_page_size_is_refused_the_same_through_lambda_and_http() {
    let seed = [Step::Open("acc")];
    let req = Req::get("/accounts/acc/transactions?limit=0");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 400);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.body["type"], "/problems/invalid-query");
}
