//! `auto_caption` against a fake OpenAI-compatible endpoint in this process:
//! the exact captions written from messy replies, the skipped and failed
//! files, retries, the stop flag, and that nothing else in the folder changes.

use lora_data::autocaption::fake::{FakeEndpoint, FakeReply, FakeRequest};
use lora_data::autocaption::{
    auto_caption, AutoCaptionOptions, AutoCaptionReport, CaptionEvent, Endpoint, EndpointSettings,
    Outcome,
};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TRIGGER: &str = "myakumyaku-san";

fn png(dir: &Path, name: &str, w: u32, h: u32) {
    image::RgbImage::from_pixel(w, h, image::Rgb([90, 140, 200]))
        .save(dir.join(name))
        .unwrap();
}

/// Every file of the folder and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn endpoint(server: &FakeEndpoint, timeout_ms: u64, retries: u32) -> Endpoint {
    Endpoint::new(
        &server.url(),
        EndpointSettings {
            model: Some("fake-vl".into()),
            timeout: Duration::from_millis(timeout_ms),
            retries,
            backoff: Duration::from_millis(10),
        },
    )
    .unwrap()
}

fn run(dir: &Path, e: &Endpoint, opts: &AutoCaptionOptions) -> AutoCaptionReport {
    auto_caption(dir, e, opts, &AtomicBool::new(false), &|_| {}).unwrap()
}

fn outcome<'a>(report: &'a AutoCaptionReport, rel: &str) -> &'a Outcome {
    &report.images.iter().find(|r| r.rel == rel).unwrap().outcome
}

fn caption(report: &AutoCaptionReport, rel: &str) -> String {
    match outcome(report, rel) {
        Outcome::Captioned { caption, .. } => caption.clone(),
        o => panic!("{rel}: {o:?}"),
    }
}

fn failure(report: &AutoCaptionReport, rel: &str) -> String {
    match outcome(report, rel) {
        Outcome::Failed(why) => why.clone(),
        o => panic!("{rel}: {o:?}"),
    }
}

fn width(req: &FakeRequest) -> u32 {
    req.image().map_or(0, |i| i.width())
}

