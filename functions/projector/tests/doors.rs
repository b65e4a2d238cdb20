//! The projector function through both doors: an API Gateway v2 event through the Lambda
//! runtime, and a real HTTP request through the server, with the same outcome.

use tally_testkit::{assert_same, both_doors, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_projector");

#[tokio::test]
async fn a_rebuild_answers_the_same_through_lambda_and_http() {
    let seed = [
        Step::Open("acc"),
        Step::Deposit("acc", "1"),
        Step::Open("bcc"),
    ];
    let req = Req::post("/projector/rebuild");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["streams"], 2);
    assert_eq!(answer.body["commits"], 3);
    assert_eq!(answer.body["events"], 3);
}

#[tokio::test]
async fn a_wrong_method_is_refused_the_same_through_lambda_and_http() {
    let seed: [Step; 0] = [];
    let req = Req::get("/projector/rebuild");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 405);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.body["type"], "/problems/method-not-allowed");
}
