//! The Datasets API, auto-captioning, and nothing outside the root.

use super::*;

#[test]
fn datasets_images_and_captions_round_trip() {
    let s = start(true, 1 << 20);
    let ds = s.root.join("datasets/chars");
    assert_eq!(create_dataset(s.port, "chars"), 201);
    assert_eq!(create_dataset(s.port, "chars"), 409);
    let png = png_bytes(96, 64);
    // An upload name with a path in it lands, sanitised, in the dataset.
    let (status, _, body) = http(
        s.port,
        "PUT",
        "/api/datasets/chars/images/..%2F..%2Fa%20b.png",
        &[AUTH],
        &png,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["file"], "a_b.png");
    assert_eq!(std::fs::read(ds.join("a_b.png")).unwrap(), png);
    assert_eq!(
        http(
            s.port,
            "PUT",
            "/api/datasets/chars/images/a_b.png",
            &[AUTH],
            &png
        )
        .0,
        409,
        "never replaced"
    );
    assert_eq!(
        http(
            s.port,
            "PUT",
            "/api/datasets/chars/images/x.sh",
            &[AUTH],
            &png
        )
        .0,
        400
    );
    assert_eq!(
        http(
            s.port,
            "PUT",
            "/api/datasets/chars/images/fake.png",
            &[AUTH],
            b"GIF89a-not"
        )
        .0,
        422
    );
    assert!(!ds.join("fake.png").exists() && !ds.join("x.sh").exists());

    let (_, _, body) = http(
        s.port,
        "GET",
        "/api/datasets/chars/images/a_b.png",
        &[],
        b"",
    );
    assert_eq!(body, png);
    let caption = br#"{"caption":" 1girl,  smile ,, beach\n"}"#;
    let (status, _, body) = http(
        s.port,
        "PUT",
        "/api/datasets/chars/captions/a_b.png",
        &[JSON_CT, AUTH],
        caption,
    );
    assert_eq!(status, 200);
    assert_eq!(json(&body)["caption"], "1girl, smile, beach");
    assert_eq!(
        std::fs::read_to_string(ds.join("a_b.txt")).unwrap(),
        "1girl, smile, beach\n"
    );

    let edit = br#"{"op":"add_trigger","word":"myakumyaku-san"}"#;
    let (_, _, body) = http(
        s.port,
        "POST",
        "/api/datasets/chars/edit?dry_run=true",
        &[JSON_CT, AUTH],
        edit,
    );
    assert_eq!(
        json(&body)["changes"][0]["after"],
        "myakumyaku-san, 1girl, smile, beach"
    );
    assert_eq!(
        std::fs::read_to_string(ds.join("a_b.txt")).unwrap(),
        "1girl, smile, beach\n"
    );
    http(
        s.port,
        "POST",
        "/api/datasets/chars/edit",
        &[JSON_CT, AUTH],
        edit,
    );
    assert_eq!(
        std::fs::read_to_string(ds.join("a_b.txt")).unwrap(),
        "myakumyaku-san, 1girl, smile, beach\n"
    );

    let (_, _, body) = http(s.port, "GET", "/api/datasets/chars", &[], b"");
    let d = json(&body);
    assert_eq!(d["images"][0]["file"], "a_b.png");
    assert_eq!(
        d["images"][0]["caption"],
        "myakumyaku-san, 1girl, smile, beach"
    );
    let (_, _, body) = http(
        s.port,
        "GET",
        "/api/datasets/chars/check?trigger=myakumyaku-san&resolution=512",
        &[],
        b"",
    );
    let c = json(&body);
    assert!(c["report"].as_str().unwrap().contains("1 image"), "{c}");
    assert!(
        c["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("upscal"),
        "{c}"
    );
    let (_, _, body) = http(s.port, "GET", "/api/datasets", &[], b"");
    assert_eq!(
        json(&body),
        serde_json::json!([{"name": "chars", "images": 1, "captioned": 1}])
    );
}

#[test]
fn nothing_outside_the_root_is_read_or_written() {
    let s = start(true, 4096);
    let outside = s.root.parent().unwrap().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.png"), png_bytes(8, 8)).unwrap();
    std::fs::write(outside.join("secret.txt"), "keep").unwrap();
    let ds = s.root.join("datasets");
    std::os::unix::fs::symlink(&outside, ds.join("link")).unwrap();
    std::fs::create_dir(ds.join("real")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.png"), ds.join("real/secret.png")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), ds.join("real/cap.txt")).unwrap();
    std::fs::write(ds.join("real/cap.png"), png_bytes(8, 8)).unwrap();

    for path in [
        "/api/datasets/link",
        "/api/datasets/link/images/secret.png",
        "/api/datasets/..",
        "/api/datasets/%2e%2e/images/x.png",
        "/api/datasets/real/images/secret.png",
        "/api/datasets/real/images/..%2F..%2F..%2Foutside%2Fsecret.png",
    ] {
        let (status, _, body) = http(s.port, "GET", path, &[], b"");
        assert!((400..500).contains(&status), "{path}: {status}");
        assert_ne!(body, png_bytes(8, 8), "{path}");
    }
    // The dataset page shows neither the linked image nor the linked
    // caption's text (issue 26: it showed the outside file's text).
    let (status, _, body) = http(s.port, "GET", "/api/datasets/real", &[], b"");
    assert_eq!(status, 200);
    let page = json(&body);
    assert!(!page.to_string().contains("keep"), "{page}");
    let files: Vec<&str> = (page["images"].as_array().unwrap().iter())
        .map(|i| i["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["cap.png"], "{page}");
    let problems = page["images"][0]["problems"].to_string();
    assert!(problems.contains("link out of the UI's root"), "{problems}");
    let cap = br#"{"caption":"pwned"}"#;
    for path in [
        "/api/datasets/link/captions/secret.png",
        "/api/datasets/real/captions/cap.png", // cap.txt is a symlink out
        "/api/datasets/real/captions/secret.png",
    ] {
        let (status, _, _) = http(s.port, "PUT", path, &[JSON_CT, AUTH], cap);
        assert!((400..500).contains(&status), "{path}: {status}");
    }
    assert_eq!(create_dataset(s.port, "../escape"), 400);
    assert_eq!(
        http(
            s.port,
            "PUT",
            "/api/datasets/link/images/new.png",
            &[AUTH],
            &png_bytes(8, 8)
        )
        .0,
        400
    );
    // Uploads over the limit are refused before they are written.
    let big = vec![0u8; 8192];
    assert_eq!(
        http(
            s.port,
            "PUT",
            "/api/datasets/real/images/big.png",
            &[AUTH],
            &big
        )
        .0,
        413
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).unwrap(),
        "keep"
    );
    let mut names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["secret.png", "secret.txt"]);
    assert!(!s.root.parent().unwrap().join("escape").exists());
}

#[test]
fn a_dataset_is_auto_captioned_through_a_configured_endpoint_only() {
    use lora_data::autocaption::fake::{FakeEndpoint, FakeReply};
    let fake = FakeEndpoint::start(|req, _| match req.path.as_str() {
        "/v1/models" => FakeReply::raw(200, r#"{"data":[{"id":"vl"}]}"#),
        _ => FakeReply::content("- blue skin\n- sitting\n- office"),
    });
    // the key comes from the UI's environment at start-up, for this endpoint
    let env = |v: &str| (v == "LORAKIT_UI_TEST_KEY").then(|| "sk-ui-5150".to_string());
    let configured = vec![(fake.url(), Some("LORAKIT_UI_TEST_KEY".to_string()))];
    let endpoints = endpoints::CaptionEndpoints::new(configured, env).unwrap();
    let s = start_with(true, true, TOKEN, endpoints, 1 << 20);
    let ds = s.root.join("datasets/chars");
    std::fs::create_dir_all(&ds).unwrap();
    std::fs::write(ds.join("a.png"), png_bytes(40, 30)).unwrap();
    std::fs::write(ds.join("b.png"), png_bytes(41, 30)).unwrap();
    std::fs::write(ds.join("b.txt"), "kept\n").unwrap();
    // a kohya repeat folder's image is captioned too (issue 26, item 11)
    std::fs::create_dir(ds.join("10_char")).unwrap();
    std::fs::write(ds.join("10_char/c.png"), png_bytes(42, 30)).unwrap();
    let post = |body: serde_json::Value| {
        let (status, _, b) = http(
            s.port,
            "POST",
            "/api/datasets/chars/autocaption",
            &[JSON_CT],
            body.to_string().as_bytes(),
        );
        (status, String::from_utf8_lossy(&b).into_owned())
    };

    // The page lists the endpoints: id, URL, the variable's name, no key.
    let (_, _, b) = http(s.port, "GET", "/api/caption-endpoints", &[], b"");
    let listed = json(&b);
    assert_eq!(listed[0]["id"], "1");
    assert_eq!(listed[0]["url"], fake.url());
    assert!(!listed.to_string().contains("sk-ui-5150"), "{listed}");

    // A request can name neither a variable nor another address (issue 26:
    // `{"endpoint": "http://127.0.0.1:9999/v1", "api_key_env": "HOME"}` sent
    // $HOME as a bearer token to the listener on 9999).
    let thief = FakeEndpoint::start(|_, _| FakeReply::raw(200, "{}"));
    let (status, b) = post(serde_json::json!({"endpoint": "1", "api_key_env": "HOME"}));
    assert_eq!(status, 422, "{b}");
    assert!(b.contains("api_key_env"), "{b}");
    let (status, b) = post(serde_json::json!({"endpoint": thief.url()}));
    assert_eq!(status, 422, "{b}");
    assert!(b.contains("no configured endpoint"), "{b}");
    assert!(!b.contains("/root") && !b.contains("HOME"), "{b}");
    assert!(thief.requests().is_empty());
    assert!(fake.requests().is_empty());

    let body = serde_json::json!({"endpoint": "1",
        "trigger": "myakumyaku-san", "remove": ["blue skin"]});
    let (status, b) = post(body);
    assert_eq!(status, 202, "{b}");
    let t0 = std::time::Instant::now();
    let st = loop {
        let (_, _, b) = http(s.port, "GET", "/api/datasets/chars/autocaption", &[], b"");
        let st = json(&b);
        if st["state"] == "finished" {
            break st;
        }
        assert!(t0.elapsed().as_secs() < 30, "{st}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(st["error"], serde_json::Value::Null, "{st}");
    assert_eq!(
        (st["total"].as_u64(), st["done"].as_u64()),
        (Some(3), Some(3)),
        "{st}"
    );
    for txt in ["a.txt", "10_char/c.txt"] {
        assert_eq!(
            std::fs::read_to_string(ds.join(txt)).unwrap(),
            "myakumyaku-san, sitting, office\n"
        );
    }
    assert_eq!(std::fs::read_to_string(ds.join("b.txt")).unwrap(), "kept\n");
    let posts: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[0].header("authorization"), Some("Bearer sk-ui-5150"));
    assert_eq!(posts[0].model().as_deref(), Some("vl"));
    assert!(!st.to_string().contains("sk-ui-5150"));
    assert!(thief.requests().is_empty());
}

#[test]
fn a_decompression_bomb_upload_is_refused_by_name_and_not_kept() {
    let s = start(true, 1 << 20);
    assert_eq!(create_dataset(s.port, "chars"), 201);
    // issue 26: a 13376² 16-bit RGBA PNG (1.3 GiB decoded) passed the upload
    let bomb = lora_data::synthetic::bomb_png(13_376, 13_376);
    let (status, _, body) = http(
        s.port,
        "PUT",
        "/api/datasets/chars/images/bomb.png",
        &[],
        &bomb,
    );
    assert_eq!(status, 422);
    let why = json(&body)["error"].as_str().unwrap().to_string();
    assert!(
        why.contains("bomb.png") && why.contains("not decoded"),
        "{why}"
    );
    assert!(!s.root.join("datasets/chars/bomb.png").exists());
}

#[test]
fn a_second_view_of_a_dataset_reads_no_image() {
    let s = start(true, 1 << 20);
    let ds = s.root.join("datasets/chars");
    std::fs::create_dir_all(&ds).unwrap();
    std::fs::write(ds.join("a.png"), png_bytes(40, 30)).unwrap();
    std::fs::write(ds.join("b.png"), png_bytes(41, 30)).unwrap();
    let (_, _, b) = http(s.port, "GET", "/api/datasets", &[], b"");
    assert_eq!(json(&b)[0]["images"], 2);
    assert!(s.root.join(".cache/datasets/chars.facts.json").is_file());
    // issue 26: every view read and hashed every image. Now the bytes may
    // change behind the same size and mtime without the page noticing:
    // it does not read them.
    let a = ds.join("a.png");
    let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
    std::fs::write(&a, vec![b'x'; png_bytes(40, 30).len()]).unwrap();
    let f = std::fs::File::options().write(true).open(&a).unwrap();
    f.set_modified(mtime).unwrap();
    let (_, _, b) = http(s.port, "GET", "/api/datasets/chars", &[], b"");
    let page = json(&b);
    assert_eq!(page["images"][0]["file"], "a.png", "{page}");
    assert_eq!(page["images"][0]["width"], 40, "{page}");
}

#[test]
fn a_kohya_repeat_folder_is_usable_from_the_page() {
    let s = start(true, 1 << 20);
    let ds = s.root.join("datasets/chars");
    std::fs::create_dir_all(ds.join("10_char")).unwrap();
    std::fs::create_dir_all(ds.join("2_empty")).unwrap();
    std::fs::create_dir_all(ds.join("not_repeats")).unwrap();
    std::fs::write(ds.join("b.png"), png_bytes(40, 30)).unwrap();
    std::fs::write(ds.join("10_char/a.png"), png_bytes(48, 32)).unwrap();
    std::fs::write(ds.join("10_char/a.txt"), "trig, sitting\n").unwrap();
    let get = |path: &str| http(s.port, "GET", path, &[AUTH], b"");

    // The page shows each folder with its repeats, and each image's folder.
    let (status, _, b) = get("/api/datasets/chars");
    assert_eq!(status, 200);
    let d = json(&b);
    assert_eq!(
        d["folders"],
        serde_json::json!([
            {"name": ".", "repeats": 1, "images": 1},
            {"name": "10_char", "repeats": 10, "images": 1},
            {"name": "2_empty", "repeats": 2, "images": 0},
        ]),
        "{d}"
    );
    let a = &d["images"][0];
    assert_eq!(
        (&a["file"], &a["folder"], &a["repeats"]),
        (&"10_char/a.png".into(), &"10_char".into(), &10.into())
    );
    assert_eq!(a["caption"], "trig, sitting");

    // issue 26: its images could not be viewed or captioned (400: `file_in` refused '/')
    let (status, _, bytes) = get("/api/datasets/chars/images/10_char%2Fa.png");
    assert_eq!(status, 200);
    assert_eq!(bytes, std::fs::read(ds.join("10_char/a.png")).unwrap());
    let body = serde_json::json!({"caption": "trig, standing"}).to_string();
    let put = |path: &str, body: &[u8]| http(s.port, "PUT", path, &[AUTH, JSON_CT], body).0;
    assert_eq!(
        put(
            "/api/datasets/chars/captions/10_char%2Fa.png",
            body.as_bytes()
        ),
        200
    );
    assert_eq!(
        std::fs::read_to_string(ds.join("10_char/a.txt")).unwrap(),
        "trig, standing\n"
    );
    assert!(
        !ds.join("a.txt").exists(),
        "the caption goes beside its image"
    );

    // Uploads go into a repeat folder, a new one is created; anything else is refused.
    let png = png_bytes(40, 40);
    assert_eq!(
        put("/api/datasets/chars/images/c.png?folder=10_char", &png),
        201
    );
    assert_eq!(std::fs::read(ds.join("10_char/c.png")).unwrap(), png);
    assert_eq!(
        put("/api/datasets/chars/images/d.png?folder=3_new", &png),
        201
    );
    assert!(ds.join("3_new/d.png").is_file());
    for bad in [
        "not_repeats",
        "0_zero",
        "..%2F10_char",
        "10_char%2Fx",
        ".hidden",
        "5_a%2F..%2F..%2F..%2Fx",
    ] {
        let path = format!("/api/datasets/chars/images/e.png?folder={bad}");
        assert_eq!(put(&path, &png), 400, "{bad}");
    }
    let (_, _, b) = get("/api/datasets/chars");
    let files: Vec<String> = (json(&b)["images"].as_array().unwrap().iter())
        .map(|i| i["file"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        files,
        ["10_char/a.png", "10_char/c.png", "3_new/d.png", "b.png"]
    );

    // Paths that leave the dataset stay refused.
    for bad in [
        "..%2Fchars%2Fb.png",
        "10_char%2F..%2Fb.png",
        "a%2Fb%2Fc.png",
        "%2Fetc%2Fpasswd",
    ] {
        let (status, _, _) = get(&format!("/api/datasets/chars/images/{bad}"));
        assert_eq!(status, 400, "{bad}");
    }
}

#[test]
fn request_bodies_are_limited_per_route() {
    // uploads may be as large as --max-upload-mb says (here 4 MiB) …
    let s = start(true, 4 << 20);
    assert_eq!(create_dataset(s.port, "chars"), 201);
    let mut png = png_bytes(64, 64);
    png.resize(2 << 20, 0); // trailing bytes after IEND: still a PNG
    let put = |path: &str, body: &[u8]| http(s.port, "PUT", path, &[AUTH, JSON_CT], body).0;
    assert_eq!(put("/api/datasets/chars/images/big.png", &png), 201);
    // … every other body is JSON of at most 256 KiB (issue 26: each route
    // took the upload limit, so a 64 MiB JSON body was read and parsed)
    let caption = "x".repeat(300 << 10);
    let body = serde_json::json!({ "caption": caption }).to_string();
    assert_eq!(
        put("/api/datasets/chars/captions/big.png", body.as_bytes()),
        413
    );
    let small = serde_json::json!({ "caption": "trig, sitting" }).to_string();
    assert_eq!(
        put("/api/datasets/chars/captions/big.png", small.as_bytes()),
        200
    );
}
