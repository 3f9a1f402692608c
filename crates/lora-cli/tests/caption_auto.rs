//! `lorakit caption auto` end to end, against a fake OpenAI-compatible
//! endpoint served by this test process.

use lora_data::autocaption::fake::{FakeEndpoint, FakeReply};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn lorakit(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lorakit"));
    c.args(args).env_remove("LD_LIBRARY_PATH");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run lorakit")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn images(dir: &Path, names: &[&str]) {
    for (i, n) in names.iter().enumerate() {
        image::RgbImage::from_pixel(40 + i as u32, 30, image::Rgb([200, 120, 40]))
            .save(dir.join(n))
            .unwrap();
    }
}

/// Caption requests the server got (the reachability probe is a GET).
fn captions_asked(server: &FakeEndpoint) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count()
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

#[test]
fn captions_a_folder_and_reports_the_failure_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d, &["a.png", "b.png", "c.png"]);
    let server = FakeEndpoint::start(|req, _| match req.image().map(|i| i.width()) {
        Some(40) => FakeReply::content("- sitting\n- indoors\n- blue skin\n- office"),
        Some(41) => FakeReply::content("Tags: red body, desk, laptop, photo, photo"),
        _ => FakeReply::content("I cannot describe this image."),
    });
    let key = [("LORAKIT_CLI_TEST_KEY", "sk-cli-77aa")];
    let args = [
        "caption",
        "auto",
        d.to_str().unwrap(),
        "--endpoint",
        &server.url(),
        "--model",
        "qwen2.5-vl",
        "--api-key-env",
        "LORAKIT_CLI_TEST_KEY",
        "--trigger",
        "myakumyaku-san",
        "--remove",
        "blue skin,red body",
    ];
    let o = lorakit(&args, &key);
    let all = text(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a failed image fails the run: {all}"
    );
    assert!(all.contains("captioned 2, failed 1"), "{all}");
    assert!(
        all.contains("c.png: the model refused: I cannot describe"),
        "{all}"
    );
    assert!(!all.contains("sk-cli-77aa"));
    assert_eq!(
        read(d, "a.txt").as_deref(),
        Some("myakumyaku-san, sitting, indoors, office\n")
    );
    assert_eq!(
        read(d, "b.txt").as_deref(),
        Some("myakumyaku-san, desk, laptop, photo\n")
    );
    assert_eq!(read(d, "c.txt"), None);
    assert!(server
        .requests()
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer sk-cli-77aa")));

    // Again: the two captions are kept, only c.png is sent.
    let before = captions_asked(&server);
    let o = lorakit(&args, &key);
    assert!(text(&o).contains("captioned 0, skipped 2"), "{}", text(&o));
    assert_eq!(captions_asked(&server), before + 1);

    // A dry run with --overwrite prints what it would write and writes nothing.
    let mut dry = args.to_vec();
    dry.extend(["--overwrite", "--dry-run"]);
    let o = lorakit(&dry, &key);
    let all = text(&o);
    assert!(
        all.contains("a.png: myakumyaku-san, sitting, indoors, office"),
        "{all}"
    );
    assert!(
        all.contains("would write 2") && all.contains("nothing written"),
        "{all}"
    );
    assert_eq!(
        read(d, "a.txt").as_deref(),
        Some("myakumyaku-san, sitting, indoors, office\n")
    );
}

#[test]
fn bad_arguments_are_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for (extra, says) in [
        (
            vec!["--endpoint", "localhost:8080/v1"],
            "must start with http://",
        ),
        (
            vec![
                "--endpoint",
                "http://127.0.0.1:9/v1",
                "--api-key-env",
                "LORAKIT_NO_SUCH_VAR",
            ],
            "LORAKIT_NO_SUCH_VAR is not set",
        ),
        (
            vec!["--endpoint", "http://127.0.0.1:9/v1", "--max-side", "10"],
            "--max-side 10",
        ),
        (
            vec![
                "--endpoint",
                "http://127.0.0.1:9/v1",
                "--prompt-file",
                "/no/such/prompt.txt",
            ],
            "--prompt-file /no/such/prompt.txt",
        ),
        (
            vec!["--endpoint", "http://127.0.0.1:9/v1", "--model", "m"],
            "is the server running",
        ),
    ] {
        let mut args = vec!["caption", "auto", d];
        args.extend(extra);
        let o = lorakit(&args, &[]);
        let all = text(&o);
        assert!(!o.status.success() && all.contains(says), "{args:?}: {all}");
        assert!(!all.contains("panicked"), "{all}");
    }
}

#[test]
fn ctrl_c_keeps_finished_captions_and_a_rerun_does_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d, &["1.png", "2.png", "3.png"]);
    let pid: Arc<Mutex<Option<u32>>> = Arc::default();
    let target = pid.clone();
    let posts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = FakeEndpoint::start(move |req, _| {
        if req.method == "GET" {
            return FakeReply::raw(404, "no model list");
        }
        if posts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            // Ctrl-C while the first image is in flight.
            let p = target.lock().unwrap().expect("pid");
            Command::new("kill")
                .args(["-INT", &p.to_string()])
                .status()
                .unwrap();
            return FakeReply::content("solo, first").after(Duration::from_millis(500));
        }
        FakeReply::content("solo, later")
    });
    let url = server.url();
    let args = [
        "caption",
        "auto",
        d.to_str().unwrap(),
        "--endpoint",
        &url,
        "--model",
        "m",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_lorakit"));
    child
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // The handler waits on this lock until the pid is known.
    let mut guard = pid.lock().unwrap();
    let child = child.spawn().unwrap();
    *guard = Some(child.id());
    drop(guard);
    let o = child.wait_with_output().unwrap();
    let all = text(&o);
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(
        all.contains("stopping") && all.contains("run the same command again"),
        "{all}"
    );
    assert_eq!(read(d, "1.txt").as_deref(), Some("solo, first\n"));
    assert_eq!((read(d, "2.txt"), read(d, "3.txt")), (None, None));
    assert_eq!(captions_asked(&server), 1);

    let o = lorakit(&args, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(read(d, "1.txt").as_deref(), Some("solo, first\n"));
    assert_eq!(read(d, "3.txt").as_deref(), Some("solo, later\n"));
}
