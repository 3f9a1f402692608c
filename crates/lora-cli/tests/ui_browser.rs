//! `lorakit ui` in a real headless Chromium (Debian's `chromium` +
//! `chromium-driver`, installed by `.ci/run` / `make test`), driven over
//! WebDriver: a dataset made by uploading the demo character's images (into a kohya repeat folder), a
//! caption edited, a job filled in on the form, started, run to the end
//! with its chart and two checkpoints, one downloaded and loaded as a LoRA;
//! a second job stopped and resumed with the page's buttons. Screenshots of
//! each page go to `target/ui-screens/`.

mod common;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// chromedriver on a free port, once it answers.
fn chromedriver() -> (Driver, String) {
    let exe = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromedriver is missing: install Debian's chromium and chromium-driver (scripts/setup-browser.sh does)");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(exe)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed().as_secs() < 30, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (Driver(child), format!("http://127.0.0.1:{port}"))
}

async fn browser(driver: &str) -> R<Client> {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    Ok(ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(driver)
        .await?)
}

fn screens() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/ui-screens");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn shot(c: &Client, name: &str) -> R {
    std::fs::write(screens().join(format!("{name}.png")), c.screenshot().await?)?;
    Ok(())
}

/// Waits until `css` matches an element whose text satisfies `ok` (the
/// pages re-render, so the element is found anew each time).
async fn wait_text(c: &Client, css: &str, secs: u64, ok: impl Fn(&str) -> bool) -> R<String> {
    let t0 = Instant::now();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if ok(&t) {
                    return Ok(t);
                }
            }
        }
        if t0.elapsed().as_secs() > secs {
            let page = c.source().await.unwrap_or_default();
            return Err(format!(
                "waited {secs} s for {css}; page: {}",
                &page[..page.len().min(3000)]
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs `act` on the element `css` matches, finding it again when the page
/// re-rendered in between (a live job page re-renders every 2 s).
async fn on<F, Fut>(c: &Client, css: &str, act: F) -> R
where
    F: Fn(fantoccini::elements::Element) -> Fut,
    Fut: std::future::Future<Output = Result<(), fantoccini::error::CmdError>>,
{
    let mut tries = 0;
    loop {
        let e = c.find(Locator::Css(css)).await?;
        match act(e).await {
            Err(fantoccini::error::CmdError::Standard(w))
                if w.error == fantoccini::error::ErrorStatus::StaleElementReference
                    && tries < 20 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return Ok(r?),
        }
    }
}

async fn fill(c: &Client, name: &str, value: &str) -> R {
    on(c, &format!("[name=\"{name}\"]"), |e| async move {
        e.clear().await?;
        e.send_keys(value).await
    })
    .await
}

async fn click(c: &Client, css: &str) -> R {
    on(c, css, |e| async move { e.click().await }).await
}

/// The New Job form filled for a small CPU run of `steps` steps.
async fn new_job(c: &Client, base: &str, name: &str, steps: u64) -> R {
    c.goto(&format!("{base}/#/jobs/new")).await?;
    c.wait().for_element(Locator::Id("job-form")).await?;
    for (field, value) in [
        ("name", name),
        ("job.trigger_word", "trig"),
        ("network.linear", "4"),
        ("network.conv", "2"),
        ("save.save_every", "3"),
        ("train.batch_size", "1"),
        ("train.gradient_accumulation", "1"),
        ("train.steps", &steps.to_string()),
        ("train.lr", "0.001"),
        ("datasets.resolution", "256"),
    ] {
        fill(c, field, value).await?;
    }
    for (field, value) in [
        ("dataset", "myaku"),
        ("job.device", "cpu"),
        ("train.dtype", "fp32"),
    ] {
        c.find(Locator::Css(&format!("select[name=\"{field}\"]")))
            .await?
            .select_by_value(value)
            .await?;
    }
    shot(c, "new-job").await?;
    click(c, "#job-form button[type=submit]").await?;
    wait_text(c, "h1", 20, |t| t.starts_with(name)).await?;
    Ok(())
}

/// Without the token the browser gets the sign-in page; the printed link
/// signs it in and leaves the address without the token.
async fn sign_in(c: &Client, ui: &UiProcess) -> R {
    c.goto(&format!("{}/#/datasets", ui.base)).await?;
    let text = c.find(Locator::Css("body")).await?.text().await?;
    assert!(text.contains("Open the link"), "{text}");
    shot(c, "sign-in").await?;
    c.goto(&ui.link).await?;
    let url = c.current_url().await?;
    assert!(!url.as_str().contains("token"), "{url}");
    wait_text(c, "h1", 10, |t| t == "Datasets").await?;
    Ok(())
}

async fn walkthrough(c: &Client, base: &str, root: &Path, images: &[PathBuf]) -> R {
    // Datasets: New Dataset, Add Images, edit a caption.
    c.goto(&format!("{base}/#/datasets")).await?;
    c.wait()
        .for_element(Locator::Id("new-dataset-name"))
        .await?
        .send_keys("myaku")
        .await?;
    click(c, "#new-dataset button").await?;
    let files = c.wait().for_element(Locator::Id("files")).await?;
    let list: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
    files.send_keys(&list.join("\n")).await?;
    // into a new kohya repeat folder, as kohya users lay datasets out
    let folder = c.find(Locator::Id("upload-new-folder")).await?;
    folder.send_keys("3_myaku").await?;
    click(c, "#upload button").await?;
    let t0 = Instant::now();
    while c.find_all(Locator::Css(".card img")).await?.len() < images.len() {
        assert!(
            t0.elapsed().as_secs() < 30,
            "the uploaded images did not appear"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_text(c, "h2.folder", 10, |t| {
        t == "3_myaku · 3 repeats · 3 image(s)"
    })
    .await?;
    let ta = c.find(Locator::Css(".card textarea")).await?;
    ta.clear().await?;
    ta.send_keys("trig, sitting, edited in the browser").await?;
    click(c, "h1").await?; // blur saves
    wait_text(c, ".card .saved", 10, |t| t == "saved").await?;
    let first = images[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace(".png", ".txt");
    assert_eq!(
        std::fs::read_to_string(root.join("datasets/myaku/3_myaku").join(first))?,
        "trig, sitting, edited in the browser\n"
    );
    shot(c, "dataset").await?;

    // dataset check: the report, and each problem beside its image (256 px images at 512 are upscaled).
    click(c, "#check").await?;
    wait_text(c, "#check-out pre", 30, |t| t.contains("image")).await?;
    wait_text(c, ".card .check-problem", 10, |t| t.contains("upscal")).await?;

    // Auto-caption the rest with a vision model (a fake endpoint in this
    // test process, configured with --caption-endpoint: the only choice).
    click(c, "#autocaption summary").await?;
    fill(c, "trigger", "trig").await?;
    fill(c, "remove", "orange body").await?;
    click(c, "#autocaption-form button[type=submit]").await?;
    wait_text(c, "#autocaption-out p", 30, |t| {
        t.starts_with("finished: 3 / 3")
    })
    .await?;
    shot(c, "autocaption").await?;
    let captions: Vec<String> = images
        .iter()
        .map(|p| {
            let txt = p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace(".png", ".txt");
            std::fs::read_to_string(root.join("datasets/myaku/3_myaku").join(txt))
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        captions[0], "trig, sitting, edited in the browser\n",
        "an existing caption is kept"
    );
    for c in &captions[1..] {
        assert_eq!(c, "trig, standing, pink background\n");
    }

    // A value the trainer refuses: the error shows beside its field.
    c.goto(&format!("{base}/#/jobs/new")).await?;
    c.wait().for_element(Locator::Id("job-form")).await?;
    fill(c, "name", "refused").await?;
    fill(c, "network.linear", "0").await?;
    click(c, "#job-form button[type=submit]").await?;
    let sel = ".field[data-field=\"network.linear\"] .field-error";
    wait_text(c, sel, 10, |t| t.starts_with("network.linear:")).await?;
    shot(c, "new-job-error").await?;
    assert!(!root.join("jobs/refused").exists());

    // A job from the form, started, run to the end.
    new_job(c, base, "browser", 6).await?;
    // the alphas followed the ranks typed (issue 27: rank 32 kept alpha 16,
    // scale 0.5); the form's fields came from the trainer's table
    let job = lora_sdxl::JobConfig::load(&root.join("jobs/browser/job.toml"))?;
    assert_eq!((job.network.linear, job.network.linear_alpha), (4, 4.0));
    assert_eq!((job.network.conv, job.network.conv_alpha), (2, 2.0));
    click(c, "button[data-act=start]").await?;
    wait_text(c, "h1 .state", 240, |t| t == "done" || t == "failed").await?;
    assert_eq!(
        c.find(Locator::Css("h1 .state")).await?.text().await?,
        "done"
    );
    assert!(
        !c.find_all(Locator::Css("svg.chart polyline.val"))
            .await?
            .is_empty(),
        "the chart shows the validation loss"
    );
    let links = c.find_all(Locator::Css("a[download]")).await?;
    assert_eq!(links.len(), 2, "two checkpoints: step 3 and the final file");
    shot(c, "job-done").await?;
    let href = links[0].attr("href").await?.unwrap();
    let mut resp = (agent().get(&format!("{base}{href}")))
        .header("X-Lorakit-Token", TOKEN)
        .call()?;
    let bytes = resp.body_mut().with_config().limit(1 << 30).read_to_vec()?;
    let got = root.join("downloaded.safetensors");
    std::fs::write(&got, bytes)?;
    let lora = lora_core::formats::load_lora(&got, lora_core::formats::UnknownKeys::Reject)?;
    assert!(!lora.set.is_empty());

    // Compare the two checkpoints on a grid, enlarge a cell, mark the one, export it.
    fill(c, "steps", "2").await?;
    fill(c, "size", "64").await?;
    click(c, "#compare-settings button[type=submit]").await?;
    let t0 = Instant::now();
    while c.find_all(Locator::Css("img.cell")).await?.len() < 4 {
        assert!(t0.elapsed().as_secs() < 180, "the grid did not appear");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    click(c, "img.cell").await?;
    let params = wait_text(c, "#enlarged pre.params", 10, |t| t.contains("Seed: 42")).await?;
    assert!(params.contains(":0.8>"), "{params}");
    shot(c, "compare-enlarged").await?;
    click(c, "#close-enlarged").await?;
    click(c, "button.pick").await?;
    // "Mark as the one" becomes "★ the one" once the page re-rendered
    // (waiting for "the one" alone raced the re-render)
    wait_text(c, "button.pick", 10, |t| t.contains('★')).await?;
    click(c, "#export").await?;
    wait_text(c, "#toast", 10, |t| t.contains("exported")).await?;
    shot(c, "compare").await?;
    let exported = std::fs::read(root.join("loras/browser.safetensors"))?;
    assert_eq!(
        exported,
        std::fs::read(root.join("jobs/browser/output/browser/browser_000000003.safetensors"))?
    );

    // A second job: stopped and resumed with the buttons.
    new_job(c, base, "browser-long", 5000).await?;
    click(c, "button[data-act=start]").await?;
    wait_text(c, ".progress b", 120, |t| {
        t.parse::<u64>().is_ok_and(|s| s >= 2)
    })
    .await?;
    click(c, "button[data-act=stop]").await?;
    wait_text(c, "h1 .state", 60, |t| t == "stopped").await?;
    shot(c, "job-stopped").await?;
    click(c, "button[data-act=resume]").await?;
    wait_text(c, "h1 .state", 60, |t| t == "running").await?;
    click(c, "button[data-act=stop]").await?;
    wait_text(c, "h1 .state", 60, |t| t == "stopped").await?;
    c.goto(&format!("{base}/#/jobs")).await?;
    wait_text(c, "table", 10, |t| t.contains("browser-long")).await?;
    shot(c, "jobs").await?;
    Ok(())
}

#[test]
fn the_walkthrough_in_a_real_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let _runs = setup(&root);
    // The demo character's images to upload, from outside the root.
    let src = tmp.path().join("upload");
    lora_data::synthetic::write_character_dataset(&src, 3, 256, 256, "trig", 7).unwrap();
    let mut images: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    images.sort();
    let fake =
        lora_data::autocaption::fake::FakeEndpoint::start(|req, _| match req.path.as_str() {
            "/v1/models" => {
                lora_data::autocaption::fake::FakeReply::raw(200, r#"{"data":[{"id":"vl"}]}"#)
            }
            _ => lora_data::autocaption::fake::FakeReply::content(
                "Tags: orange body, standing, pink background",
            ),
        });
    let ui = start_ui(&root, &["--caption-endpoint", &fake.url()]);
    let (_driver, url) = chromedriver();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(&url).await.expect("start chromium");
        let result = sign_in(&c, &ui).await;
        let result = match result {
            Ok(()) => walkthrough(&c, &ui.base, &root, &images).await,
            e => e,
        };
        if result.is_err() {
            let _ = shot(&c, "failure").await;
        }
        let _ = c.close().await;
        result.unwrap();
    });
}