#[test]
fn messy_replies_become_exact_captions_and_failures_are_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, name) in ["a", "b", "c", "d", "e", "f", "g", "i", "j"]
        .iter()
        .enumerate()
    {
        png(d, &format!("{name}.png"), 40 + i as u32, 30);
    }
    std::fs::write(d.join("g.txt"), "keep me\n").unwrap();
    std::fs::write(d.join("h.png"), b"not a png at all").unwrap();
    // A valid header over cut-off pixel data: only a full decode finds it.
    png(d, "k.png", 400, 300);
    let whole = std::fs::read(d.join("k.png")).unwrap();
    std::fs::write(d.join("k.png"), &whole[..whole.len() / 2]).unwrap();
    std::fs::write(d.join("notes.md"), "my notes").unwrap();
    let before = snapshot(d);

    // Replies by image width (40 = a.png, 41 = b.png, …); attempts counted per image.
    let attempts: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    let seen = attempts.clone();
    let server = FakeEndpoint::start(move |req, _| {
        let w = width(req);
        let n = {
            let mut a = seen.lock().unwrap();
            let n = a.entry(w).or_default();
            *n += 1;
            *n
        };
        match (w, n) {
            (40, _) => FakeReply::content(
                "Here are the tags:\n\n- 1girl\n- **solo**\n- Smile\n- smile\n- orange_body\n- blue hat\n",
            ),
            (41, _) => FakeReply::content(
                "```\nred body, blue skin, multiple eyes, sitting, indoors, office, desk, laptop, office chair, photo\n```",
            ),
            (42, _) => FakeReply::content("I'm sorry, but I can't help with that image."),
            (43, _) => FakeReply::raw(200, "<html>upstream hiccup</html>"),
            (44, 1) => FakeReply::raw(500, r#"{"error":{"message":"model loading"}}"#),
            (44, _) => FakeReply::content("no humans, sky"),
            (45, _) => FakeReply::content("too late").after(Duration::from_millis(1500)),
            (47, _) => FakeReply::content("<think>the trigger is mid-list</think>myakumyaku-san, Standing, beach"),
            (48, 1) => FakeReply::raw(429, "slow down").with_header("Retry-After", "0"),
            (48, _) => FakeReply::content("night."),
            _ => FakeReply::raw(400, "unexpected image"),
        }
    });
    let opts = AutoCaptionOptions {
        trigger: Some(TRIGGER.into()),
        remove: vec![
            "orange body".into(),
            "red body".into(),
            "blue skin".into(),
            "multiple eyes".into(),
        ],
        concurrency: 3,
        ..Default::default()
    };
    let report = run(d, &endpoint(&server, 700, 1), &opts);

    let want = [
        ("a.png", "myakumyaku-san, 1girl, solo, smile, blue hat"),
        (
            "b.png",
            "myakumyaku-san, sitting, indoors, office, desk, laptop, office chair, photo",
        ),
        ("e.png", "myakumyaku-san, no humans, sky"),
        ("i.png", "myakumyaku-san, standing, beach"),
        ("j.png", "myakumyaku-san, night"),
    ];
    for (rel, text) in want {
        assert_eq!(caption(&report, rel), text, "{rel}");
    }
    assert!(failure(&report, "c.png").contains("refused"));
    assert!(failure(&report, "d.png").contains("not JSON"));
    let timeout = failure(&report, "f.png");
    assert!(
        timeout.contains("timed out") && timeout.contains("2 attempts"),
        "{timeout}"
    );
    assert!(failure(&report, "h.png").contains("not a PNG, JPEG, WebP or BMP image"));
    let cut = failure(&report, "k.png");
    assert!(cut.contains("k.png"), "{cut}");
    assert_eq!(outcome(&report, "g.png"), &Outcome::Skipped);
    assert_eq!(
        (
            report.captioned(),
            report.failed(),
            report.skipped(),
            report.not_started()
        ),
        (5, 5, 1, 0)
    );
    assert!(!report.interrupted && report.aborted.is_none());

    // The folder: exactly the five new captions, every other file as it was.
    let mut expect = before.clone();
    for (rel, text) in want {
        expect.insert(
            rel.replace(".png", ".txt"),
            format!("{text}\n").into_bytes(),
        );
    }
    assert_eq!(snapshot(d), expect);

    // Requests: the skipped and the unreadable image were never sent; each
    // request names the model and carries the instruction with the removals.
    let reqs = server.requests();
    assert!(reqs.iter().all(|r| ![0, 46, 400].contains(&width(r))));
    let sent = attempts.lock().unwrap().clone();
    assert_eq!(
        (sent[&44], sent[&45], sent[&48], sent[&40]),
        (2, 2, 2, 1),
        "{sent:?}"
    );
    for r in &reqs {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/chat/completions")
        );
        assert_eq!(r.model().as_deref(), Some("fake-vl"));
        let text = r.text().unwrap();
        assert!(text.contains("Danbooru-style tags"), "{text}");
        assert!(text
            .contains("Do not use these words: orange body, red body, blue skin, multiple eyes"));
    }
}

