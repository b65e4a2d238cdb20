//! The projector's doors differ by nature: in a pod it consumes the stream and serves
//! operations routes over HTTP (tested here); under the Lambda runtime it is invoked
//! with Kafka batches (`kafka.rs`).

use tally_testkit::{seed, Function, Req, Step};

const BIN: &str = env!("CARGO_BIN_EXE_projector");

#[tokio::test]
async fn in_a_pod_the_projector_rebuilds_its_read_model_on_request() {
    let dir = tempfile::tempdir().unwrap();
    seed(
        dir.path(),
        &[
            Step::Open("acc"),
            Step::Deposit("acc", "1"),
            Step::Open("bcc"),
        ],
    )
    .await;
    let projector = Function::server(BIN, dir.path()).await;
    let answer = projector.call(&Req::post("/projector/rebuild")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["streams"], 2);
    assert_eq!(answer.body["commits"], 3);
    assert_eq!(answer.body["events"], 3);
    let answer = projector.call(&Req::post("/projector/catch-up")).await;
    assert_eq!(
        (answer.status, &answer.body["commits_applied"]),
        (200, &serde_json::json!(0))
    );
    let answer = projector.call(&Req::get("/projector/rebuild")).await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.body["type"], "/problems/method-not-allowed");
}
