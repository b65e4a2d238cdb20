//! The gateway function through both doors: an API Gateway v2 event through the Lambda
//! runtime, and a real HTTP request through the server, with the same outcome.

use tally_testkit::{assert_same, both_doors, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

#[tokio::test]
async fn the_seed_request_answers_the_same_through_lambda_and_http() {
    let seed = [Step::Open("account123")];
    let req = Req::post("/accounts/account123/deposit").json(r#"{"Amount": 500.00}"#);
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["balance"], "500.00");
}

#[tokio::test]
async fn a_public_route_of_no_function_is_refused_the_same_through_lambda_and_http() {
    let seed: [Step; 0] = [];
    let req = Req::get("/projector/rebuild");
    let answer = assert_same(both_doors(BIN, &seed, &req).await);
    assert_eq!(answer.status, 404);
    assert_eq!(answer.content_type, "application/problem+json");
    assert_eq!(answer.body["type"], "/problems/not-found");
}