#[test]
fn images_are_sent_shrunk_with_the_key_which_never_appears_in_a_report() {
    let dir = tempfile::tempdir().unwrap();
    png(dir.path(), "big.png", 300, 200);
    png(dir.path(), "small.png", 60, 40);
    std::env::set_var("LORAKIT_TEST_CAPTION_KEY", "sk-test-4f9e");
    let server = FakeEndpoint::start(|req, _| match width(req) {
        150 => FakeReply::content("large"),
        _ => FakeReply::raw(500, "internal error"),
    });
    let e = endpoint(&server, 2000, 0)
        .with_api_key_env("LORAKIT_TEST_CAPTION_KEY")
        .unwrap();
    let opts = AutoCaptionOptions {
        max_side: 150,
        ..Default::default()
    };
    let report = run(dir.path(), &e, &opts);
    let sizes: Vec<(u32, u32)> = server
        .requests()
        .iter()
        .map(|r| r.image().map(|i| i.dimensions()).unwrap())
        .collect();
    assert!(
        sizes.contains(&(150, 100)) && sizes.contains(&(60, 40)),
        "{sizes:?}"
    );
    for r in server.requests() {
        assert_eq!(r.header("authorization"), Some("Bearer sk-test-4f9e"));
    }
    assert_eq!(caption(&report, "big.png"), "large");
    assert!(failure(&report, "small.png").contains("HTTP 500"));
    assert!(!format!("{report:?}{e:?}").contains("sk-test-4f9e"));

    // A refused key stops the run at once, with what to do.
    let refusing = FakeEndpoint::start(|_, _| FakeReply::raw(401, "bad key"));
    let report = run(
        dir.path(),
        &endpoint(&refusing, 2000, 3),
        &AutoCaptionOptions {
            overwrite: true,
            ..Default::default()
        },
    );
    let why = report.aborted.clone().unwrap();
    assert!(
        why.contains("401") && why.contains("--api-key-env"),
        "{why}"
    );
    assert_eq!((report.failed(), report.not_started()), (1, 1));
    assert_eq!(refusing.requests().len(), 1, "a 401 is not retried");

    // A redirect is not followed: the key goes to the address given, only.
    let elsewhere = FakeEndpoint::start(|_, _| FakeReply::content("stolen"));
    let target = format!("{}/chat/completions", elsewhere.url());
    let redirecting =
        FakeEndpoint::start(move |_, _| FakeReply::raw(307, "").with_header("Location", &target));
    let keyed = endpoint(&redirecting, 2000, 3)
        .with_api_key_env("LORAKIT_TEST_CAPTION_KEY")
        .unwrap();
    let overwrite = AutoCaptionOptions {
        overwrite: true,
        ..Default::default()
    };
    let report = run(dir.path(), &keyed, &overwrite);
    let why = report.aborted.clone().unwrap();
    assert!(
        why.contains("redirects") && why.contains(&elsewhere.url()),
        "{why}"
    );
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");
    assert_eq!(redirecting.requests().len(), 1, "a redirect is not retried");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("big.txt")).unwrap(),
        "large\n"
    );
}

#[test]
fn without_a_model_name_the_endpoint_s_first_model_is_used() {
    let server = FakeEndpoint::start(|req, _| match req.path.as_str() {
        "/v1/models" => FakeReply::raw(
            200,
            r#"{"object":"list","data":[{"id":"qwen2.5-vl-7b-instruct-q4_k_m.gguf"}]}"#,
        ),
        _ => FakeReply::content("solo"),
    });
    let mut e = Endpoint::new(&server.url(), EndpointSettings::default()).unwrap();
    assert_eq!(
        e.resolve_model().unwrap(),
        "qwen2.5-vl-7b-instruct-q4_k_m.gguf"
    );
    let dir = tempfile::tempdir().unwrap();
    png(dir.path(), "a.png", 32, 32);
    run(dir.path(), &e, &AutoCaptionOptions::default());
    let reqs = server.requests();
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(
        reqs[1].model().as_deref(),
        Some("qwen2.5-vl-7b-instruct-q4_k_m.gguf")
    );
}

