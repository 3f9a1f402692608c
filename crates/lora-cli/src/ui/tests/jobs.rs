//! The Jobs API without a real run: what a start may resume.

use super::*;
use std::path::Path;

/// `ROOT/jobs/<name>/job.toml` with `id` and a saved state of its run
/// written by the job `writer` (as the trainer records it).
fn job_with_state(root: &Path, name: &str, id: &str, writer: &str) {
    let dir = root.join("jobs").join(name);
    let run = dir.join("output").join(name);
    std::fs::create_dir_all(&run).unwrap();
    let text = lora_sdxl::JobConfig::template(None, None, None, Some(id))
        .replace("name = \"my_lora\"", &format!("name = {name:?}"));
    std::fs::write(dir.join("job.toml"), text).unwrap();
    let md = std::collections::BTreeMap::from([("lorakit.job_id".to_string(), writer.to_string())]);
    let t = [(
        "x".to_string(),
        tch::Tensor::zeros([1], tch::kind::FLOAT_CPU),
    )];
    let bytes = lora_core::io::serialize(&t, &md).unwrap();
    std::fs::write(run.join("state.safetensors"), bytes).unwrap();
}

#[test]
fn a_job_never_resumes_a_state_another_job_wrote() {
    let s = start(true, 1 << 20);
    job_with_state(&s.root, "mine", "aaaa", "aaaa");
    job_with_state(&s.root, "taken", "cccc", "bbbb");
    let post = |path: &str| {
        let (status, _, b) = http(s.port, "POST", path, &[AUTH], b"");
        (status, String::from_utf8_lossy(&b).into_owned())
    };
    // issue 26: Start passed --resume whenever a state existed, so a new
    // job in an old job's folder went on from its weights and step count
    for action in ["start", "resume", "extend"] {
        let (status, b) = post(&format!("/api/jobs/taken/{action}"));
        assert_eq!(status, 409, "{action}: {b}");
        assert!(b.contains("another job (job.id = \\\"bbbb\\\")"), "{b}");
    }
    let (status, b) = post("/api/jobs/mine/resume");
    assert_eq!(status, 200, "{b}");
}

#[test]
fn a_panic_in_the_queue_is_shown_in_the_page() {
    let s = start(true, 1 << 20);
    let status = || json(&http(s.port, "GET", "/api/status", &[], b"").2);
    assert_eq!(status()["queue_fault"], serde_json::Value::Null);
    s.ui.turn(|| panic!("a bug in a turn"));
    // issue 26: it was only logged, the page said nothing
    assert_eq!(status()["queue_fault"], "a bug in a turn");
    s.ui.turn(|| ());
    assert_eq!(
        status()["queue_fault"],
        "a bug in a turn",
        "kept until the UI restarts"
    );
}