#[test]
fn existing_captions_are_kept_unless_overwrite_and_a_dry_run_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png", 32, 32);
    png(d, "b.png", 32, 32);
    std::fs::write(d.join("a.txt"), "old, tags\r\nmy note\r\n").unwrap();
    let server = FakeEndpoint::start(|_, _| FakeReply::content("new, tags"));
    let e = endpoint(&server, 2000, 0);
    let before = snapshot(d);

    let dry = |overwrite| AutoCaptionOptions {
        dry_run: true,
        overwrite,
        ..Default::default()
    };
    let report = run(d, &e, &dry(false));
    assert!(report.dry_run);
    assert_eq!(outcome(&report, "a.png"), &Outcome::Skipped);
    assert_eq!(caption(&report, "b.png"), "new, tags");
    let report = run(d, &e, &dry(true));
    assert_eq!(caption(&report, "a.png"), "new, tags");
    assert_eq!(snapshot(d), before, "a dry run writes nothing");

    run(d, &e, &AutoCaptionOptions::default());
    assert_eq!(std::fs::read(d.join("a.txt")).unwrap(), before["a.txt"]);
    assert_eq!(
        std::fs::read_to_string(d.join("b.txt")).unwrap(),
        "new, tags\n"
    );
    run(
        d,
        &e,
        &AutoCaptionOptions {
            overwrite: true,
            ..Default::default()
        },
    );
    // The first line is replaced; a note on later lines stays.
    assert_eq!(
        std::fs::read_to_string(d.join("a.txt")).unwrap(),
        "new, tags\r\nmy note\r\n"
    );
}

#[test]
fn the_model_names_the_character_s_own_tags_and_only_those_go() {
    let dir = tempfile::tempdir().unwrap();
    png(dir.path(), "a.png", 32, 32);
    let server = FakeEndpoint::start(|req, _| match req.image() {
        Some(_) => FakeReply::content("sitting, orange body, round body, blue hat, office, photo"),
        // The follow-up is text only; "eyes" is not one of the image's tags.
        None => FakeReply::content("orange body, Round_Body, blue hat, eyes"),
    });
    let character = "Myaku-Myaku: a round orange body with a blue hat and many eyes";
    let report = run(
        dir.path(),
        &endpoint(&server, 2000, 0),
        &AutoCaptionOptions {
            trigger: Some(TRIGGER.into()),
            character: Some(character.into()),
            ..Default::default()
        },
    );
    assert_eq!(
        outcome(&report, "a.png"),
        &Outcome::Captioned {
            caption: "myakumyaku-san, sitting, office, photo".into(),
            character_tags: vec!["orange body".into(), "round body".into(), "blue hat".into()],
        }
    );
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    let question = reqs[1].text().unwrap();
    assert!(question.contains(character), "{question}");
    assert!(question.contains("sitting, orange body, round body, blue hat, office, photo"));
}

#[test]
fn a_stop_lets_the_image_in_flight_finish_and_starts_no_more() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["1.png", "2.png", "3.png", "4.png"] {
        png(dir.path(), name, 32, 32);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let server = FakeEndpoint::start(move |_, n| {
        if n == 1 {
            flag.store(true, Ordering::SeqCst);
        }
        FakeReply::content("solo")
    });
    let done = Mutex::new(Vec::new());
    let report = auto_caption(
        dir.path(),
        &endpoint(&server, 2000, 0),
        &AutoCaptionOptions::default(),
        &stop,
        &|e| {
            if let CaptionEvent::Done(r) = e {
                done.lock().unwrap().push(r.rel.clone())
            }
        },
    )
    .unwrap();
    assert!(report.interrupted);
    assert_eq!((report.captioned(), report.not_started()), (2, 2));
    assert_eq!(server.requests().len(), 2);
    assert_eq!(*done.lock().unwrap(), ["1.png", "2.png"]);
    let mut files: Vec<String> = snapshot(dir.path()).into_keys().collect();
    files.sort();
    assert_eq!(
        files,
        ["1.png", "1.txt", "2.png", "2.txt", "3.png", "4.png"]
    );
}

#[test]
fn a_wrong_path_aborts_the_run_after_one_request() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["1.png", "2.png", "3.png"] {
        png(dir.path(), name, 32, 32);
    }
    let server = FakeEndpoint::start(|_, _| FakeReply::raw(404, "not found"));
    let report = run(
        dir.path(),
        &endpoint(&server, 2000, 2),
        &AutoCaptionOptions::default(),
    );
    let why = report.aborted.clone().unwrap();
    assert!(why.contains("404") && why.contains("/v1"), "{why}");
    assert_eq!((report.failed(), report.not_started()), (1, 2));
    assert_eq!(server.requests().len(), 1);
}
